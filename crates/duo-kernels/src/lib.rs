//! duo's compute kernels on the CPU: attention (full, streaming, hybrid visibility;
//! prefill and decode), RoPE, RMSNorm, SwiGLU and the exponential they share.
//!
//! Every kernel has a plain reference implementation beside the fast one
//! ([`attention::reference_attention`] for attention) and the tests compare the two on
//! random inputs. Kernels work on `f32` slices with explicit strides, so callers can
//! hand in rows of a `[tokens, heads * head_dim]` activation without copying.
//!
//! ```
//! use duo_kernels::attention::{attend, KeySegment, Positions, Visibility, QueryBlock};
//! let hd = 2;
//! let q = [1.0f32, 0.0];
//! let k = [1.0f32, 0.0, 0.0, 1.0];
//! let v = [1.0f32, 2.0, 3.0, 4.0];
//! let seg = KeySegment { keys: &k, values: &v, row_stride: hd, positions: Positions::Contiguous(0), cached: true, key_scales: &[], value_scales: &[] };
//! let mut out = [0.0f32; 2];
//! attend(QueryBlock { queries: &q, row_stride: hd, first_position: 1, shared_position: false }, &[seg], Visibility::Causal, hd, 1.0, &mut out, hd);
//! assert!(out[0] > 1.0 && out[0] < 3.0);
//! ```

pub mod attention;
pub mod fp8;
pub mod kv4;
pub mod kv8;
pub mod ops;
pub mod par;
pub mod quant;
