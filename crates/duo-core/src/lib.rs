//! Plain data shared by every duo crate: the model configuration, head patterns
//! (which KV heads keep a full cache), per-layer KV cache specs with their memory
//! arithmetic, and the core error type.
//!
//! Nothing here computes tensors (the seeded weight generator of [`random_weights`] only
//! produces numbers). Keeping these types free of numerics means the
//! pattern format, the binarisation rule and the memory formula can be tested
//! exhaustively and reused by the engine, the identification code and the server.
//!
//! ```
//! use duo_core::pattern::{HeadGates, Layout};
//! let gates = HeadGates::new(vec![vec![1.0, 0.2], vec![0.1, 0.9]]).unwrap();
//! let pattern = gates.binarise_sparsity(0.5, Layout::Head).unwrap();
//! assert_eq!(pattern.retrieval_per_layer(), vec![1, 1]);
//! ```

pub mod cache_spec;
pub mod config;
pub mod error;
pub mod pattern;
pub mod placement;
pub mod random_weights;

pub use cache_spec::{CachePlan, HeadKind, LayerCacheSpec};
pub use config::{Architecture, ModelConfig, RopeStyle};
pub use error::{CoreError, Result};
pub use pattern::{HeadGates, HeadPattern, Layout};
pub use placement::{Placement, Strategy};
