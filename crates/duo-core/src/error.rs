//! The error type of `duo-core`: everything that can be wrong with a pattern file,
//! a configuration or a cache plan, each case carrying the numbers a user needs.

use std::path::PathBuf;

/// Errors raised by the plain-data layer.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A head-pattern file is not in the expected format.
    #[error("malformed head pattern {path}: {reason}")]
    MalformedPattern {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong, with line and column where known.
        reason: String,
    },
    /// A head pattern does not fit the model it is used with.
    #[error("head pattern has {pattern_layers} layers x {pattern_kv_heads} KV heads, but the model has {model_layers} layers x {model_kv_heads} KV heads")]
    PatternShape {
        /// Layers in the pattern.
        pattern_layers: usize,
        /// KV heads per layer in the pattern.
        pattern_kv_heads: usize,
        /// Layers in the model.
        model_layers: usize,
        /// KV heads per layer in the model.
        model_kv_heads: usize,
    },
    /// A numeric setting is outside its valid range.
    #[error("invalid {name} = {value}: {expected}")]
    InvalidSetting {
        /// The setting's name as the user knows it (a flag or config key).
        name: &'static str,
        /// The value given.
        value: String,
        /// The valid range.
        expected: &'static str,
    },
    /// A model configuration is inconsistent or unsupported.
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),
    /// JSON could not be parsed or written.
    #[error("{path}: {source}")]
    Json {
        /// The file concerned.
        path: PathBuf,
        /// The parser's message.
        source: serde_json::Error,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, CoreError>;
