//! The engine: turns a loaded model, an attention method and sampling parameters into
//! generations and teacher-forced scores.
//!
//! * [`method`] resolves `--method full|duo|streaming|random` (with pattern, sparsity,
//!   layout, sink, recent, seed) into a head pattern and cache plan;
//! * [`sampler`] draws tokens (greedy, temperature, top-k, top-p, min-p, seeded);
//! * [`session`] runs chunked prefill and decode over a fresh hybrid KV cache and reports
//!   speed and the peak KV bytes.

pub mod error;
pub mod method;
pub mod sampler;
pub mod session;

pub use error::{EngineError, Result};
pub use method::{Method, MethodSpec, ResolvedMethod};
pub use sampler::{Sampler, SamplingParams};
pub use session::{FinishReason, Generation, Runner, ScoredToken, Scores};
