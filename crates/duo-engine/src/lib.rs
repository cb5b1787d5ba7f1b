//! The engine: turns a loaded model, an attention method and sampling parameters into
//! generations and teacher-forced scores.
//!
//! * [`method`] resolves `--method full|duo|streaming|random` (with pattern, sparsity,
//!   layout, sink, recent, seed) into a head pattern and cache plan;
//! * [`sampler`] draws tokens (greedy, temperature, top-k, top-p, min-p, seeded);
//! * [`batch`] runs many requests together (continuous batching) for the server;
//! * [`text`] turns tokens into streamed text with stop strings;
//! * [`backend`] is the seam to the hardware: the CPU and CUDA backends make sequences
//!   (owned KV caches) and run tokens through them; [`Engine`] is a model on one backend;
//! * [`session`] runs chunked prefill and decode over a fresh hybrid KV cache and reports
//!   speed and the peak KV bytes.

pub mod backend;
pub mod batch;
pub mod constraint;
pub mod engine;
pub mod error;
pub mod method;
pub mod random_checkpoint;
pub mod sampler;
pub mod session;
pub mod shipped;
pub mod text;

pub use backend::{Backend, Device, KvPool, PoolOptions, PoolStep, Sequence};
pub use engine::Engine;
pub use batch::{BatchConfig, BatchEngine, BatchStats, Event, EventSink, Request, TokenLogprob};
pub use error::{EngineError, Result};
pub use method::{KvDtype, Method, MethodSpec, PatternSource, ResolvedMethod};
pub use sampler::{Sampler, SamplingParams};
pub use session::{complete, Completion, FinishReason, Generation, Runner, ScoredToken, Scores};
pub use text::{Accepted, TextStep, TextStream};
