//! duo's own CUDA kernels, compiled with NVRTC when first used (so the binary needs no CUDA
//! toolkit at build time beyond what candle's CUDA feature needs, and none at all without
//! the `cuda` feature).
//!
//! Every kernel has a plain CPU reference here, built in every configuration, and a parity
//! check on seeded random inputs ([`check`]) that the GPU host runs (`duo cuda-check`).
//!
//! * [`decode_attention`]: one decode step of attention for a whole layer, retrieval and
//!   streaming heads in one launch, split across the sequence for long caches.

pub mod decode_attention;

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
    /// The driver or candle failed.
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

/// Runs every kernel's parity check on seeded random inputs against its CPU reference.
#[cfg(feature = "cuda")]
pub fn check(device: &candle_core::CudaDevice, seed: u64) -> Result<Vec<Parity>> {
    decode_attention::check(device, seed)
}
