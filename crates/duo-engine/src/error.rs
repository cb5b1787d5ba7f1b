//! The error type of `duo-engine`.

/// Errors raised by the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A parameter is outside its valid range.
    #[error("invalid parameter `{name}`: {reason}")]
    InvalidParameter {
        /// The parameter as the user knows it.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The request does not fit the model's context.
    #[error("{prompt} prompt tokens + {max_tokens} new tokens exceed the context length of {context}")]
    ContextLength {
        /// Prompt tokens.
        prompt: usize,
        /// Tokens requested.
        max_tokens: usize,
        /// The model's context length.
        context: usize,
    },
    /// The KV cache a request needs does not fit in the memory available.
    #[error("the KV cache for {tokens} tokens needs {needed_mib:.1} MiB, but only {available_mib:.1} MiB of memory is available")]
    KvMemory {
        /// Tokens the sequence may reach.
        tokens: usize,
        /// MiB the cache plan needs at that length.
        needed_mib: f64,
        /// MiB available.
        available_mib: f64,
    },
    /// A request's KV cache could never fit the server's KV budget.
    #[error("the request needs {needed} bytes of KV cache, more than the budget of {budget} bytes")]
    KvBudget {
        /// Bytes the request's cache plan needs at its full length.
        needed: usize,
        /// The budget.
        budget: usize,
    },
    /// Too many requests are waiting.
    #[error("{waiting} requests are already waiting; try again later")]
    QueueFull {
        /// Requests waiting.
        waiting: usize,
    },
    /// The engine thread has stopped.
    #[error("the engine has stopped")]
    Stopped,
    /// The model failed.
    #[error(transparent)]
    Model(#[from] duo_model::ModelError),
    /// The backend failed or refused.
    #[error("{0}")]
    Backend(String),
    /// The CUDA backend failed.
    #[error(transparent)]
    Cuda(#[from] duo_cuda::CudaError),
    /// A pattern or setting is invalid.
    #[error(transparent)]
    Core(#[from] duo_core::CoreError),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, EngineError>;
