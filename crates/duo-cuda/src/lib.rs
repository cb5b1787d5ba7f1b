//! duo's CUDA backend: its own kernels, compiled with NVRTC when first used, cuBLAS for the
//! matrix products, and a Llama-family model that runs on them. The driver, NVRTC and cuBLAS
//! are loaded at run time, so building needs no CUDA toolkit, and without the `cuda` feature
//! none of this touches the GPU.
//!
//! Every kernel has a plain CPU reference here, built in every configuration, and a parity
//! check on seeded random inputs ([`check`]) that the GPU host runs (`duo cuda-check`).
//!
//! * [`dequant`]: GGUF blocks (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) to bf16.
//! * [`fp8`]: the e4m3 row format of fp8 KV caches (bytes and a power-of-two scale per row),
//!   on the host, exactly as the kernels quantise; [`int8`]: the same for int8 rows (bytes and
//!   `amax / 127` per row).
//! * [`ops`]: random weights, embedding, RMSNorm, RoPE + KV append, SiLU×up, argmax, block
//!   tables and block copies.
//! * [`paged`]: the paged KV layout (blocks shared by all sequences, rings for streaming
//!   heads), its allocator and the row lookup every cache kernel shares.
//! * [`prefill_attention`]: a chunk's attention on the tensor cores, causal for retrieval
//!   heads and Λ-shaped for streaming heads, in one launch per layer.
//! * [`decode_attention`]: one decode step of attention for a whole layer, retrieval and
//!   streaming heads in one launch, split across the sequence for long caches.
//! * [`model`]: the weights on the GPU and the whole-model CPU reference (also split over
//!   ranks as tensor parallelism splits it).
//! * [`shard`]: tensor parallelism's rows and columns of each weight per GPU; [`nccl`]: the
//!   all-reduce between them (NCCL loaded at run time); [`rendezvous`]: how the processes of
//!   a group spanning hosts exchange NCCL's id.
//! * [`pool`]: a pool of KV blocks and the batched step over many sequences (decode rows and
//!   a prefill chunk in one forward pass; decode-only steps replayed as CUDA graphs).
//! * [`kernel_cache`]: NVRTC's output kept between processes, so each kernel form is compiled
//!   once per machine, not once per process.

#[cfg(feature = "cuda")]
mod checks;
pub mod decode_attention;
pub mod dequant;
pub mod fp8;
pub mod int4;
pub mod int8;
pub mod kernel_cache;
pub mod model;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ops;
pub mod paged;
#[cfg(feature = "cuda")]
pub mod pool;
pub mod prefill_attention;
#[cfg(feature = "cuda")]
pub mod runtime;
pub mod rendezvous;
pub mod shard;
#[cfg(feature = "cuda")]
pub use checks::{case_wanted, check, check_group, time_linear, time_product_burst_and_sustained, time_prefill_attention, time_prefill_attention_with, time_step_product, StepProduct, CHECK_GROUPS};
#[cfg(feature = "cuda")]
pub use runtime::Gpu;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The binary was built without the `cuda` feature.
    #[error("this duo binary was built without CUDA; build it with scripts/build-cuda.sh")]
    NotBuilt,
    /// Inputs of the wrong size.
    #[error("bad input: {0}")]
    Input(String),
    /// NVRTC could not compile a kernel.
    #[error("compiling kernel `{name}`: {log}")]
    Compile {
        /// The kernel source's name.
        name: &'static str,
        /// NVRTC's log.
        log: String,
    },
    /// A step needs more KV blocks than the pool has free (nothing was changed).
    #[error("the KV pool has {free} free blocks; this step needs {needed}")]
    PoolFull {
        /// Blocks the step needs.
        needed: usize,
        /// Blocks free.
        free: usize,
    },
    /// The driver, NVRTC or cuBLAS failed.
    #[error("CUDA: {0}")]
    Driver(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, CudaError>;

/// One parity result.
#[derive(Debug, Clone, PartialEq)]
pub struct Parity {
    /// What was compared.
    pub case: String,
    /// Largest absolute difference between the GPU and the CPU reference.
    pub max_abs_err: f64,
    /// The bound the kernel promises.
    pub bound: f64,
}

impl Parity {
    /// Whether the error is within the bound.
    pub fn ok(&self) -> bool {
        self.max_abs_err <= self.bound
    }
}
