//! Seeded synthetic tasks.
//!
//! Identification learns from multi-passkey retrieval samples and evaluation measures the
//! same skill, so both build their prompts here, from a tokenizer, a haystack and a seed:
//! the same seed gives the same token ids. Prompts are assembled from separately
//! tokenized segments (haystack pieces, needles, questions) so that segment boundaries —
//! and therefore the answer positions that losses and scores use — are exact token ranges.

pub mod haystack;
pub mod passkey;
pub mod ruler;
pub mod score;

pub use haystack::Haystack;
pub use passkey::{PasskeySample, PasskeySpec};
pub use ruler::{RulerSample, RulerTask};

/// Errors of task construction.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The haystack folder holds no usable text.
    #[error("haystack folder {0} holds no non-empty .txt file")]
    EmptyHaystack(std::path::PathBuf),
    /// The requested length cannot hold the needles and questions.
    #[error("a context of {length} tokens cannot hold the {needed} tokens of needles and questions; use a longer length or fewer passkeys")]
    TooShort {
        /// Requested total length in tokens.
        length: usize,
        /// Tokens taken by needles and questions alone.
        needed: usize,
    },
    /// An invalid setting.
    #[error("{0}")]
    Invalid(String),
    /// Tokenization failed.
    #[error(transparent)]
    Model(#[from] duo_model::ModelError),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, TaskError>;
