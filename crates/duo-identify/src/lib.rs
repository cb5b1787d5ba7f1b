//! DuoAttention head identification (ALGORITHM.md §2).
//!
//! Which KV heads need a full cache is learned: one gate per (layer, KV head) — or one per
//! layer for the ZigzagAttention layer layout — mixes each head's full attention with a
//! streaming (sink + recent) attention; the gates are trained so that the model's final
//! hidden states on multi-passkey retrieval samples stay those of full attention, with an
//! L1 pull towards streaming. Model weights stay frozen.
//!
//! - [`dense`]: the model as differentiable candle tensors (CPU or CUDA);
//! - [`gated`]: loss and gate gradients with layer-by-layer recomputation;
//! - [`train`]: data schedule, AdamW, learning-rate schedule, checkpoints;
//! - [`estimate`]: a training-free alternative (attention mass outside sink + recent).

pub mod dense;
pub mod estimate;
pub mod gated;
pub mod train;

pub use dense::{DenseModel, Span};
pub use gated::{GateValues, GatedModel, PhaseSeconds};
pub use train::{IdentifySettings, Trainer, TrainState};

/// Errors of identification.
#[derive(Debug, thiserror::Error)]
pub enum IdentifyError {
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The model could not be loaded.
    #[error(transparent)]
    Model(#[from] duo_model::ModelError),
    /// Bad configuration or shapes.
    #[error(transparent)]
    Core(#[from] duo_core::CoreError),
    /// The synthetic data could not be built.
    #[error(transparent)]
    Task(#[from] duo_tasks::TaskError),
    /// A gradient that must exist was not produced (an operation dropped it).
    #[error("no gradient reached the {0}")]
    Gradient(String),
    /// Invalid settings or inputs.
    #[error("{0}")]
    Invalid(String),
    /// A checkpoint could not be read or written.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, IdentifyError>;
