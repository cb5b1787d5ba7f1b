//! Hybrid KV caches: a full, growing cache for each retrieval KV head and a
//! constant-size `sink + recent` cache (sinks, then a ring) for each streaming KV head.
//!
//! The cache owns all KV memory; the model hands it the new keys and values of a chunk
//! (after RoPE, at their absolute positions) and gets the attention output back from
//! [`LayerKv::attend`]. Streaming heads are never re-indexed: their keys keep the
//! positions they were rotated with, as in the DuoAttention reference. Elements are `f32`,
//! `f16` (half the bytes) or `i8` rows with a scale each (a quarter, `duo_kernels::kv8`), as
//! the plan's element size says; attention computes in `f32`.
//!
//! ```
//! use duo_core::cache_spec::Window;
//! use duo_kv::StreamingHead;
//! let mut head: StreamingHead = StreamingHead::new(1, Window::new(1, 2).unwrap());
//! for pos in 0..4 { head.append(&[pos as f32], &[pos as f32], pos); }
//! assert_eq!(head.positions_in_order(), vec![0, 2, 3]); // sink 0, then the last 2
//! ```

mod cache;
mod layer;
pub mod sim;

pub use cache::{HeadCache, RetrievalHead, StreamingHead};
pub use layer::{KvBytes, LayerKv, PrefillMode, SequenceKv};
pub use sim::KvSim;
