//! The GPU handle: one context and stream, cuBLAS, and every kernel compiled once, with one
//! typed launcher per kernel. Launchers take raw device addresses (`u64`) so that a model can
//! keep buffers of any type and a captured CUDA graph sees plain values.
//!
//! Event tracking of the driver wrapper is off: everything runs on this one stream, in
//! order, which is also what stream capture needs.
#![allow(unsafe_code)] // kernel launches and cuBLAS calls are unsafe by nature; sizes are checked by callers

use crate::decode_attention::{tensor_smem_bytes, DecodeKernel, KvType, SMEM_PER_BLOCK_RESERVED, SMEM_PER_SM};
use crate::paged::{PagedArgs, PREFIX};
use crate::{CudaError, Result};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use std::sync::{Arc, Mutex};

pub(crate) fn driver(e: impl std::fmt::Display) -> CudaError {
    CudaError::Driver(e.to_string())
}

/// The device address of a buffer.
pub fn addr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// Pushes the arguments and launches on the GPU's stream.
macro_rules! launch {
    ($gpu:expr, $f:expr, $grid:expr, $block:expr, $($arg:expr),* $(,)?) => {
        launch!(smem 0; $gpu, $f, $grid, $block, $($arg),*)
    };
    (smem $smem:expr; $gpu:expr, $f:expr, $grid:expr, $block:expr, $($arg:expr),* $(,)?) => {{
        let mut b = $gpu.stream.launch_builder(&$f);
        $( b.arg($arg); )*
        let cfg = LaunchConfig { grid_dim: $grid, block_dim: ($block, 1, 1), shared_mem_bytes: $smem };
        // SAFETY: each launcher pushes the arguments its kernel declares, in order; callers
        // pass addresses of buffers of the sizes the kernel indexes.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(driver)
    }};
}

/// `launch!` as a programmatic dependent of the kernel before it in the stream where `$pdl`
/// holds ([`Gpu::launch_programmatic`]; the kernel calls `pdl_wait()` before it reads what
/// that kernel wrote), else the ordinary way.
macro_rules! launch_dependent {
    ($pdl:expr; smem $smem:expr; $gpu:expr, $f:expr, $grid:expr, $block:expr, $($arg:expr),* $(,)?) => {{
        if $pdl {
            let mut params = [$( ($arg) as *const _ as *mut std::ffi::c_void ),*];
            $gpu.launch_programmatic(&$f, $grid, ($block, 1, 1), $smem, &mut params)
        } else {
            launch!(smem $smem; $gpu, $f, $grid, $block, $($arg),*)
        }
    }};
}

type DecodeKernels = (CudaFunction, CudaFunction);
/// A compiled decode kernel pair is specific to (group, head_dim, KV type, kernel).
type DecodeKey = (usize, usize, KvType, DecodeKernel);

/// A kernel compiled and loaded once, or why it could not be (kept, so the warning is said once).
type MadeKernel = std::result::Result<CudaFunction, String>;

/// One GPU: context, stream, cuBLAS and the compiled kernels.
pub struct Gpu {
    /// The context (device 0 unless told otherwise).
    pub ctx: Arc<CudaContext>,
    /// The one stream everything runs on.
    pub stream: Arc<CudaStream>,
    blas: CudaBlas,
    ops: Arc<CudaModule>,
    decode: Mutex<Vec<(DecodeKey, DecodeKernels)>>,
    prefill: Mutex<Vec<((usize, KvType), CudaFunction)>>,
    /// The wgmma prefill kernel per head size, or why it could not be made (kept, so that a
    /// failure is met once and the `mma.sync` kernel takes over).
    prefill_wg: Mutex<Vec<((usize, KvType), MadeKernel)>>,
    /// Compute capability 9.x (Hopper): the `wgmma` prefill kernel runs.
    hopper: bool,
    /// Its multiprocessors.
    sms: usize,
    dequant: Mutex<Option<CudaFunction>>,
    /// cuBLAS's fixed workspace (so captured products allocate nothing); it lives as long as
    /// the handle that uses it.
    _blas_workspace: CudaSlice<u8>,
}

/// Rows [`Gpu::gemv_fused`] takes at most (`GEMV_ROWS` in [`crate::ops::SOURCE`]).
pub const GEMV_ROWS: usize = 8;

/// Shared memory [`Gpu::gemv_fused`] may give a block for its normalised rows (rows x
/// inputs x 2 bytes) beside its rings: Llama-3-8B's 8 rows of 4,096 (64 KiB) run one block a
/// multiprocessor, up to 6 (48 KiB) two.
const GEMV_SMEM: usize = 100 << 10;

/// Shared memory a block may have on the H100/H200 (227 KiB, static and dynamic together),
/// and what [`Gpu::gemv_fused`]'s kernel declares statically (its `part[]`, with room).
const BLOCK_SMEM: usize = 227 << 10;
const GEMV_STATIC_SMEM: usize = 64;

/// [`Gpu::gemv_fused`]'s blocks a multiprocessor at most (`GEMV_BLOCKS` in its source).
fn gemv_blocks() -> usize {
    crate::decode_attention::tuning("DUO_GEMV_BLOCKS").unwrap_or(2).clamp(1, 8)
}

/// Bytes of [`Gpu::gemv_fused`]'s weight rings in a block: 8 warps x `GEMV_STAGES` items of
/// 32 lanes x `GEMV_UNROLL` 16-byte chunks.
fn gemv_ring_bytes() -> usize {
    8 * gemv_stages() * gemv_unroll() * 32 * 16
}

/// Whether `rows_bytes` of staged input rows fit one [`Gpu::gemv_fused`] block beside rings
/// of `ring` bytes (and the kernel's static shared memory).
fn gemv_fits_block(ring: usize, rows_bytes: usize) -> bool {
    ring + rows_bytes + GEMV_STATIC_SMEM <= BLOCK_SMEM
}

/// [`Gpu::gemv_fused`]'s 16-byte chunks a lane an item (`GEMV_UNROLL`).
fn gemv_unroll() -> usize {
    crate::decode_attention::tuning("DUO_GEMV_UNROLL").unwrap_or(4).clamp(1, 16)
}

/// [`Gpu::gemv_fused`]'s items a warp's ring (`GEMV_STAGES`; two at least: one being summed
/// while the next is copied).
fn gemv_stages() -> usize {
    crate::decode_attention::tuning("DUO_GEMV_STAGES").unwrap_or(4).clamp(2, 16)
}

/// The ops source's options: the matrix-vector kernel's shape where the environment sets it
/// (`DUO_GEMV_UNROLL`, `DUO_GEMV_STAGES`, `DUO_GEMV_BLOCKS`; none by default, so the default key is unchanged).
fn ops_options() -> Vec<String> {
    // (The values the host sizes the launch by, clamped alike.)
    let mut o = Vec::new();
    if crate::decode_attention::tuning("DUO_GEMV_UNROLL").is_some() {
        o.push(format!("-DGEMV_UNROLL={}", gemv_unroll()));
    }
    if crate::decode_attention::tuning("DUO_GEMV_BLOCKS").is_some() {
        o.push(format!("-DGEMV_BLOCKS={}", gemv_blocks()));
    }
    if crate::decode_attention::tuning("DUO_GEMV_STAGES").is_some() {
        o.push(format!("-DGEMV_STAGES={}", gemv_stages()));
    }
    o
}

/// What [`Gpu::gemv_fused`] multiplies: bf16 rows, or f32 rows put through RMSNorm with
/// weights `norm` (f32) and `eps` on the way, as [`Gpu::rms_norm`] would write them.
#[derive(Clone, Copy, Debug)]
pub enum GemvInput {
    /// The address of bf16 rows.
    Bf16(u64),
    /// bf16 `[gate | up]` rows (twice the product's input width) at the address, the
    /// product's input being `bf16(silu(gate) * up)` as [`Gpu::silu_mul`] writes it: its
    /// rows must fit the block's shared memory beside the rings.
    SiluOf(u64),
    /// f32 rows at `x`, normalised on the way.
    Normed {
        /// The rows (f32).
        x: u64,
        /// The norm's weights (f32, one per input).
        norm: u64,
        /// The norm's epsilon.
        eps: f32,
    },
}

/// Where [`Gpu::gemv_fused`] puts its product: f32 (plus `beta` times what is there), bf16,
/// or, of a `[gate | up]` product, `bf16(silu(gate) * up)` as [`Gpu::silu_mul`] would write
/// it from the bf16 pair (half the product's width).
#[derive(Clone, Copy, Debug)]
pub enum GemvOutput {
    /// f32 rows at `y`, `y = product + beta * y`.
    F32 {
        /// The rows (f32).
        y: u64,
        /// What the old values count (0: not read).
        beta: f32,
    },
    /// bf16 rows at the address.
    Bf16(u64),
    /// bf16 rows of half the product's width at the address.
    SiluPairs(u64),
}

/// How a decode step's products of at most [`GEMV_ROWS`] rows run (`DUO_STEP_GEMV`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepGemv {
    /// cuBLAS, with the RMSNorms and the SiLU as kernels of their own (the default).
    Cublas,
    /// Every product on duo's [`Gpu::gemv_fused`], the norms and the SiLU folded in (`=1`).
    /// On the H200 (BENCHMARKS.md, session 26) a one-row Llama-3-8B step takes the same time
    /// as with cuBLAS (128K full 9.01-9.05 ms against 9.06: alone its qkv is 1.29x and o
    /// 2.31x of cuBLAS's speed, down 0.99x, gate/up 0.90x), and at 4 rows its products are
    /// 0.17-1.12x of cuBLAS's, so a batch would be slower.
    Fused,
    /// qkv, o and down on [`Gpu::gemv_fused`] (the first norm folded into qkv, the SiLU into
    /// down's input rows where they fit its shared memory), gate/up on cuBLAS after an RMSNorm
    /// kernel (`=2`): the products where duo's kernel measured as fast or faster, and the
    /// one where it did not left to cuBLAS. On the H200 (BENCHMARKS.md, session 27) a one-row
    /// Llama-3-8B step takes the same time as the default (128K full 9.00-9.02 ms against
    /// 8.97-9.01; alone, SiLU + down at 1 row measured 0.92x of the separate kernels and
    /// cuBLAS). Not batch-invariant: cuBLAS's gate/up, as on the default path.
    FusedBesideCublasGateUp,
    /// qkv (the first norm folded in) and o on [`Gpu::gemv_fused`], the MLP as by default
    /// (`=3`): the two products small enough that a launch's fixed part weighs most, where
    /// cuBLAS streams at 73% and 51% of the copy bandwidth (BENCHMARKS.md, session 29: a
    /// one-row step 0.5-1.5% faster on the H100, the same on the H200). Not batch-invariant:
    /// cuBLAS's MLP, as on the default path.
    FusedAttention,
}

/// The [`StepGemv`] `DUO_STEP_GEMV` asks for. Whichever it is, a pool takes duo's kernel for
/// every step or for none (`KvPool`'s `fused_rows`): a product whose kernel depended on the
/// step's row count would make a sequence's logits depend on its neighbours. (cuBLAS's
/// products, the default's and `=2`'s gate/up, choose their kernel by the row count.)
pub fn step_gemv() -> StepGemv {
    match crate::decode_attention::tuning("DUO_STEP_GEMV") {
        Some(1) => StepGemv::Fused,
        Some(2) => StepGemv::FusedBesideCublasGateUp,
        Some(3) => StepGemv::FusedAttention,
        _ => StepGemv::Cublas,
    }
}

/// Whether [`Gpu::gemv_fused`] launches as a programmatic dependent, so that its first
/// weights are on their way while the kernel before it finishes (`DUO_GEMV_PDL=0`: the
/// ordinary way, for measuring what that brings).
fn gemv_programmatic() -> bool {
    crate::decode_attention::tuning("DUO_GEMV_PDL") != Some(0)
}

/// Bytes of cuBLAS's workspace.
const BLAS_WORKSPACE: usize = 32 << 20;

// SAFETY: `PagedArgs` is `#[repr(C)]` with the field order, types and alignment of the CUDA
// `struct Paged` it is passed as (two 8-byte-aligned words of pointer then `int`s).
unsafe impl cudarc::driver::DeviceRepr for PagedArgs {}

/// Programmatic dependent launch (Hopper), in every kernel's source: a kernel launched as a
/// programmatic dependent of the one before it in the stream ([`Gpu::launch_programmatic`])
/// may start while its predecessor runs, so `pdl_wait()` must come before it reads anything
/// its predecessor wrote; `pdl_launch_dependents()` lets the next kernel, where that one is
/// launched as a dependent, start now (else it may at this kernel's exit), whichever way this
/// one was launched. The wait returns at once in a kernel launched the ordinary way.
const PDL_SOURCE: &str = r#"
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
"#;

/// Whether a decode layer's partial and merge kernels launch as programmatic dependents of
/// the kernel before each (RoPE + append, then the partial kernel): their blocks are placed
/// and run their set-up while the predecessor finishes, instead of after it
/// (`DUO_PDL=1`). Off by default: on the H200 (BENCHMARKS.md, session 21) it took a bf16
/// 128K Llama-3-8B full step from 8.94-8.97 to 8.80-8.81 ms but made layer 0.5 slower
/// (6.69 to 6.75) and every int4 step 2-3% slower (full 6.43 to 6.59-6.61 with the wide
/// merge); letting partial blocks copy their first tiles before the wait measured no better
/// and was dropped.
pub fn programmatic_launch() -> bool {
    crate::decode_attention::tuning("DUO_PDL") == Some(1)
}

/// Compiles `source` after the paged-cache helper ([`PREFIX`]) for `sm_90`.
fn compile(source: &str, name: &'static str, options: Vec<String>) -> Result<cudarc::nvrtc::Ptx> {
    compile_for("sm_90", source, name, options, true)
}

/// NVRTC's version, part of a kept kernel's key ("unknown" where it cannot be asked).
fn nvrtc_version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        quietly(|| {
            let (mut major, mut minor) = (0, 0);
            // SAFETY: two out-parameters NVRTC writes; a library that cannot be loaded panics
            // (dynamic loading), which is caught.
            unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
            format!("{major}.{minor}")
        })
        .unwrap_or_else(|| "unknown".into())
    })
}

/// `f`'s value, or `None` where it panics, without the panic's message: cudarc's dynamic
/// loading panics where a CUDA library is missing, which here is an answer, not a failure.
fn quietly<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Option<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let value = std::panic::catch_unwind(f);
    std::panic::set_hook(hook);
    value.ok()
}

/// [`compile`] for the architecture `arch` (`sm_90a`: Hopper's own instructions, `wgmma`);
/// `cache`: take and keep the PTX in [`crate::kernel_cache`]'s folder (every use but
/// [`compile_all`], whose point is to compile).
fn compile_for(arch: &'static str, source: &str, name: &'static str, mut options: Vec<String>, cache: bool) -> Result<cudarc::nvrtc::Ptx> {
    // A kernel developer's view of what NVRTC made (`ptxas -v`, `cuobjdump -sass` on it):
    // DUO_PTX_DIR=folder writes each compilation's PTX there, named by kernel and defines.
    let ptx_file = std::env::var_os("DUO_PTX_DIR").map(|dir| {
        let tag = options.iter().filter_map(|o| o.strip_prefix("-D")).map(|d| d.replace('=', "")).collect::<Vec<_>>().join("-");
        std::path::Path::new(&dir).join(format!("{name}-{tag}.ptx"))
    });
    // DUO_NVRTC_LINEINFO=1: source lines in the code, for Nsight Compute's per-line counters.
    if std::env::var("DUO_NVRTC_LINEINFO").is_ok_and(|v| v == "1") {
        options.push("-lineinfo".into());
    }
    let full = format!("{PREFIX}{PDL_SOURCE}{source}");
    let folder = if cache { crate::kernel_cache::folder() } else { None };
    let key = crate::kernel_cache::key(&[arch, name, &options.join("\n"), nvrtc_version(), &full]);
    let text = crate::kernel_cache::get_or_compile(folder.as_deref(), name, key, || {
        let opts = CompileOptions {
            arch: Some(arch),
            options,
            ..Default::default()
        };
        compile_ptx_with_opts(full.as_str(), opts).map(|p| p.to_src()).map_err(|e| CudaError::Compile {
            name,
            log: e.to_string(),
        })
    })?;
    let ptx = cudarc::nvrtc::Ptx::from_src(text);
    if let Some(file) = ptx_file {
        let _ = std::fs::write(file, ptx.to_src());
    }
    Ok(ptx)
}

/// Lets `f` take `bytes` of dynamic shared memory (beyond the 48 KiB it gets without asking).
fn allow_dynamic_smem(f: &CudaFunction, bytes: usize) -> Result<()> {
    // SAFETY: `f` is a function of a loaded module; the attribute only raises a limit.
    unsafe {
        cudarc::driver::result::function::set_function_attribute(
            f.cu_function(),
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
    }
    .map_err(driver)
}

/// The kernels' define for a byte cache's format.
fn byte_format_option(kv: KvType) -> Option<String> {
    match kv {
        KvType::Fp8 => Some("-DKV_FP8=1".into()),
        KvType::Int8 => Some("-DKV_INT8=1".into()),
        KvType::Int4 => Some("-DKV_INT4=1".into()),
        KvType::K8V4 => Some("-DKV_K8V4=1".into()),
        _ => None,
    }
}

/// The prefill kernel's NVRTC options for heads of `head_dim` over a `kv` cache.
fn prefill_options(head_dim: usize, kv: KvType) -> Vec<String> {
    let mut o = vec![format!("-DHEAD_DIM={head_dim}")];
    o.extend(byte_format_option(kv));
    o
}

/// The Hopper prefill kernel's source for heads of `head_dim` (64 or 128), after the helpers
/// and the two `wgmma` products it uses.
fn prefill_wg_source(head_dim: usize, keys_per_tile: usize, kv: KvType) -> String {
    use crate::prefill_attention::{wgmma_function, TENSOR_CORE_HELPERS, WG_SOURCE};
    // A quantised cache's tiles are dequantised to f16 (exact for its codes), so its
    // products take f16.
    let f16 = kv.is_quantised();
    format!(
        "{TENSOR_CORE_HELPERS}{}{}{WG_SOURCE}",
        wgmma_function("wg_qk", keys_per_tile, false, f16),
        wgmma_function("wg_pv", head_dim, true, f16)
    )
}

/// Which prefill kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillKernel {
    /// `mma.sync` (every cache type, any CUDA GPU duo runs on): [`crate::prefill_attention::SOURCE`].
    Mma,
    /// Hopper's `wgmma` (bf16 and quantised caches, heads of 64 or 128, compute capability
    /// 9.0): [`crate::prefill_attention::WG_SOURCE`].
    Wgmma,
}

/// The prefill kernel's source, after the tensor-core helpers it uses.
fn prefill_source() -> String {
    format!(
        "{}{}",
        crate::prefill_attention::TENSOR_CORE_HELPERS,
        crate::prefill_attention::SOURCE
    )
}

/// A decode kernel pair's source and NVRTC options.
fn decode_source(
    group: usize,
    head_dim: usize,
    kv: KvType,
    kernel: DecodeKernel,
) -> (String, Vec<String>) {
    use crate::decode_attention::{COMMON_SOURCE, CORES_SOURCE, TENSOR_SOURCE};
    let mut options = vec![
        format!("-DGROUP={group}"),
        format!("-DPER_LANE={}", head_dim / 32),
        format!("-DMERGE_WIDE={}", u8::from(crate::decode_attention::merge_wide())),
        format!("-DMERGE_ONEPASS={}", u8::from(crate::decode_attention::merge_onepass())),
        format!("-DMERGE_THREADS={}", crate::decode_attention::MERGE_THREADS),
    ];
    let source = match kernel {
        DecodeKernel::Cores(kpw) => {
            options.push(format!("-DKPW={kpw}"));
            if kv == KvType::Bf16 {
                options.push("-DKV_BF16=1".into());
            }
            format!("{COMMON_SOURCE}{CORES_SOURCE}")
        }
        DecodeKernel::Tensor => {
            use crate::decode_attention as d;
            options.extend(byte_format_option(kv));
            // In this order: the kernel cache's keys hash the options as listed.
            let mut defines = vec![
                ("STAGES", d::tensor_stages(kv)),
                ("MIN_BLOCKS", d::tensor_blocks(head_dim, group, kv)),
                ("CP_L2_PREFETCH", d::tensor_l2_prefetch()),
                ("KV_SWIZZLE", usize::from(d::tensor_swizzle())),
                ("BYTE_PAD", d::tensor_byte_pad()),
            ];
            if d::decode_trace() {
                defines.push(("DUO_TRACE", 1));
            }
            defines.push(("V_REGS", usize::from(d::tensor_values_in_registers())));
            defines.push(("BYTE_TILE", d::tensor_byte_tile()));
            options.extend(defines.into_iter().map(|(name, value)| format!("-D{name}={value}")));
            format!(
                "{}{COMMON_SOURCE}{TENSOR_SOURCE}",
                crate::prefill_attention::TENSOR_CORE_HELPERS
            )
        }
    };
    (source, options)
}

/// Compiles every kernel source with each set of options duo uses, without a device: the
/// build check that NVRTC accepts them (`None` where NVRTC cannot be loaded here). Where
/// `DUO_KERNEL_CACHE` names a folder, the PTX is also kept there under the keys a process on
/// a GPU looks for (the same architecture, options and NVRTC version), so a folder filled on
/// a build machine spares a fresh GPU host minutes of compiling (`scripts/gpu-prep.sh`).
pub fn compile_all() -> Option<Result<usize>> {
    let loaded = quietly(|| compile_for("sm_90", "extern \"C\" __global__ void k() {}", "probe", vec![], false).is_ok());
    if loaded != Some(true) {
        return None;
    }
    let mut jobs: Vec<(&'static str, String, Vec<String>)> = vec![
        ("ops", crate::ops::SOURCE.into(), ops_options()),
        ("dequant", crate::dequant::SOURCE.into(), vec![]),
    ];
    for d in [64, 128] {
        for kv in [KvType::Bf16, KvType::Fp8, KvType::Int8, KvType::Int4, KvType::K8V4] {
            jobs.push((
                "prefill_attention",
                prefill_source(),
                prefill_options(d, kv),
            ));
        }
    }
    let decode = [
        (3, 64, KvType::Bf16, DecodeKernel::Cores(4)),
        (4, 128, KvType::Bf16, DecodeKernel::Cores(2)),
        (4, 128, KvType::F32, DecodeKernel::Cores(4)),
        (1, 256, KvType::Bf16, DecodeKernel::Cores(1)),
        (3, 64, KvType::Bf16, DecodeKernel::Tensor),
        (4, 128, KvType::Bf16, DecodeKernel::Tensor),
        (16, 64, KvType::Bf16, DecodeKernel::Tensor),
        (1, 128, KvType::Bf16, DecodeKernel::Tensor),
        (3, 64, KvType::Fp8, DecodeKernel::Tensor),
        (4, 128, KvType::Fp8, DecodeKernel::Tensor),
        (16, 128, KvType::Fp8, DecodeKernel::Tensor),
        (3, 64, KvType::Int8, DecodeKernel::Tensor),
        (4, 128, KvType::Int8, DecodeKernel::Tensor),
        (3, 64, KvType::Int4, DecodeKernel::Tensor),
        (4, 128, KvType::Int4, DecodeKernel::Tensor),
        (8, 128, KvType::Fp8, DecodeKernel::Tensor),
        (1, 128, KvType::Int4, DecodeKernel::Tensor),
        (1, 64, KvType::Int8, DecodeKernel::Tensor),
        (3, 64, KvType::K8V4, DecodeKernel::Tensor),
        (4, 128, KvType::K8V4, DecodeKernel::Tensor),
        (16, 128, KvType::K8V4, DecodeKernel::Tensor),
    ];
    for d in [64, 128] {
        let (bk, options) = (prefill_wg_keys_per_tile(), prefill_wg_options(d, KvType::Bf16));
        jobs.push(("prefill_attention_wg", prefill_wg_source(d, bk, KvType::Bf16), options.clone()));
        // Over each quantised cache, as this process would build it (and where the
        // environment asks for the unspecialised form, the specialised one).
        for kv in [KvType::Fp8, KvType::Int8, KvType::Int4, KvType::K8V4] {
            let o = prefill_wg_options(d, kv);
            let o = if prefill_wg_specialised() == 0 { with_define(&o, "WS", "2") } else { o };
            jobs.push(("prefill_attention_wg", prefill_wg_source(d, bk, kv), o.clone()));
            // And 64-key tiles in four stages (DUO_PREFILL_WG_BK=64).
            let narrow = with_define(&with_define(&o, "WG_BK", "64"), "WG_STAGES", "4");
            jobs.push(("prefill_attention_wg", prefill_wg_source(d, 64, kv), narrow));
            // And the tiles' rows looked up into shared memory (DUO_PREFILL_SHARED_ROWS=1), and
            // one raw slot beside three stages (DUO_PREFILL_RAW_SLOTS=1).
            if kv == KvType::K8V4 {
                let shared = with_define(&o, "WG_SHARED_ROWS", "1");
                jobs.push(("prefill_attention_wg", prefill_wg_source(d, bk, kv), shared));
            }
            if matches!(kv, KvType::K8V4 | KvType::Fp8) {
                let one = with_define(&with_define(&o, "WG_RAW_SLOTS", "1"), "WG_STAGES", "3");
                jobs.push(("prefill_attention_wg", prefill_wg_source(d, bk, kv), one.clone()));
                if kv == KvType::Fp8 {
                    jobs.push(("prefill_attention_wg", prefill_wg_source(d, bk, kv), with_define(&one, "WG_SHARED_ROWS", "1")));
                }
            }
        }
        // And the other forms of DUO_PREFILL_WS, DUO_PREFILL_WG_STAGES, DUO_PREFILL_WG_BK,
        // DUO_PREFILL_PINGPONG and DUO_PREFILL_SWIZZLE, whatever this process's environment says (the default form's
        // other knobs kept).
        let set = |o: &[String], pairs: &[(&str, &str)]| pairs.iter().fold(o.to_vec(), |o, (name, value)| with_define(&o, name, value));
        let plain = [("WS", "2"), ("PINGPONG", "0"), ("WG_SWIZZLE", "1"), ("WG_TMA", "0"), ("WG_SOFTMAX_TREE", "0"), ("WG_SHARED_ROWS", "0")];
        let narrow = set(&set(&options, &plain), &[("WG_BK", "64"), ("WG_STAGES", "4")]);
        let wide = set(&set(&options, &plain), &[("WG_BK", "128"), ("WG_STAGES", "3")]);
        let bf16 = |bk: usize| prefill_wg_source(d, bk, KvType::Bf16);
        jobs.push(("prefill_attention_wg", bf16(64), set(&narrow, &[("WG_SWIZZLE", "0")])));
        jobs.push(("prefill_attention_wg", bf16(64), set(&narrow, &[("WS", "0")])));
        jobs.push(("prefill_attention_wg", bf16(64), set(&narrow, &[("WS", "1")])));
        jobs.push(("prefill_attention_wg", bf16(64), set(&narrow, &[("WG_STAGES", "2")])));
        jobs.push(("prefill_attention_wg", bf16(64), set(&narrow, &[("WG_STAGES", "3")])));
        jobs.push(("prefill_attention_wg", bf16(64), set(&narrow, &[("PINGPONG", "1")])));
        jobs.push(("prefill_attention_wg", bf16(128), wide.clone()));
        jobs.push(("prefill_attention_wg", bf16(128), set(&wide, &[("PINGPONG", "1")])));
        jobs.push(("prefill_attention_wg", bf16(128), set(&wide, &[("WG_TMA", "1")])));
        jobs.push(("prefill_attention_wg", bf16(128), set(&wide, &[("WG_SOFTMAX_TREE", "1")])));
        // The bf16 default without shared row lookups (DUO_PREFILL_SHARED_ROWS=0).
        jobs.push(("prefill_attention_wg", bf16(128), set(&wide, &[("WG_TMA", "1"), ("WG_SOFTMAX_TREE", "1")])));
    }
    for (group, d, kv, kernel) in decode {
        let (src, o) = decode_source(group, d, kv, kernel);
        jobs.push(("decode_attention", src, o));
    }
    // The split merge's other form (DUO_DECODE_MERGE_WIDE, whatever this process's environment
    // says) for heads of 64 and 128, with both partial kernels.
    let other_wide = if crate::decode_attention::merge_wide() { "0" } else { "1" };
    for (group, d, kernel) in [(4, 128, DecodeKernel::Tensor), (3, 64, DecodeKernel::Tensor), (1, 64, DecodeKernel::Cores(4))] {
        let (src, o) = decode_source(group, d, KvType::Bf16, kernel);
        jobs.push(("decode_attention", src, with_define(&o, "MERGE_WIDE", other_wide)));
    }
    // And the other form of its wide merge (DUO_DECODE_MERGE_ONEPASS).
    let other_onepass = if crate::decode_attention::merge_onepass() { "0" } else { "1" };
    for (group, d) in [(4, 128), (3, 64)] {
        let (src, o) = decode_source(group, d, KvType::Bf16, DecodeKernel::Tensor);
        jobs.push(("decode_attention", src, with_define(&o, "MERGE_ONEPASS", other_onepass)));
    }
    // And the stages' other layouts (DUO_DECODE_SWIZZLE, DUO_DECODE_BYTE_PAD=32) for bf16 and
    // a cache of 128-byte rows, and the other pad for int4's.
    let other_swizzle = if crate::decode_attention::tensor_swizzle() { "0" } else { "1" };
    let other_pad = if crate::decode_attention::tensor_byte_pad() == 32 { "16" } else { "32" };
    for kv in [KvType::Bf16, KvType::Fp8, KvType::Int4] {
        let (src, o) = decode_source(4, 128, kv, DecodeKernel::Tensor);
        jobs.push(("decode_attention", src.clone(), with_define(&o, "KV_SWIZZLE", other_swizzle)));
        if kv != KvType::Bf16 {
            jobs.push(("decode_attention", src, with_define(&with_define(&o, "KV_SWIZZLE", "0"), "BYTE_PAD", other_pad)));
        }
    }
    // And DUO_DECODE_V_SMEM's (values through shared memory) and DUO_DECODE_TILE=128's over
    // each byte cache.
    for (group, d, kv) in [(4, 128, KvType::Fp8), (3, 64, KvType::Int8), (4, 128, KvType::Int4), (16, 128, KvType::Fp8), (4, 128, KvType::K8V4), (16, 64, KvType::K8V4)] {
        let (src, o) = decode_source(group, d, kv, DecodeKernel::Tensor);
        jobs.push(("decode_attention", src.clone(), with_define(&o, "V_REGS", "0")));
        jobs.push(("decode_attention", src, with_define(&o, "BYTE_TILE", "128")));
    }
    let n = jobs.len();
    // Only a folder asked for by name (kernel_cache::folder then refuses an empty or 0 one):
    // never the default one under the home folder.
    let fill_cache = std::env::var_os("DUO_KERNEL_CACHE").is_some();
    Some(
        jobs.into_iter()
            .try_for_each(|(name, src, o)| {
                let arch = if name.ends_with("_wg") { "sm_90a" } else { "sm_90" };
                compile_for(arch, &src, name, o, fill_cache).map(|_| ())
            })
            .map(|_| n),
    )
}

/// NVRTC `options` with `-DNAME=...` set to `value` (what a measurement knob's other side
/// compiles with, whatever this process's environment says).
fn with_define(options: &[String], name: &str, value: &str) -> Vec<String> {
    let prefix = format!("-D{name}=");
    options.iter().map(|x| if x.starts_with(&prefix) { format!("{prefix}{value}") } else { x.clone() }).collect()
}

/// GPUs the driver sees (0 where no driver can be loaded).
pub fn device_count() -> usize {
    quietly(CudaContext::device_count).and_then(|n| n.ok()).map_or(0, |n| n.max(0) as usize)
}

/// Devices `0..n` opened for `n` ranks of tensor parallelism, or an error that says how
/// many are visible when there are fewer.
pub fn open_gpus(n: usize) -> Result<Vec<Arc<Gpu>>> {
    let visible = device_count();
    if n > visible {
        return Err(CudaError::Input(format!("{n} GPUs asked for, {visible} visible")));
    }
    (0..n).map(|o| Gpu::new(o).map(Arc::new)).collect()
}

impl Gpu {
    /// Opens device `ordinal`. Where no driver can be loaded this is an error, not a panic.
    pub fn new(ordinal: usize) -> Result<Self> {
        // The driver library is loaded on first use; where it is missing the loader panics.
        let ctx = match quietly(|| CudaContext::new(ordinal)) {
            Some(c) => c.map_err(driver)?,
            None => {
                return Err(CudaError::Driver(
                    "no usable CUDA driver on this machine (libcuda.so.1 could not be loaded)"
                        .into(),
                ))
            }
        };
        // SAFETY: this crate runs all work on one stream, in order; no cross-stream events needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver)?;
        let blas = CudaBlas::new(stream.clone()).map_err(driver)?;
        let ops = ctx
            .load_module(compile(crate::ops::SOURCE, "ops", ops_options())?)
            .map_err(driver)?;
        let workspace = stream.alloc_zeros::<u8>(BLAS_WORKSPACE).map_err(driver)?;
        let hopper = ctx.compute_capability().map_err(driver)?.0 == 9;
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver)?
            .max(1) as usize;
        let gpu = Self {
            ctx,
            stream,
            blas,
            ops,
            decode: Mutex::new(Vec::new()),
            prefill: Mutex::new(Vec::new()),
            prefill_wg: Mutex::new(Vec::new()),
            hopper,
            sms,
            dequant: Mutex::new(None),
            _blas_workspace: workspace,
        };
        gpu.set_blas_workspace(gpu.addr(&gpu._blas_workspace), BLAS_WORKSPACE)?;
        Ok(gpu)
    }

    /// The card's name.
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "CUDA GPU".into())
    }

    /// Makes this GPU's context the calling thread's current one (for libraries that use
    /// the current device, such as NCCL's communicator set-up).
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(driver)
    }

    /// Bytes in use on the device (all processes) and the card's total.
    pub fn memory_used(&self) -> Result<(usize, usize)> {
        let (free, total) = self.ctx.mem_get_info().map_err(driver)?;
        Ok((total - free, total))
    }

    /// Waits for the stream.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver)
    }

    /// Milliseconds per call of `run` (its launches, queued back to back): the mean of
    /// `iters` (at least 1) after one untimed call, the stream drained before and after.
    pub fn time_ms(&self, iters: usize, mut run: impl FnMut() -> Result<()>) -> Result<f64> {
        run()?;
        self.sync()?;
        let started = std::time::Instant::now();
        for _ in 0..iters.max(1) {
            run()?;
        }
        self.sync()?;
        Ok(started.elapsed().as_secs_f64() * 1000.0 / iters.max(1) as f64)
    }

    /// A zeroed buffer.
    pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(|e| {
            CudaError::Driver(format!(
                "allocating {} bytes: {e}",
                n * std::mem::size_of::<T>()
            ))
        })
    }

    /// A buffer holding `v`.
    pub fn upload<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(v).map_err(driver)
    }

    /// Copies `v` into `dst` (in stream order).
    pub fn write<T: cudarc::driver::DeviceRepr>(
        &self,
        v: &[T],
        dst: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.stream.memcpy_htod(v, dst).map_err(driver)
    }

    /// The buffer's contents.
    pub fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        s: &CudaSlice<T>,
    ) -> Result<Vec<T>> {
        self.stream.clone_dtoh(s).map_err(driver)
    }

    /// The device address of `s`.
    pub fn addr<T>(&self, s: &CudaSlice<T>) -> u64 {
        addr(s, &self.stream)
    }

    fn op(&self, name: &str) -> Result<CudaFunction> {
        self.ops.load_function(name).map_err(driver)
    }

    /// `n` seeded uniform bf16 values in `[-scale, scale)` at `out`.
    pub fn fill_uniform(&self, out: u64, n: usize, seed: u64, scale: f32) -> Result<()> {
        let f = self.op("fill_uniform_bf16")?;
        let n64 = n as u64;
        launch!(self, f, (4096, 1, 1), 256, &out, &n64, &seed, &scale)
    }

    /// `x[t] = embedding(tokens[t])` for `t` tokens: rows of `table` (bf16), or, where `table`
    /// is 0, the seeded random rows.
    #[allow(clippy::too_many_arguments)]
    pub fn embed(
        &self,
        tokens: u64,
        table: u64,
        seed: u64,
        scale: f32,
        x: u64,
        hidden: usize,
        t: usize,
    ) -> Result<()> {
        let f = self.op("embed")?;
        let h = hidden as i32;
        launch!(
            self,
            f,
            (t as u32, 1, 1),
            256,
            &tokens,
            &table,
            &seed,
            &scale,
            &x,
            &h
        )
    }

    /// RMSNorm of `rows` rows of `x` (f32) times `w` (f32) into `out` (bf16).
    pub fn rms_norm(
        &self,
        x: u64,
        w: u64,
        out: u64,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        let f = self.op("rms_norm")?;
        let d = dim as i32;
        // A float4 of the row per thread (up to 4 each past 4,096 dims).
        let threads = (dim.div_ceil(4).div_ceil(32) * 32).clamp(32, 1024) as u32;
        launch!(self, f, (rows as u32, 1, 1), threads, &x, &w, &out, &d, &eps)
    }

    /// RoPE of `t` rows of `qkv` (row `i`: slot `row_slot[i]`, position `row_pos[i]`);
    /// queries to `q` (f32), keys and values to their paged cache rows (bf16, or fp8 with row
    /// scales where `paged` has them): `paged` is the pool's view for retrieval heads and its
    /// view for streaming heads ([`crate::paged::PagedLayout::streaming_args`]; the same
    /// view twice where both kinds keep one type).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_append(
        &self,
        qkv: u64,
        row_slot: u64,
        row_pos: u64,
        inv_freq: u64,
        heads: u64,
        n_heads: usize,
        n_kv: usize,
        head_dim: usize,
        half_split: bool,
        q: u64,
        kc: u64,
        vc: u64,
        t: usize,
        (paged, paged_streaming): (PagedArgs, PagedArgs),
    ) -> Result<()> {
        let f = self.op("rope_append")?;
        let (h, g, d, hs) = (
            n_heads as i32,
            n_kv as i32,
            head_dim as i32,
            i32::from(half_split),
        );
        let threads = (head_dim / 2) as u32;
        launch!(
            self,
            f,
            (t as u32, (n_heads + n_kv) as u32, 1),
            threads,
            &qkv,
            &row_slot,
            &row_pos,
            &inv_freq,
            &heads,
            &h,
            &g,
            &d,
            &hs,
            &q,
            &kc,
            &vc,
            &paged,
            &paged_streaming
        )
    }

    /// `out = bf16(silu(gate) * up)` for `rows` rows of `[gate | up]`.
    pub fn silu_mul(&self, gu: u64, out: u64, rows: usize, inter: usize) -> Result<()> {
        let f = self.op("silu_mul")?;
        let (r, i) = (rows as i32, inter as i32);
        let blocks = (rows * inter).div_ceil(256).min(8192) as u32;
        launch!(self, f, (blocks, 1, 1), 256, &gu, &out, &r, &i)
    }

    /// One rank's rows and columns of a bf16 matrix of `in_cols` columns at `input`:
    /// `out[i][j] = in[rows[i]][cols[j]]` (every row or column where `None`), as a new
    /// buffer ([`crate::shard::gather_rows_cols`] on the host).
    pub fn gather_bf16(&self, input: &CudaSlice<u16>, in_cols: usize, rows: Option<&[u32]>, cols: Option<&[u32]>) -> Result<CudaSlice<u16>> {
        let in_rows = input.len() / in_cols.max(1);
        let all = |n: usize| (0..n as u32).collect::<Vec<u32>>();
        let rows = rows.map_or_else(|| all(in_rows), <[u32]>::to_vec);
        let cols = cols.map_or_else(|| all(in_cols), <[u32]>::to_vec);
        if rows.iter().any(|&r| r as usize >= in_rows) || cols.iter().any(|&c| c as usize >= in_cols) {
            return Err(CudaError::Input(format!("a gather outside a {in_rows} x {in_cols} matrix")));
        }
        let to_i32 = |v: &[u32]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        let (r, c) = (self.upload(&to_i32(&rows))?, self.upload(&to_i32(&cols))?);
        let out = self.zeros::<u16>(rows.len() * cols.len())?;
        let f = self.op("gather_bf16")?;
        let (ic, nr, nc) = (in_cols as i64, rows.len() as i32, cols.len() as i32);
        let blocks = (rows.len() * cols.len()).div_ceil(256).clamp(1, 65_535) as u32;
        let (ia, ra, ca, oa) = (self.addr(input), self.addr(&r), self.addr(&c), self.addr(&out));
        launch!(self, f, (blocks, 1, 1), 256, &ia, &ic, &ra, &nr, &ca, &nc, &oa)?;
        // The index buffers are freed when they drop: wait for the kernel first.
        self.sync()?;
        Ok(out)
    }

    /// `*out = argmax(x[..n])` (i32).
    pub fn argmax(&self, x: u64, n: usize, out: u64) -> Result<()> {
        self.argmax_rows(x, n, 1, out)
    }

    /// `out[r] = argmax(x[r * n..(r + 1) * n])` for `rows` rows (i32).
    pub fn argmax_rows(&self, x: u64, n: usize, rows: usize, out: u64) -> Result<()> {
        let f = self.op("argmax")?;
        let n = n as i32;
        launch!(self, f, (rows as u32, 1, 1), 1024, &x, &n, &out)
    }

    /// `dst[pairs[2i]] = pairs[2i + 1]` for `n` pairs (i32): block-table updates.
    pub fn scatter_i32(&self, dst: u64, pairs: u64, n: usize) -> Result<()> {
        let f = self.op("scatter_i32")?;
        let n = n as i32;
        launch!(
            self,
            f,
            (((n as u32).div_ceil(256)).max(1), 1, 1),
            256,
            &dst,
            &pairs,
            &n
        )
    }

    /// Moves the ring rows of positions `first..first + count` of every streaming head of
    /// `slot` between its ring (of `cap` rows) and `scratch`: out of the ring when
    /// `to_scratch`, into it otherwise. A key row is `row_bytes` bytes, a value row
    /// `v_row_bytes` (both even; `scratch` holds rows of `row_bytes`); a quantised cache's
    /// row scales move too (after the rows in `scratch`).
    #[allow(clippy::too_many_arguments)]
    pub fn ring_move(
        &self,
        kc: u64,
        vc: u64,
        scratch: u64,
        paged: PagedArgs,
        n_streaming: usize,
        slot: usize,
        cap: usize,
        sink: usize,
        first: usize,
        count: usize,
        (row_bytes, v_row_bytes): (usize, usize),
        to_scratch: bool,
    ) -> Result<()> {
        if n_streaming == 0 || count == 0 {
            return Ok(());
        }
        let f = self.op("ring_move")?;
        let (sl, c, sk, fi, co, hd, vd, ts) = (
            slot as i32,
            cap as i32,
            sink as i32,
            first as i32,
            count as i32,
            (row_bytes / 2) as i32,
            (v_row_bytes / 2) as i32,
            i32::from(to_scratch),
        );
        launch!(
            self,
            f,
            (n_streaming as u32, 2, 1),
            128,
            &kc,
            &vc,
            &scratch,
            &paged,
            &sl,
            &c,
            &sk,
            &fi,
            &co,
            &hd,
            &vd,
            &ts
        )
    }

    /// `n` seeded uniform values in `[-1, 1)` times 256 as e4m3 bytes at `out` (a synthetic
    /// fp8 cache whose rows have the scale 2^-8).
    pub fn fill_uniform_e4m3(&self, out: u64, n: usize, seed: u64) -> Result<()> {
        let f = self.op("fill_uniform_e4m3")?;
        let n64 = n as u64;
        launch!(self, f, (4096, 1, 1), 256, &out, &n64, &seed)
    }

    /// Seeded random keys and values for `rows` cache rows of `head_dim` (a `kv` cache: bf16
    /// values in [-1, 1), or bytes with every row's scale word at `scales`), for measurements
    /// whose timing does not depend on what the cache says. Each side as its type holds it
    /// ([`KvType::key`], [`KvType::value`]).
    #[allow(clippy::too_many_arguments)]
    pub fn fill_synthetic_rows(
        &self,
        kv: KvType,
        (keys, values): (u64, u64),
        (kscale, vscale): (u64, u64),
        rows: usize,
        head_dim: usize,
        (sk, sv): (u64, u64),
    ) -> Result<()> {
        self.fill_synthetic_side(kv.key(), keys, kscale, rows, head_dim, sk)?;
        self.fill_synthetic_side(kv.value(), values, vscale, rows, head_dim, sv)
    }

    /// One side (keys or values) of [`Gpu::fill_synthetic_rows`] in a cache of type `ty`.
    pub(crate) fn fill_synthetic_side(&self, ty: KvType, data: u64, scales: u64, rows: usize, head_dim: usize, seed: u64) -> Result<()> {
        let elems = rows * head_dim;
        match ty {
            // Random codes; every row's scale 2^-8.
            KvType::Fp8 | KvType::Int8 => {
                self.fill_uniform_e4m3(data, elems, seed)?;
                self.fill_f32(scales, rows, 1.0 / 256.0)
            }
            // Random codes; every row steps by 1/8 from -1 (the word of f16 0.125 and -1).
            KvType::Int4 => {
                self.fill_uniform_e4m3(data, elems / 2, seed)?;
                self.fill_f32(scales, rows, f32::from_bits(0xbc00_3000))
            }
            KvType::Bf16 => self.fill_uniform(data, elems, seed, 1.0),
            KvType::F32 | KvType::K8V4 => Err(CudaError::Input(
                "synthetic caches are bf16 or bytes".into(),
            )),
        }
    }

    /// `n` copies of `value` (f32) at `out`.
    pub fn fill_f32(&self, out: u64, n: usize, value: f32) -> Result<()> {
        let f = self.op("fill_f32")?;
        let n64 = n as u64;
        launch!(self, f, (1024, 1, 1), 256, &out, &n64, &value)
    }

    /// Copies `n` whole blocks, of `k_elems` 16-bit words each for keys and `v_elems` for
    /// values (multiples of 8): block `pairs[2i]` of the source keys and values to block
    /// `pairs[2i + 1]` of the destination's.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_blocks(
        &self,
        src_k: u64,
        src_v: u64,
        dst_k: u64,
        dst_v: u64,
        pairs: u64,
        n: usize,
        (k_elems, v_elems): (usize, usize),
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let f = self.op("copy_blocks")?;
        let (e, ve) = (k_elems as i64, v_elems as i64);
        launch!(
            self,
            f,
            (n as u32, 2, 1),
            256,
            &src_k,
            &src_v,
            &dst_k,
            &dst_v,
            &pairs,
            &e,
            &ve
        )
    }

    /// `y[t, out] = x[t, in] W[out, in]^T + beta * y`: bf16 inputs, f32 accumulation, `y` in
    /// f32 or (`y_bf16`) bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        x: u64,
        w: u64,
        y: u64,
        t: usize,
        in_dim: usize,
        out_dim: usize,
        beta: f32,
        y_bf16: bool,
    ) -> Result<()> {
        let y_type = if y_bf16 {
            blas_sys::cudaDataType_t::CUDA_R_16BF
        } else {
            blas_sys::cudaDataType_t::CUDA_R_32F
        };
        let alpha = 1.0f32;
        // Column-major view: Y^T (out x t) = W (out x in, stored as in x out) ^T * X^T (in x t).
        // SAFETY: the caller's buffers hold t*in, out*in bf16 and t*out f32 values.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                out_dim as i32,
                t as i32,
                in_dim as i32,
                (&alpha as *const f32).cast(),
                w as *const std::ffi::c_void,
                blas_sys::cudaDataType_t::CUDA_R_16BF,
                in_dim as i32,
                x as *const std::ffi::c_void,
                blas_sys::cudaDataType_t::CUDA_R_16BF,
                in_dim as i32,
                (&beta as *const f32).cast(),
                y as *mut std::ffi::c_void,
                y_type,
                out_dim as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
        .map_err(driver)
    }

    /// Whether [`Gpu::gemv_fused`] takes `t` rows of `in_dim` values from `input`.
    pub fn gemv_takes(t: usize, in_dim: usize, input: GemvInput) -> bool {
        let rows_bytes = t * in_dim * 2;
        (1..=GEMV_ROWS).contains(&t)
            && in_dim.is_multiple_of(8)
            && match input {
                GemvInput::Bf16(_) => true,
                GemvInput::Normed { .. } => rows_bytes <= GEMV_SMEM,
                GemvInput::SiluOf(_) => gemv_fits_block(gemv_ring_bytes(), rows_bytes),
            }
    }

    /// `out = in W^T` for 1 to [`GEMV_ROWS`] rows by duo's own matrix-vector kernel (the
    /// weights `w`, bf16 `[out_dim, in_dim]`, streamed once; `in_dim` a multiple of 8), with
    /// the RMSNorm before it ([`GemvInput::Normed`]), the SiLU after it
    /// ([`GemvOutput::SiluPairs`], `out_dim` the gate and up rows together) or the SiLU before
    /// it ([`GemvInput::SiluOf`]) folded in.
    /// A row's sums have one order whatever the row count, so a decode row's product does
    /// not depend on its neighbours. Launched as a programmatic dependent of the kernel
    /// before it ([`gemv_programmatic`]).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_fused(&self, input: GemvInput, w: u64, out: GemvOutput, t: usize, in_dim: usize, out_dim: usize) -> Result<()> {
        if !Self::gemv_takes(t, in_dim, input) || (matches!(out, GemvOutput::SiluPairs(_)) && !out_dim.is_multiple_of(2)) {
            return Err(CudaError::Input(format!(
                "gemv takes 1 to {GEMV_ROWS} rows of a multiple of 8 values ({t} rows of {in_dim}; normed rows at most {GEMV_SMEM} bytes of bf16, SiLU input rows as many as fit a block's {BLOCK_SMEM} bytes beside the rings), an even width for SiLU pairs ({out_dim})"
            )));
        }
        let f = self.op("gemv_fused")?;
        // Normalised rows and SiLU input rows always sit in shared memory, bf16 rows where
        // they fit beside the rings of one block (then fewer blocks a multiprocessor, below:
        // read from the L2 by every warp instead, down's four 14,336-wide rows ran at 0.17x
        // of cuBLAS's speed in session 26; staged at one block, 0.41x in session 27).
        let (ring, rows_bytes) = (gemv_ring_bytes(), t * in_dim * 2);
        // (stage: 0 none, 1 the bf16 rows copied, 2 their SiLU computed into shared memory.)
        let (x, norm, eps, stage_x) = match input {
            GemvInput::Bf16(x) => (x, 0u64, 0f32, i32::from(gemv_fits_block(ring, rows_bytes))),
            GemvInput::SiluOf(gu) => (gu, 0, 0.0, 2),
            GemvInput::Normed { x, norm, eps } => (x, norm, eps, 0),
        };
        let staged = stage_x != 0 || norm != 0;
        let staged_bytes = if staged { rows_bytes } else { 0 };
        let smem = ring + staged_bytes;
        let (y, beta, mode) = match out {
            GemvOutput::F32 { y, beta } => (y, beta, 0i32),
            GemvOutput::Bf16(y) => (y, 0.0, 1),
            GemvOutput::SiluPairs(y) => (y, 0.0, 2),
        };
        if !gemv_fits_block(ring, staged_bytes) {
            return Err(CudaError::Input(format!(
                "gemv's rings ({ring} bytes: DUO_GEMV_STAGES x DUO_GEMV_UNROLL too large) and {t} rows of {in_dim} exceed a block's {BLOCK_SMEM} bytes of shared memory"
            )));
        }
        if smem + GEMV_STATIC_SMEM > 48 << 10 {
            allow_dynamic_smem(&f, smem)?;
        }
        let units = if mode == 2 { out_dim / 2 } else { out_dim };
        // As many blocks as fit at once (a multiprocessor's 228 KiB, 1 KiB of it the
        // system's per block), at most GEMV_BLOCKS each.
        let per_sm = gemv_blocks().min(SMEM_PER_SM / (smem + SMEM_PER_BLOCK_RESERVED)).max(1);
        let blocks = units.div_ceil(8).min(per_sm * self.sms).max(1) as u32;
        let (rows, i, o) = (t as i32, in_dim as i32, out_dim as i32);
        launch_dependent!(gemv_programmatic(); smem smem as u32; self, f, (blocks, 1, 1), 256, &x, &norm, &eps, &w, &y, &rows, &i, &o, &beta, &mode, &stage_x)
    }

    fn decode_kernels(
        &self,
        group: usize,
        head_dim: usize,
        kv: KvType,
        kernel: DecodeKernel,
    ) -> Result<DecodeKernels> {
        let mut cache = self.decode.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, k)) = cache
            .iter()
            .find(|(key, _)| *key == (group, head_dim, kv, kernel))
        {
            return Ok(k.clone());
        }
        let (source, options) = decode_source(group, head_dim, kv, kernel);
        let m = self
            .ctx
            .load_module(compile(&source, "decode_attention", options)?)
            .map_err(driver)?;
        let partial = m
            .load_function(if kernel == DecodeKernel::Tensor {
                "duo_decode_partial_tc"
            } else {
                "duo_decode_partial"
            })
            .map_err(driver)?;
        if kernel == DecodeKernel::Tensor {
            // Three stages of K and V tiles exceed the 48 KiB a kernel gets without asking.
            allow_dynamic_smem(&partial, tensor_smem_bytes(head_dim, group, kv))?;
        }
        let k = (
            partial,
            m.load_function("duo_decode_merge").map_err(driver)?,
        );
        cache.push(((group, head_dim, kv, kernel), k.clone()));
        Ok(k)
    }

    /// The per-block record of the tensor-core partial kernel for this shape, compiled with
    /// `DUO_DECODE_TRACE=1` (a measurement, never on otherwise): its first `blocks` blocks'
    /// (multiprocessor, first and last instant in ns, cycles to its first tile, cycles to its
    /// end), each as the last launch since a clear left it (all zero: no block wrote it, as one
    /// past a row's keys); at most 4,096 blocks are kept. `clear` zeroes the record instead (and
    /// returns none).
    pub fn decode_trace(&self, group: usize, head_dim: usize, kv: KvType, blocks: usize, clear: bool) -> Result<Vec<[u64; 5]>> {
        if !crate::decode_attention::decode_trace() {
            return Err(CudaError::Input("decode_trace needs DUO_DECODE_TRACE=1".into()));
        }
        let (partial, _) = self.decode_kernels(group, head_dim, kv, DecodeKernel::Tensor)?;
        self.sync()?;
        let mut module = std::ptr::null_mut();
        // SAFETY: the function's module lives in the kernel cache as long as `self`; the
        // record is a plain device array of 5 x 4096 u64 (`duo_trace` in the kernel).
        unsafe {
            cudarc::driver::sys::cuFuncGetModule(&mut module, partial.cu_function()).result().map_err(driver)?;
            let name = std::ffi::CString::new("duo_trace").expect("no NUL");
            let (ptr, bytes) = cudarc::driver::result::module::get_global(module, name).map_err(driver)?;
            if clear {
                cudarc::driver::result::memset_d8_sync(ptr, 0, bytes).map_err(driver)?;
                // (On the legacy stream, which this context's own stream does not wait for.)
                self.ctx.synchronize().map_err(driver)?;
                return Ok(Vec::new());
            }
            let mut raw = vec![0u64; bytes / 8];
            cudarc::driver::result::memcpy_dtoh_sync(&mut raw, ptr).map_err(driver)?;
            Ok(raw.chunks_exact(5).take(blocks).map(|c| [c[0], c[1], c[2], c[3], c[4]]).collect())
        }
    }

    /// One decode step of attention for a layer and `a.rows` sequences (row `b`: slot
    /// `row_slot[b]` at position `row_pos[b]`): partials over `a.blocks()` blocks a row,
    /// then the merge into `out = Some((f32 out or 0, bf16 out or 0))`; `None` leaves the
    /// merge out (the partials only: for timing the partial kernel alone). `parts`: the
    /// partials' maxima, sums and values (`a.n_splits` slots per row and query head).
    /// `paged` is the pool's view for retrieval heads and its view for streaming heads
    /// ([`crate::paged::PagedLayout::streaming_args`]), which `a.streaming`'s launch reads.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention(
        &self,
        a: &DecodeLaunch,
        q: u64,
        kc: u64,
        vc: u64,
        heads: u64,
        row_slot: u64,
        row_pos: u64,
        (paged, paged_streaming): (PagedArgs, PagedArgs),
        parts: (u64, u64, u64),
        out: Option<(u64, u64)>,
    ) -> Result<()> {
        if !a.kernel.fits(a.head_dim, a.group, a.kv) {
            return Err(CudaError::Input(format!(
                "{:?} does not suit {} query heads per KV head of {} dims ({:?})",
                a.kernel, a.group, a.head_dim, a.kv
            )));
        }
        if a.kv.is_quantised() != (paged.kscale != 0) {
            return Err(CudaError::Input(format!(
                "decode attention over a {:?} cache (row scales given: {})",
                a.kv,
                paged.kscale != 0
            )));
        }
        let (_, merge) = self.decode_kernels(a.group, a.head_dim, a.kv, a.kernel)?;
        let (ns, n_kv, retrieval) = (a.n_splits as i32, a.n_kv as i32, a.retrieval);
        let (short_splits, short_split) = (a.short_splits as i32, a.short_split as i32);
        let (pm, pl, pa) = parts;
        let pdl = programmatic_launch();
        let rows = a.rows as u32;
        // A listed layer's blocks in grid x (the kernels' `block_work`); else (KV heads, splits).
        let whole = if a.short_split == 0 { (a.n_kv as u32, a.n_splits as u32, rows) } else { (a.blocks() as u32, 1, rows) };
        match a.streaming {
            None => self.decode_partials(a, (a.kv, a.kernel), (q, kc, vc, heads, row_slot, row_pos), paged, parts, whole, 0)?,
            Some(st) => {
                let inputs = (q, kc, vc, heads, row_slot, row_pos);
                let listed = a.retrieval.count_ones() as usize * a.n_splits;
                if a.short_split == 0 || listed == 0 {
                    // A layer of streaming heads only (unlisted where DecodeLaunch::with_streaming_type
                    // allows it): one launch by their type's kernel.
                    self.decode_partials(a, (st.kv, st.kernel), inputs, paged_streaming, parts, whole, 0)?;
                } else {
                    // The list's retrieval entries, then its streaming ones, each by its
                    // type's kernel. (The streaming launch on a second stream beside the
                    // retrieval one, event-ordered, measured no faster: BENCHMARKS.md, session 22.)
                    self.decode_partials(a, (a.kv, a.kernel), inputs, paged, parts, (listed as u32, 1, rows), 0)?;
                    self.decode_partials(a, (st.kv, st.kernel), inputs, paged_streaming, parts, ((a.blocks() - listed) as u32, 1, rows), listed as i32)?;
                }
            }
        }
        let Some((out, out_bf16)) = out else { return Ok(()) };
        let threads = if crate::decode_attention::merge_wide() { crate::decode_attention::merge_block(a.head_dim) } else { a.head_dim } as u32;
        launch_dependent!(pdl; smem 0;
            self,
            merge,
            ((a.rows * a.n_kv * a.group) as u32, 1, 1),
            threads,
            &pm,
            &pl,
            &pa,
            &ns,
            &n_kv,
            &retrieval,
            &short_splits,
            &short_split,
            &out,
            &out_bf16
        )
    }

    /// One partial launch of `a` by the kernel for `kv` (`(type, kernel)`) over `paged`'s view:
    /// `grid`, its blocks entries `block0..` of the layer's list (`block_work`).
    #[allow(clippy::too_many_arguments)]
    fn decode_partials(
        &self,
        a: &DecodeLaunch,
        (kv, kernel): (KvType, DecodeKernel),
        (q, kc, vc, heads, row_slot, row_pos): (u64, u64, u64, u64, u64, u64),
        paged: PagedArgs,
        (pm, pl, pa): (u64, u64, u64),
        grid: (u32, u32, u32),
        block0: i32,
    ) -> Result<()> {
        if !kernel.fits(a.head_dim, a.group, kv) {
            return Err(CudaError::Input(format!("{kernel:?} does not suit {} query heads per KV head of {} dims ({kv:?})", a.group, a.head_dim)));
        }
        let (partial, _) = self.decode_kernels(a.group, a.head_dim, kv, kernel)?;
        let (split, ns, n_kv, retrieval) = (a.split as i32, a.n_splits as i32, a.n_kv as i32, a.retrieval);
        let (short_splits, short_split) = (a.short_splits as i32, a.short_split as i32);
        let (lead, tail) = (a.lead_splits as i32, a.tail_split as i32);
        let pdl = programmatic_launch();
        if kernel == DecodeKernel::Tensor {
            let (scale_log2, smem) = (std::f32::consts::LOG2_E / (a.head_dim as f32).sqrt(), tensor_smem_bytes(a.head_dim, a.group, kv) as u32);
            launch_dependent!(pdl; smem smem; self, partial, grid, 128, &q, &kc, &vc, &heads, &row_slot, &row_pos, &paged, &split, &ns, &n_kv, &retrieval, &short_splits, &short_split, &block0, &lead, &tail, &scale_log2, &pm, &pl, &pa)
        } else {
            let scale = 1.0 / (a.head_dim as f32).sqrt();
            launch_dependent!(pdl; smem 0;
                self, partial, grid, 128, &q, &kc, &vc, &heads, &row_slot, &row_pos, &paged,
                &split, &ns, &n_kv, &retrieval, &short_splits, &short_split, &block0, &lead, &tail, &scale, &pm, &pl, &pa
            )
        }
    }

    /// Launches `f` as a programmatic dependent of the kernel before it in the stream
    /// (`cuLaunchKernelEx` with programmatic stream serialization; `params` point at the
    /// kernel's arguments in order). Its blocks may start before that kernel has finished:
    /// `f` must `pdl_wait()` before reading what that kernel wrote. Captured into a CUDA
    /// graph, the launch becomes a programmatic edge.
    pub(crate) fn launch_programmatic(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        params: &mut [*mut std::ffi::c_void],
    ) -> Result<()> {
        use cudarc::driver::sys;
        self.ctx.bind_to_thread().map_err(driver)?;
        // SAFETY: a zeroed attribute is a valid plain-data value; the id and its field are set.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block.0,
            blockDimY: block.1,
            blockDimZ: block.2,
            sharedMemBytes: smem,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: `params` points at values of the kernel's argument types, in its order
        // (the callers' `launch_dependent!` lists them as `launch!` would); the config and
        // attribute outlive the call.
        unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(driver)
    }

    fn prefill_kernel(&self, head_dim: usize, kv: KvType) -> Result<CudaFunction> {
        let mut cache = self.prefill.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, k)) = cache.iter().find(|(key, _)| *key == (head_dim, kv)) {
            return Ok(k.clone());
        }
        let m = self
            .ctx
            .load_module(compile(
                &prefill_source(),
                "prefill_attention",
                prefill_options(head_dim, kv),
            )?)
            .map_err(driver)?;
        let k = m.load_function("duo_prefill_attention").map_err(driver)?;
        // Two stages of K and V tiles exceed the 48 KiB a kernel gets without asking.
        allow_dynamic_smem(&k, prefill_smem_bytes(head_dim, kv))?;
        cache.push(((head_dim, kv), k.clone()));
        Ok(k)
    }

    /// Prefill attention of `t` queries (`q`, f32 `[t, n_heads * head_dim]`) of the sequence
    /// `state = [slot, first position]` over its paged cache (bf16, or a byte cache with the
    /// row scales `paged` points to; `kv_bytes` the size of the keys' buffer, which the bulk
    /// copies' tensor maps bound) into `out` (bf16, same shape), by `kernel`
    /// ([`Gpu::prefill_kernel_for`] picks the default; the parity checks run both).
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_attention(
        &self,
        kernel: PrefillKernel,
        q: u64,
        kc: u64,
        vc: u64,
        kv_bytes: usize,
        heads: u64,
        state: u64,
        paged: PagedArgs,
        t: usize,
        n_heads: usize,
        group: usize,
        head_dim: usize,
        kv: KvType,
        out: u64,
    ) -> Result<()> {
        if kernel == PrefillKernel::Wgmma && !self.wgmma_prefill_runs(head_dim, kv) {
            return Err(CudaError::Input(format!(
                "the wgmma prefill kernel takes bf16 and quantised caches (these in its warp-specialised forms) with heads of 64 or 128 on compute capability 9.x (a {kv:?} cache, heads of {head_dim}, Hopper: {})",
                self.hopper
            )));
        }
        if kv == KvType::F32 || kv.is_quantised() != (paged.kscale != 0) {
            return Err(CudaError::Input(format!(
                "prefill attention over a {kv:?} cache (row scales given: {})",
                paged.kscale != 0
            )));
        }
        let (tt, h, g) = (t as i32, n_heads as i32, group as i32);
        let scale_log2 = std::f32::consts::LOG2_E / (head_dim as f32).sqrt();
        let grid = (t.div_ceil(128) as u32, n_heads as u32, 1);
        if kernel == PrefillKernel::Wgmma {
            let f = self.prefill_wg_kernel(head_dim, kv)?;
            let smem = prefill_wg_smem_bytes(head_dim, kv) as u32;
            let threads = if prefill_wg_specialised() > 0 { 384 } else { 256 };
            // The cache's rows: shared row lookups keep them as 32-bit numbers, the bulk
            // copies' tensor maps are bounded by them.
            let rows = kv_bytes / kv.key_bytes_for(head_dim);
            if prefill_wg_shared_rows(kv) && rows > u32::MAX as usize {
                return Err(CudaError::Input(format!(
                    "the prefill kernel's shared row lookups (DUO_PREFILL_SHARED_ROWS=0 turns them off) take caches of at most {} rows ({kv_bytes} bytes of {kv:?} keys given)",
                    u32::MAX
                )));
            }
            if prefill_wg_tma(kv) {
                // A view whose key rows are spaced out (bf16 windows beside K8V4) has that many
                // times fewer value rows than the key bytes hold.
                let (tk, tv) = (TensorMap::rows_of(kc, rows, head_dim)?, TensorMap::rows_of(vc, rows >> paged.key_shift, head_dim)?);
                return launch!(smem smem; self, f, grid, threads, &q, &kc, &vc, &heads, &state, &paged, &tt, &h, &g, &scale_log2, &out, &tk, &tv);
            }
            return launch!(smem smem; self, f, grid, threads, &q, &kc, &vc, &heads, &state, &paged, &tt, &h, &g, &scale_log2, &out);
        }
        let f = self.prefill_kernel(head_dim, kv)?;
        let smem = prefill_smem_bytes(head_dim, kv) as u32;
        launch!(smem smem; self, f, grid, 128, &q, &kc, &vc, &heads, &state, &paged, &tt, &h, &g, &scale_log2, &out)
    }

    /// The prefill kernel for a `kv` cache with heads of `head_dim`: [`PrefillKernel::Wgmma`]
    /// where it runs (bf16: its warp-specialised form with swizzled 128-key tiles brought by
    /// TMA, 641-739 against 272-291 TFLOPS for the `mma.sync` kernel on the H200; quantised
    /// caches, its raw-ring form: a 128K k8v4 prefill 18.0 s against 22.6 s, BENCHMARKS.md)
    /// unless `DUO_PREFILL_WG=0` (or, for quantised caches only,
    /// `DUO_PREFILL_WG_QUANTISED=0`), else [`PrefillKernel::Mma`].
    /// Where the wgmma kernel cannot be made here (NVRTC or the driver refuses it, or the
    /// driver's compiler gives it other than the 168 registers per thread its warpgroups
    /// share out), a warning says why, once, and the `mma.sync` kernel runs instead.
    pub fn prefill_kernel_for(&self, head_dim: usize, kv: KvType) -> PrefillKernel {
        let tuning = crate::decode_attention::tuning;
        let quantised_off = kv.is_quantised() && tuning("DUO_PREFILL_WG_QUANTISED") == Some(0);
        if !self.wgmma_prefill_runs(head_dim, kv) || tuning("DUO_PREFILL_WG") == Some(0) || quantised_off {
            return PrefillKernel::Mma;
        }
        match self.prefill_wg_kernel(head_dim, kv) {
            Ok(_) => PrefillKernel::Wgmma,
            Err(_) => PrefillKernel::Mma,
        }
    }

    /// Whether [`PrefillKernel::Wgmma`] takes a `kv` cache with heads of `head_dim` here:
    /// heads of 64 or 128, compute capability 9.x, a bf16 cache, or a quantised one (fp8,
    /// int8, int4, K8V4) where the kernel is warp-specialised (`DUO_PREFILL_WS` 1 or 2: its
    /// copying warpgroup dequantises the tiles).
    pub fn wgmma_prefill_runs(&self, head_dim: usize, kv: KvType) -> bool {
        let cache = kv == KvType::Bf16 || (kv.is_quantised() && prefill_wg_specialised() > 0);
        self.hopper && cache && matches!(head_dim, 64 | 128)
    }

    fn prefill_wg_kernel(&self, head_dim: usize, kv: KvType) -> Result<CudaFunction> {
        let mut cache = self.prefill_wg.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, made)) = cache.iter().find(|(key, _)| *key == (head_dim, kv)) {
            return made.clone().map_err(CudaError::Input);
        }
        let made = self.make_prefill_wg_kernel(head_dim, kv).map_err(|e| e.to_string());
        if let Err(why) = &made {
            tracing::warn!("the Hopper prefill kernel for heads of {head_dim} over a {kv:?} cache cannot run here ({why}); prefill uses the mma.sync kernel");
        }
        cache.push(((head_dim, kv), made.clone()));
        made.map_err(CudaError::Input)
    }

    fn make_prefill_wg_kernel(&self, head_dim: usize, kv: KvType) -> Result<CudaFunction> {
        let ptx = compile_for(
            "sm_90a",
            &prefill_wg_source(head_dim, prefill_wg_keys_per_tile(), kv),
            "prefill_attention_wg",
            prefill_wg_options(head_dim, kv),
            true,
        )?;
        let m = self.ctx.load_module(ptx).map_err(driver)?;
        let k = m.load_function("duo_prefill_attention_wg").map_err(driver)?;
        allow_dynamic_smem(&k, prefill_wg_smem_bytes(head_dim, kv))?;
        // The warp-specialised forms move registers between warpgroups (40 to the copying
        // one, 232 to each computing one): that needs exactly 168 per thread at launch, or
        // the computing warpgroups would wait for registers forever.
        if prefill_wg_specialised() > 0 {
            // SAFETY: `k` is a function of a loaded module; reading an attribute changes nothing.
            let regs = unsafe {
                cudarc::driver::result::function::get_function_attribute(
                    k.cu_function(),
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NUM_REGS,
                )
            }
            .map_err(driver)?;
            if regs != 168 {
                return Err(CudaError::Input(format!(
                    "the warp-specialised prefill kernel (DUO_PREFILL_WS={}) was built with {regs} registers per thread; it needs 168",
                    prefill_wg_specialised()
                )));
            }
        }
        Ok(k)
    }

    /// Dequantises `n` values of type `ty` from the raw GGUF blocks at `src` into bf16 at `out`.
    pub fn dequant_bf16(
        &self,
        src: u64,
        out: u64,
        n: usize,
        ty: crate::dequant::QuantType,
    ) -> Result<()> {
        let f = {
            let mut cached = self.dequant.lock().unwrap_or_else(|p| p.into_inner());
            match cached.as_ref() {
                Some(f) => f.clone(),
                None => {
                    let m = self
                        .ctx
                        .load_module(compile(crate::dequant::SOURCE, "dequant", vec![])?)
                        .map_err(driver)?;
                    let f = m.load_function("dequant_bf16").map_err(driver)?;
                    *cached = Some(f.clone());
                    f
                }
            }
        };
        let (n64, kind) = (n as u64, ty.code());
        let blocks = n.div_ceil(256).min(65_535 * 8) as u32;
        launch!(self, f, (blocks.max(1), 1, 1), 256, &src, &out, &n64, &kind)
    }

    /// Gives cuBLAS a fixed workspace, so that captured products allocate nothing.
    fn set_blas_workspace(&self, ptr: u64, bytes: usize) -> Result<()> {
        // SAFETY: `ptr` is a live allocation of `bytes` owned by the caller for as long as
        // products run with this handle.
        let status = unsafe {
            blas_sys::cublasSetWorkspace_v2(
                *self.blas.handle(),
                ptr as *mut std::ffi::c_void,
                bytes,
            )
        };
        if status == blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            Ok(())
        } else {
            Err(CudaError::Driver(format!("cublasSetWorkspace: {status:?}")))
        }
    }

    /// Device-to-device copy bandwidth in bytes per second (bytes read plus bytes written, per
    /// second), from copies of 2 GiB: the bandwidth floor of a step is the bytes it must read
    /// divided by this.
    pub fn copy_bandwidth(&self) -> Result<f64> {
        let n = 1usize << 30; // 2 GiB of u16
        let src = self.zeros::<u16>(n)?;
        let mut dst = self.zeros::<u16>(n)?;
        self.stream.memcpy_dtod(&src, &mut dst).map_err(driver)?;
        self.sync()?;
        let reps = 10;
        let started = std::time::Instant::now();
        for _ in 0..reps {
            self.stream.memcpy_dtod(&src, &mut dst).map_err(driver)?;
        }
        self.sync()?;
        Ok((2 * 2 * n * reps) as f64 / started.elapsed().as_secs_f64())
    }
}

/// The Hopper prefill kernel's shared memory: [`prefill_wg_stages`] stages of a K and V tile
/// of [`prefill_wg_keys_per_tile`] keys (and, warp-specialised, two mbarriers per stage);
/// over a quantised cache also the raw ring ([`prefill_wg_raw_bytes`]), and with shared row
/// lookups a tile's rows ([`prefill_wg_shared_rows_bytes`]).
fn prefill_wg_smem_bytes(head_dim: usize, kv: KvType) -> usize {
    let bk = prefill_wg_keys_per_tile();
    let barriers = if prefill_wg_specialised() > 0 { 16 } else { 0 };
    // And 1,024 bytes for the kernel to start its tiles at a 1,024-byte boundary.
    prefill_wg_stages(head_dim, kv) * (2 * bk * head_dim * 2 + barriers)
        + prefill_wg_raw_bytes(head_dim, kv)
        + prefill_wg_shared_rows_bytes(kv)
        + 1024
}

/// The raw ring's slots over a quantised cache (`DUO_PREFILL_RAW_SLOTS`: 2, the default, or 1,
/// which leaves room for a third stage of 128-key tiles with heads of 128; the kernel's
/// `WG_RAW_SLOTS`).
fn prefill_wg_raw_slots() -> usize {
    if crate::decode_attention::tuning("DUO_PREFILL_RAW_SLOTS") == Some(1) {
        1
    } else {
        2
    }
}

/// Whether the Hopper prefill kernel's copying warpgroup looks up a tile's rows once into
/// shared memory (warp-specialised forms; the kernel's `WG_SHARED_ROWS`) where the tile is not
/// whole page runs. The default over bf16 (`DUO_PREFILL_SHARED_ROWS=0` turns it off): an
/// all-streaming layer's 16K chunk on the H200 took 1.28 ms without it and 0.60 ms with it,
/// the duo 0.5 layer's at 16K 5.06 and 4.76 ms, full layers the same within the runs' spread
/// (BENCHMARKS.md, session 18). Over quantised caches only with `DUO_PREFILL_SHARED_ROWS=1`:
/// there a full layer's 16K chunk measured slower (k8v4: 21.80 -> 23.88 ms, those forms
/// spilling 36-44 bytes of registers) though an all-streaming one gained (1.44 -> 0.93 ms).
fn prefill_wg_shared_rows(kv: KvType) -> bool {
    let asked = crate::decode_attention::tuning("DUO_PREFILL_SHARED_ROWS");
    prefill_wg_specialised() > 0 && if kv.is_quantised() { asked == Some(1) } else { asked != Some(0) }
}

/// The shared memory of [`prefill_wg_shared_rows`]: a tile's rows as 4-byte indices.
fn prefill_wg_shared_rows_bytes(kv: KvType) -> usize {
    if prefill_wg_shared_rows(kv) {
        prefill_wg_keys_per_tile() * 4
    } else {
        0
    }
}

/// The Hopper prefill kernel's raw ring over a quantised cache (the kernel's `WG_RAW_BYTES`):
/// [`prefill_wg_raw_slots`] slots of a tile's key and value codes and both sides' 4-byte row
/// scales; 0 over bf16.
fn prefill_wg_raw_bytes(head_dim: usize, kv: KvType) -> usize {
    if kv.is_quantised() {
        prefill_wg_raw_slots() * prefill_wg_keys_per_tile() * (kv.key_bytes_for(head_dim) + kv.value_bytes_for(head_dim) + 8)
    } else {
        0
    }
}

/// How the Hopper prefill kernel is organised (`DUO_PREFILL_WS`): 0, two warpgroups that
/// copy and compute in turn; 1, warp-specialised, a copying warpgroup and two computing
/// ones handing stages over by mbarriers; 2 (the default), the same with each tile's
/// `Q K^T` overlapping the previous tile's `P V` and its softmax overlapping that `P V`'s
/// end. On the H200 (Llama-3-8B layer, 16K chunk at 16K / 114K): 0 224 / 227 TFLOPS, 1 327 /
/// 319, 2 with four stages 328 / 338.
fn prefill_wg_specialised() -> u8 {
    crate::decode_attention::tuning("DUO_PREFILL_WS").map_or(2, |n| n.min(2) as u8)
}

/// Pipeline stages of the Hopper prefill kernel for heads of `head_dim` over a `kv` cache
/// (`DUO_PREFILL_WG_STAGES`, 2 to 4): as many as fit, the fastest measured (4 with tiles of 64
/// keys; 3 with tiles of 128 keys, which take 64 KiB a stage for heads of 128; 2 stages of 128
/// unswizzled keys ran at 220 TFLOPS against 336 with 3), fewer where a quantised cache's raw
/// slots leave less of the 227 KiB a block may have.
fn prefill_wg_stages(head_dim: usize, kv: KvType) -> usize {
    let bk = prefill_wg_keys_per_tile();
    let fits = (227 * 1024 - prefill_wg_raw_bytes(head_dim, kv) - prefill_wg_shared_rows_bytes(kv) - 1024) / (2 * bk * head_dim * 2 + 16);
    let most = (if bk == 128 { 3 } else { 4 }).min(fits).max(2);
    crate::decode_attention::tuning("DUO_PREFILL_WG_STAGES").map_or(most, |n| n.clamp(2, most))
}

/// Keys per tile of the Hopper prefill kernel, every cache type (`DUO_PREFILL_WG_BK`: 128, the
/// default, or 64). bf16 with swizzled tiles on the H200 (Llama-3-8B layer, 16K chunk at 16K /
/// 114K): 128 keys 450 / 457 TFLOPS, 64 keys 429 / 440. Quantised caches too, though with
/// heads of 128 only two stages then fit beside the raw ring (a 128K k8v4 prefill of
/// Llama-3-8B: 128 keys in two stages 18.0 s, 64 keys in four 19.1 s).
fn prefill_wg_keys_per_tile() -> usize {
    if crate::decode_attention::tuning("DUO_PREFILL_WG_BK") == Some(64) { 64 } else { 128 }
}

/// Whether the Hopper prefill kernel's tiles are 128-byte swizzled (`DUO_PREFILL_SWIZZLE`,
/// default 1; 0: unswizzled core matrices, the session-15 form).
fn prefill_wg_swizzle() -> bool {
    crate::decode_attention::tuning("DUO_PREFILL_SWIZZLE") != Some(0)
}

/// The Hopper prefill kernel's form for heads of `head_dim` over a `kv` cache as this process
/// builds it (the `DUO_PREFILL_*` knobs read), e.g. "WS=2, 128-key tiles, 3 stages, swizzled":
/// what a measurement's output should name.
pub fn prefill_wg_form(head_dim: usize, kv: KvType) -> String {
    let mut form = format!(
        "WS={}, {}-key tiles, {} stages, {}",
        prefill_wg_specialised(),
        prefill_wg_keys_per_tile(),
        prefill_wg_stages(head_dim, kv),
        if prefill_wg_swizzle() { "swizzled" } else { "unswizzled" }
    );
    for (on, name) in [
        (prefill_wg_pingpong(), "ping-pong"),
        (prefill_wg_tma(kv), "TMA"),
        (prefill_wg_softmax_tree(), "softmax tree"),
        (prefill_wg_shared_rows(kv), "shared rows"),
        (kv.is_quantised() && prefill_wg_raw_slots() == 1, "one raw slot"),
    ] {
        if on {
            form.push_str(", ");
            form.push_str(name);
        }
    }
    form
}

/// Whether whole-page-run tiles of the Hopper prefill kernel come by bulk tensor copies (TMA;
/// bf16 caches with swizzled tiles in a warp-specialised form; the default, measured 1.57-1.61x
/// the copying warps' form on the H200, BENCHMARKS.md; `DUO_PREFILL_TMA=0` turns it off).
fn prefill_wg_tma(kv: KvType) -> bool {
    kv == KvType::Bf16
        && prefill_wg_swizzle()
        && prefill_wg_specialised() > 0
        && crate::decode_attention::tuning("DUO_PREFILL_TMA") != Some(0)
}

/// A CUtensorMap as the kernels take it (by value, `__grid_constant__`): 128 bytes the driver
/// encodes, 64-byte aligned.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct TensorMap([u64; 16]);

// SAFETY: plain bytes, passed by value as the kernel's `TmaMap` parameter.
unsafe impl cudarc::driver::DeviceRepr for TensorMap {}

impl TensorMap {
    /// The map of `rows` bf16 rows of `head_dim` at `base`, read in boxes of 64 rows x 64
    /// values (128 bytes) with the 128-byte swizzle, as the prefill kernel's tiles are laid out.
    fn rows_of(base: u64, rows: usize, head_dim: usize) -> Result<Self> {
        use cudarc::driver::sys;
        // The kernel's row coordinate is a signed 32-bit one.
        if rows == 0 || rows > i32::MAX as usize || !base.is_multiple_of(16) {
            return Err(CudaError::Input(format!("a tensor map over {rows} rows at {base:#x}")));
        }
        let mut map = TensorMap([0; 16]);
        let dims = [head_dim as u64, rows as u64];
        let strides = [(head_dim * 2) as u64];
        let (boxes, steps) = ([64u32, 64], [1u32, 1]);
        // SAFETY: `map` is 128 writable bytes, 64-byte aligned; the arrays hold `rank` (and
        // `rank - 1` strides) entries; the driver only encodes, it reads no device memory.
        unsafe {
            sys::cuTensorMapEncodeTiled(
                (&mut map as *mut TensorMap).cast(),
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                2,
                base as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                steps.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        }
        .result()
        .map_err(driver)?;
        Ok(map)
    }
}

/// Whether the Hopper prefill kernel takes a row's maximum and sum over a tile as four
/// partial results (the default, measured 0.3-1.7% faster with TMA on the H200;
/// `DUO_PREFILL_SOFTMAX_TREE=0` takes one chain).
fn prefill_wg_softmax_tree() -> bool {
    crate::decode_attention::tuning("DUO_PREFILL_SOFTMAX_TREE") != Some(0)
}

/// Whether the two computing warpgroups of the Hopper prefill kernel take turns at the
/// tensor cores (`DUO_PREFILL_PINGPONG=1`; only with `DUO_PREFILL_WS=2`).
fn prefill_wg_pingpong() -> bool {
    prefill_wg_specialised() == 2 && crate::decode_attention::tuning("DUO_PREFILL_PINGPONG") == Some(1)
}

/// The Hopper prefill kernel's NVRTC options for heads of `head_dim` over a `kv` cache.
fn prefill_wg_options(head_dim: usize, kv: KvType) -> Vec<String> {
    let mut o = vec![
        format!("-DHEAD_DIM={head_dim}"),
        format!("-DWG_STAGES={}", prefill_wg_stages(head_dim, kv)),
        format!("-DWS={}", prefill_wg_specialised()),
        format!("-DWG_BK={}", prefill_wg_keys_per_tile()),
        format!("-DPINGPONG={}", u8::from(prefill_wg_pingpong())),
        format!("-DWG_SWIZZLE={}", u8::from(prefill_wg_swizzle())),
        format!("-DWG_TMA={}", u8::from(prefill_wg_tma(kv))),
        format!("-DWG_SOFTMAX_TREE={}", u8::from(prefill_wg_softmax_tree())),
        format!("-DWG_SHARED_ROWS={}", u8::from(prefill_wg_shared_rows(kv))),
        format!("-DWG_RAW_SLOTS={}", prefill_wg_raw_slots()),
    ];
    o.extend(byte_format_option(kv));
    o
}

/// Dynamic shared memory of the prefill kernel: 128 queries and two stages of 64-row K and V
/// tiles, rows padded by 8 elements; over an fp8 cache the stages hold bytes (rows padded by
/// 16; K8V4's value rows padded as its wider key rows) and row scales, and one tile of K
/// and V dequantised to f16 follows.
fn prefill_smem_bytes(head_dim: usize, kv: KvType) -> usize {
    match kv {
        KvType::Fp8 | KvType::Int8 | KvType::Int4 | KvType::K8V4 => {
            128 * (head_dim + 8) * 2
                + 4 * 64 * (kv.key_bytes_for(head_dim) + 16)
                + 4 * 64 * 4
                + 2 * 64 * (head_dim + 8) * 2
        }
        _ => (128 + 4 * 64) * (head_dim + 8) * 2,
    }
}

/// The shape of one layer's decode-attention launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLaunch {
    /// KV heads.
    pub n_kv: usize,
    /// Query heads per KV head.
    pub group: usize,
    /// 64, 128 or 256.
    pub head_dim: usize,
    /// Keys per split of a retrieval head (its lead splits', where `lead_splits` > 0).
    pub split: usize,
    /// A retrieval head's splits, and the partial slots of every head; blocks past a row's
    /// keys exit at once.
    pub n_splits: usize,
    /// Bit `g` set: KV head `g` is a retrieval head (with `short_split` not 0).
    pub retrieval: u64,
    /// A streaming head's splits, each of `short_split` keys: enough for its sinks and
    /// recent window. `short_split` 0: every head is split as a retrieval head (a layer of
    /// retrieval heads only or of more than 64 KV heads, or partial buffers too small).
    pub short_splits: usize,
    /// Keys per split of a streaming head (0: as a retrieval head's).
    pub short_split: usize,
    /// Long splits of a long head before its short ones (0: every split of `split` keys):
    /// splits `lead_splits..` hold `tail_split` keys each ([`crate::decode_attention::Splits`]).
    pub lead_splits: usize,
    /// Keys per split of a long head past its `lead_splits` long ones.
    pub tail_split: usize,
    /// Decode rows, one sequence each (grid z).
    pub rows: usize,
    /// Cache element type.
    pub kv: KvType,
    /// The partial kernel.
    pub kernel: DecodeKernel,
    /// Where the layer's streaming heads keep a type of their own
    /// ([`crate::paged::PagedLayout::split_types`]): their kernel, run over their entries
    /// of the list in a launch of its own ([`DecodeLaunch::with_streaming_type`]).
    pub streaming: Option<StreamingKernel>,
}

/// The streaming heads' launch of a layer whose two kinds of head keep different cache types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamingKernel {
    /// Their cache type.
    pub kv: KvType,
    /// Their partial kernel.
    pub kernel: DecodeKernel,
}

/// Fewest keys per split of a streaming head: one 64-key tile of the tensor-core kernel.
pub const SHORT_SPLIT: usize = 64;

/// Streaming-head blocks a launch aims at: one wave of the bf16 tensor-core kernel on the
/// H200 (132 multiprocessors, two blocks each). A window of 384 keys walked by one block
/// took longer than a long head's split (at 32K tokens, one row, a duo 0.5 decode step of
/// Llama-3-8B 5.78 ms against 5.39 in 64-key splits, BENCHMARKS.md session 19), but with
/// many rows one block per window already fills the card, and more only add blocks (64 rows
/// x 4K: 0.162 ms a launch in one split, 0.171 in tiles).
const STREAMING_BLOCKS: usize = 264;

impl DecodeLaunch {
    /// A layer's launch: heads `kinds` (true = retrieval), `(group, head_dim, rows, kv,
    /// kernel)`, retrieval heads in `n_splits` splits of `split` keys, each streaming head
    /// showing at most `short_len` keys, in splits of a multiple of [`SHORT_SPLIT`] keys,
    /// as many as keep `streaming_rows` rows' streaming blocks within [`STREAMING_BLOCKS`],
    /// where the partial buffers hold `max_slots` slots per head (else as a retrieval head).
    /// A pool passes its own constants (its window, its most sequences, its buffers' slots for
    /// its largest batch), never the step's rows or lengths: a row's splits, and so its
    /// rounding, must not depend on its neighbours.
    pub fn for_layer(
        kinds: &[bool],
        (group, head_dim, rows, kv, kernel): (usize, usize, usize, KvType, DecodeKernel),
        split: usize,
        n_splits: usize,
        short_len: usize,
        streaming_rows: usize,
        max_slots: usize,
    ) -> Self {
        let streaming = kinds.iter().filter(|&&r| !r).count().max(1);
        let tiles = short_len.div_ceil(SHORT_SPLIT).max(1);
        let want = (STREAMING_BLOCKS / (streaming_rows.max(1) * streaming)).clamp(1, tiles);
        let short_split = tiles.div_ceil(want) * SHORT_SPLIT;
        let short_splits = short_len.div_ceil(short_split).max(1);
        let slots = n_splits.max(short_splits);
        // Gated on the window's splits alone (constants of a pool), not on the retrieval
        // heads' (which follow the batch's longest row): a caller whose `rows * n_splits`
        // fits its buffers has room for the slots too.
        let listed = kinds.len() <= 64 && kinds.contains(&false) && short_splits <= max_slots;
        DecodeLaunch {
            n_kv: kinds.len(),
            group,
            head_dim,
            split,
            n_splits: if listed { slots } else { n_splits },
            retrieval: if listed { kinds.iter().enumerate().filter(|(_, &r)| r).map(|(g, _)| 1u64 << g).sum() } else { 0 },
            short_splits: if listed { short_splits } else { n_splits },
            short_split: if listed { short_split } else { 0 },
            lead_splits: 0,
            tail_split: 0,
            rows,
            kv,
            kernel,
            streaming: None,
        }
    }

    /// [`DecodeLaunch::for_layer`] with its long heads split by `splits`, as many splits as
    /// hold the longest head's `max_len` keys.
    pub fn for_layer_split(
        kinds: &[bool],
        shape: (usize, usize, usize, KvType, DecodeKernel),
        splits: crate::decode_attention::Splits,
        max_len: usize,
        short_len: usize,
        streaming_rows: usize,
        max_slots: usize,
    ) -> Self {
        let launch = Self::for_layer(kinds, shape, splits.split, splits.count(max_len), short_len, streaming_rows, max_slots);
        Self { lead_splits: splits.lead, tail_split: splits.tail, ..launch }
    }

    /// This launch with the layer's streaming heads (`kinds`: true = retrieval) in their own
    /// type: its streaming entries then run by `streaming.kernel` in a second launch. A layer
    /// without streaming heads is unchanged. Both kinds in one layer need the listed form
    /// (at most 64 KV heads, the window's splits within the partial slots): else an error.
    pub fn with_streaming_type(self, kinds: &[bool], streaming: StreamingKernel) -> Result<Self> {
        if !kinds.contains(&false) {
            return Ok(self);
        }
        if kinds.contains(&true) && self.short_split == 0 {
            return Err(CudaError::Input(format!(
                "a layer of {} KV heads with both kinds cannot keep streaming heads in a type of their own (at most 64 KV heads, and partial slots for the window's splits)",
                kinds.len()
            )));
        }
        Ok(Self { streaming: Some(streaming), ..self })
    }

    /// Partial blocks per row: every retrieval head's splits and every streaming head's
    /// short ones (grid x, the kernels' `block_work`), or (`short_split` 0) KV heads x
    /// splits (grid x and y).
    pub fn blocks(&self) -> usize {
        if self.short_split == 0 {
            return self.n_kv * self.n_splits;
        }
        let r = self.retrieval.count_ones() as usize;
        r * self.n_splits + (self.n_kv - r) * self.short_splits
    }
}

/// A captured decode step that may move between threads with its pool (cudarc leaves
/// graphs `!Send`).
pub struct StepGraph(CudaGraph);

// SAFETY: the graph is only launched through `StepGraph::launch`, which (in cudarc) binds the
// graph's context to the calling thread before launching on the graph's own stream; it is
// never used from two threads at once (it is owned, and `launch` takes `&self` of an owned
// value held by one sequence).
unsafe impl Send for StepGraph {}

impl StepGraph {
    /// Wraps a captured graph.
    pub fn new(graph: CudaGraph) -> Self {
        Self(graph)
    }

    /// Replays it on its stream.
    pub fn launch(&self) -> Result<()> {
        self.0.launch().map_err(driver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels' `block_work` in Rust: the (KV head, split, first key, keys) of block `j`.
    fn block_work(a: &DecodeLaunch, j: usize) -> (usize, usize, usize, usize) {
        let long = crate::decode_attention::Splits { split: a.split, lead: a.lead_splits, tail: a.tail_split };
        if a.short_split == 0 {
            let (g, s) = (j % a.n_kv, j / a.n_kv);
            let (begin, keys) = long.range(s);
            return (g, s, begin, keys);
        }
        let retrieval: Vec<usize> = (0..a.n_kv).filter(|g| a.retrieval >> g & 1 == 1).collect();
        let streaming: Vec<usize> = (0..a.n_kv).filter(|g| a.retrieval >> g & 1 == 0).collect();
        let listed = retrieval.len() * a.n_splits;
        if j < listed {
            let s = j / retrieval.len();
            let (begin, keys) = long.range(s);
            (retrieval[j % retrieval.len()], s, begin, keys)
        } else {
            let s = (j - listed) / streaming.len();
            (streaming[(j - listed) % streaming.len()], s, s * a.short_split, a.short_split)
        }
    }

    /// Every key a layer's heads show read by exactly one block, within its head's slots.
    fn covers(a: &DecodeLaunch, kinds: &[bool], long_len: usize, short_len: usize) {
        let mut seen = std::collections::HashSet::new();
        for j in 0..a.blocks() {
            let (g, s, begin, keys) = block_work(a, j);
            assert!(s < a.n_splits, "block {j}: head {g} split {s} past {} slots", a.n_splits);
            let len = if kinds[g] { long_len } else { short_len };
            for k in begin.min(len)..(begin + keys).min(len) {
                assert!(seen.insert((g, k)), "block {j} reads head {g} key {k} again");
            }
        }
        let want: usize = kinds.iter().map(|&r| if r { long_len } else { short_len }).sum();
        assert_eq!(seen.len(), want, "every key read");
    }

    #[test]
    fn a_layers_blocks_read_every_key_once_and_streaming_windows_in_tiles() {
        let shape = (4, 128, 1, KvType::Bf16, DecodeKernel::Tensor);
        // Split 512: 257 splits of a 131,073-key retrieval head; 5 tiles of a 320-key window.
        let kinds = [false, true, false, false, true, false, false, false];
        let a = DecodeLaunch::for_layer(&kinds, shape, 512, 257, 320, 1, usize::MAX);
        assert_eq!((a.retrieval, a.short_splits, a.short_split, a.n_splits), (0b1_0010, 5, 64, 257));
        assert_eq!(a.blocks(), 2 * 257 + 6 * 5, "not 8 x 257");
        covers(&a, &kinds, 131_073, 320);
        // Neighbouring blocks read different heads.
        assert_ne!(block_work(&a, 0).0, block_work(&a, 1).0);
        // Many rows: fewer, longer streaming splits (64 rows x 6 heads fill the card with one
        // each; 9 rows x 6 heads: 3 of 128 keys, as 5 of 64 would make 270 blocks).
        let many = DecodeLaunch::for_layer(&kinds, (4, 128, 64, KvType::Bf16, DecodeKernel::Tensor), 512, 9, 320, 64, usize::MAX);
        assert_eq!((many.short_splits, many.short_split), (1, 320));
        let nine = DecodeLaunch::for_layer(&kinds, (4, 128, 9, KvType::Bf16, DecodeKernel::Tensor), 512, 257, 320, 9, usize::MAX);
        assert_eq!((nine.short_splits, nine.short_split), (3, 128));
        covers(&nine, &kinds, 131_073, 320);
        // The retrieval heads' splits outgrowing the slots do not change a window's.
        let grown = DecodeLaunch::for_layer(&kinds, shape, 512, 257, 320, 1, 16);
        assert_eq!((grown.short_splits, grown.short_split, grown.n_splits), (5, 64, 257));
        // A pool sized for 64 sequences splits a lone row's windows as it would 64 rows'.
        let lone = DecodeLaunch::for_layer(&kinds, shape, 512, 257, 320, 64, usize::MAX);
        assert_eq!((lone.rows, lone.short_splits, lone.short_split), (1, 1, 320));
        // Streaming heads only: their tiles set the partial slots.
        let b = DecodeLaunch::for_layer(&[false; 4], shape, 512, 1, 320, 1, usize::MAX);
        assert_eq!((b.n_splits, b.blocks()), (5, 20));
        covers(&b, &[false; 4], 0, 320);
        // Every head a retrieval one, over 64 heads, or too few partial slots: every head
        // gets every split of the retrieval heads' size (and the mask is unused).
        for (kinds, slots) in [(vec![true; 8], usize::MAX), (vec![false; 65], usize::MAX), (vec![true, false], 4)] {
            let c = DecodeLaunch::for_layer(&kinds, shape, 2048, 3, 320, 1, slots);
            assert_eq!((c.short_split, c.blocks(), c.retrieval), (0, kinds.len() * 3, 0));
            assert_eq!(block_work(&c, kinds.len() + 1), (1, 1, 2048, 2048));
            covers(&c, &kinds, 5000, 320);
        }
        // Lead splits then short ones, in a full layer and beside streaming windows: every
        // key still read once, the short splits' blocks after every lead one.
        let led = crate::decode_attention::Splits { split: 2048, lead: 5, tail: 512 };
        for kinds in [vec![true; 8], kinds.to_vec()] {
            let d = DecodeLaunch::for_layer_split(&kinds, shape, led, 15_000, 320, 1, usize::MAX);
            assert_eq!(d.n_splits, 15);
            covers(&d, &kinds, 15_000, 320);
            let long = kinds.iter().filter(|&&k| k).count();
            assert_eq!(block_work(&d, 5 * long).2, 5 * 2048, "the first short split follows the lead ones");
        }
    }

    /// The value of `#define name` in the ops source.
    fn ops_define(name: &str) -> usize {
        let line = crate::ops::SOURCE
            .lines()
            .find(|l| l.trim_start().strip_prefix("#define ").is_some_and(|r| r.split_whitespace().next() == Some(name)))
            .unwrap_or_else(|| panic!("no #define {name}"));
        line.split_whitespace().nth(2).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
    }

    #[test]
    fn the_matrix_vector_kernels_shape_is_the_one_its_launch_assumes() {
        // The host's row limit, ring size and blocks per multiprocessor mirror the kernel's
        // defines (with no DUO_GEMV_* knob set).
        assert_eq!(GEMV_ROWS, ops_define("GEMV_ROWS"));
        assert_eq!(ops_define("GEMV_WARPS"), 8, "the launch's 256 threads");
        if ["DUO_GEMV_UNROLL", "DUO_GEMV_STAGES", "DUO_GEMV_BLOCKS"].iter().all(|k| std::env::var_os(k).is_none()) {
            assert!(ops_options().is_empty(), "the default key");
            assert_eq!(gemv_ring_bytes(), ops_define("GEMV_WARPS") * ops_define("GEMV_STAGES") * ops_define("GEMV_UNROLL") * 32 * 16);
            assert_eq!(gemv_blocks(), ops_define("GEMV_BLOCKS"));
            // Two blocks' rings and a row of Llama-3-8B's 14,336 down inputs fit one
            // multiprocessor, so the down product reads its row from shared memory.
            assert!(2 * (gemv_ring_bytes() + 14_336 * 2 + GEMV_STATIC_SMEM + SMEM_PER_BLOCK_RESERVED) <= SMEM_PER_SM);
        }
    }

    #[test]
    fn the_matrix_vector_kernel_refuses_what_it_cannot_take() {
        let normed = GemvInput::Normed { x: 0, norm: 0, eps: 1e-5 };
        assert!(Gpu::gemv_takes(1, 4096, normed) && Gpu::gemv_takes(GEMV_ROWS, 4096, normed));
        assert!(!Gpu::gemv_takes(0, 4096, GemvInput::Bf16(0)), "no rows");
        assert!(!Gpu::gemv_takes(GEMV_ROWS + 1, 4096, GemvInput::Bf16(0)), "more rows than its sums");
        assert!(!Gpu::gemv_takes(1, 4100, GemvInput::Bf16(0)), "not whole 16-byte chunks");
        // Normalised rows live in shared memory; bf16 rows need not.
        assert!(!Gpu::gemv_takes(GEMV_ROWS, 8192, normed) && Gpu::gemv_takes(GEMV_ROWS, 8192, GemvInput::Bf16(0)));
        // The SiLU's rows are made in shared memory: one or a few of Llama-3-8B's 14,336
        // (28 KiB each) beside the rings, never eight.
        if std::env::var_os("DUO_GEMV_STAGES").is_none() && std::env::var_os("DUO_GEMV_UNROLL").is_none() {
            assert!(Gpu::gemv_takes(1, 14_336, GemvInput::SiluOf(0)) && Gpu::gemv_takes(4, 14_336, GemvInput::SiluOf(0)));
            assert!(!Gpu::gemv_takes(GEMV_ROWS, 14_336, GemvInput::SiluOf(0)));
        }
    }

    #[test]
    fn every_hopper_prefill_form_fits_a_block_of_shared_memory() {
        // Stages, tiles, raw slots and barriers within the 227 KiB a block may have, and at
        // least the two stages the overlapped form holds at once.
        for d in [64, 128] {
            for kv in [KvType::Bf16, KvType::Fp8, KvType::Int8, KvType::Int4, KvType::K8V4] {
                let (stages, bytes) = (prefill_wg_stages(d, kv), prefill_wg_smem_bytes(d, kv));
                assert!(stages >= 2, "{kv:?}, heads of {d}: {stages} stages");
                assert!(bytes <= 227 * 1024, "{kv:?}, heads of {d}: {bytes} bytes");
            }
        }
        // With the default forms (no DUO_PREFILL_* knob set): heads of 128 over bf16 keep three
        // stages of 128 keys; a k8v4 cache 128-key tiles too, two stages beside its raw slots
        // (two tiles of codes and scales).
        let knobs = ["DUO_PREFILL_WS", "DUO_PREFILL_WG_STAGES", "DUO_PREFILL_WG_BK", "DUO_PREFILL_RAW_SLOTS", "DUO_PREFILL_SHARED_ROWS"];
        if knobs.iter().all(|k| std::env::var_os(k).is_none()) {
            assert!(prefill_wg_form(128, KvType::Bf16).starts_with("WS=2, 128-key tiles, 3 stages, swizzled"));
            assert!(prefill_wg_form(128, KvType::K8V4).starts_with("WS=2, 128-key tiles, 2 stages, swizzled"));
            assert_eq!(prefill_wg_stages(128, KvType::Bf16), 3);
            assert_eq!(prefill_wg_stages(128, KvType::K8V4), 2);
            assert_eq!(prefill_wg_stages(64, KvType::K8V4), 3);
            // bf16 looks a tile's rows up into shared memory by default (4 bytes a row), the
            // quantised forms do not.
            assert!(prefill_wg_form(128, KvType::Bf16).contains("shared rows"));
            assert!(!prefill_wg_form(128, KvType::K8V4).contains("shared rows"));
            assert_eq!(prefill_wg_smem_bytes(128, KvType::Bf16), 3 * (65_536 + 16) + 128 * 4 + 1024);
            assert_eq!(prefill_wg_smem_bytes(128, KvType::K8V4), 2 * (65_536 + 16) + 2 * 128 * (128 + 64 + 8) + 1024);
        }
    }
}
