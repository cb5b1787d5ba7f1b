//! The error type of `duo-model`.

use std::path::PathBuf;

/// Errors raised while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A checkpoint file is malformed (truncated, corrupted or hostile).
    #[error("malformed checkpoint {path}: {reason}")]
    Malformed {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong, with the offset or tensor where known.
        reason: String,
    },
    /// The checkpoint is well formed but describes something duo cannot run.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A tensor the architecture needs is absent.
    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor {
        /// The tensor's name in the checkpoint.
        name: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor's name.
        name: String,
        /// Its shape in the file.
        got: Vec<usize>,
        /// The shape the configuration implies.
        expected: Vec<usize>,
    },
    /// A tokenizer or chat template could not be built or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to render.
    #[error("chat template: {0}")]
    Template(String),
    /// The input does not fit the model.
    #[error("{0}")]
    Input(String),
    /// Fetching the default model or a hub model failed.
    #[error("fetching the model: {0}")]
    Fetch(String),
    /// An invalid configuration.
    #[error(transparent)]
    Core(#[from] duo_core::CoreError),
    /// A tensor operation failed.
    #[error("tensor operation: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
