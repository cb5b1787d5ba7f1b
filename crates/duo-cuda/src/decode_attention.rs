//! One decode step of attention over a layer's hybrid KV cache for every running sequence,
//! in one fused launch.
//!
//! A layer's KV heads are a mix of retrieval heads (every token) and streaming heads (sinks
//! plus a ring of recent tokens). At decode time both are just "a list of cached keys and
//! values" — softmax does not care about their order, and keys are cached after RoPE — so
//! one kernel covers both: the head's kind says which positions it sees, and each position's
//! row is found through the sequence's block table ([`crate::paged`]). A long retrieval cache
//! is split across the sequence (split-K): one block per (KV head, split) and sequence, each
//! block reads its slice of one KV head's keys and values once for all the query heads that
//! share it (GQA) and reduces them with an online softmax into partials (max, sum, weighted
//! values); a second small kernel merges the partials. A streaming head's few keys come in
//! splits of their own, one 64-key tile each, so that its window costs one tile's latency
//! rather than a walk through every tile ([`crate::runtime::DecodeLaunch`]).
//!
//! Storage is `f32` (as the CPU cache) or bf16 ([`KvType`]), accumulation `f32`; the parity
//! bound against the `f64` reference (on the same rounded cache for bf16) is `1e-4` absolute
//! on outputs of magnitude ~1.

use crate::prefill_attention::HeadEntry;
use crate::{CudaError, Result};

/// How the cache stores keys and values on the GPU (accumulation is `f32` either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvType {
    /// 4 bytes per element, as the CPU cache.
    F32,
    /// 2 bytes per element: half the bytes a decode step reads.
    Bf16,
    /// 1 byte per element (e4m3) and an `f32` scale per row ([`crate::fp8`]), keys in a
    /// Hadamard basis ([`KvType::turns_keys`]): the tensor-core kernels only.
    Fp8,
    /// 1 byte per element (int8) and an `f32` scale per row ([`crate::int8`]): the
    /// tensor-core kernels only.
    Int8,
    /// 4 bits per element and a 32-bit word per row holding an f16 step and minimum
    /// ([`crate::int4`]): the tensor-core kernels only.
    Int4,
    /// Keys as [`KvType::Int8`], values as [`KvType::Int4`] (EVALUATION.md: the keys carry
    /// the 4-bit cache's accuracy loss, the values hardly any): 0.75 bytes per element and
    /// a 32-bit word per row; the tensor-core kernels only.
    K8V4,
}

impl KvType {
    /// How keys are stored: this type, or K8V4's int8.
    pub fn key(self) -> KvType {
        if self == KvType::K8V4 { KvType::Int8 } else { self }
    }

    /// How values are stored: this type, or K8V4's int4.
    pub fn value(self) -> KvType {
        if self == KvType::K8V4 { KvType::Int4 } else { self }
    }

    /// Bytes of `elems` elements (without the row scales) of a cache whose keys and values
    /// are alike. K8V4's sides differ: asking it is a programming error (a panic); use
    /// [`KvType::key_bytes_for`] or [`KvType::value_bytes_for`].
    pub fn bytes_for(self, elems: usize) -> usize {
        let bits = match self {
            KvType::F32 => 32,
            KvType::Bf16 => 16,
            KvType::Fp8 | KvType::Int8 => 8,
            KvType::Int4 => 4,
            KvType::K8V4 => panic!("K8V4's keys and values differ in width: ask key_bytes_for or value_bytes_for"),
        };
        elems * bits / 8
    }

    /// Bytes of `elems` keys (without the row scales).
    pub fn key_bytes_for(self, elems: usize) -> usize {
        self.key().bytes_for(elems)
    }

    /// Bytes of `elems` values (without the row scales).
    pub fn value_bytes_for(self, elems: usize) -> usize {
        self.value().bytes_for(elems)
    }

    /// Whether the cache holds quantised codes and a 32-bit scale word per row (fp8, int8,
    /// int4 or K8V4).
    pub fn is_quantised(self) -> bool {
        matches!(self, KvType::Fp8 | KvType::Int8 | KvType::Int4 | KvType::K8V4)
    }

    /// Bytes of scales per cached row (one row: `head_dim` keys or values).
    pub fn scale_bytes(self) -> usize {
        if self.is_quantised() {
            4
        } else {
            0
        }
    }

    /// How the kernels tell the quantised formats apart (`Paged::kv_format`): 1 e4m3, 2 int8,
    /// 3 int4, 4 K8V4 (keys 2, values 3), else 0.
    /// Mirrored by `rope_append`'s test of which formats turn keys ([`KvType::turns_keys`];
    /// `ops`' tests hold the two to the same formats).
    pub fn format_code(self) -> i32 {
        match self {
            KvType::Fp8 => 1,
            KvType::Int8 => 2,
            KvType::Int4 => 3,
            KvType::K8V4 => 4,
            _ => 0,
        }
    }

    /// Rows of `head_dim` values as a byte cache stores them: bytes, then a scale per row
    /// (exactly as the kernels quantise). Not a byte cache of one format (K8V4: ask its
    /// [`KvType::key`] or [`KvType::value`]): an input error.
    pub fn quantise_rows(self, values: &[f32], head_dim: usize) -> Result<(Vec<u8>, Vec<f32>)> {
        match self {
            KvType::Fp8 => Ok(crate::fp8::quantise_rows(values, head_dim)),
            KvType::Int8 => Ok(crate::int8::quantise_rows(values, head_dim)),
            KvType::Int4 => Ok(crate::int4::quantise_rows(values, head_dim)),
            _ => Err(CudaError::Input(format!(
                "a {self:?} cache has no bytes and scales"
            ))),
        }
    }

    /// `values` as this cache holds them (rounded, or quantised and dequantised by rows of
    /// `head_dim`): what a kernel over this cache sees. K8V4's sides differ: asking it is a
    /// programming error (a panic); ask its [`KvType::key`] or [`KvType::value`].
    pub fn round_rows(self, values: &[f32], head_dim: usize) -> Vec<f32> {
        match self {
            KvType::F32 => values.to_vec(),
            KvType::Bf16 => values
                .iter()
                .map(|&f| half::bf16::from_f32(f).to_f32())
                .collect(),
            KvType::Fp8 => crate::fp8::round_rows(values, head_dim),
            KvType::Int8 => {
                let (b, s) = crate::int8::quantise_rows(values, head_dim);
                crate::int8::dequantise_rows(&b, &s, head_dim)
            }
            KvType::Int4 => crate::int4::round_rows(values, head_dim),
            KvType::K8V4 => panic!("K8V4's keys and values round differently: ask key() or value()"),
        }
    }

    /// Keys as a model's cache makes them, seen in their own basis: [`KvType::round_rows`]
    /// of the key type, except that int4 and fp8 quantise keys in a Hadamard basis
    /// ([`crate::int4::round_key_rows`], [`crate::fp8::round_key_rows`]).
    pub fn round_key_rows(self, keys: &[f32], head_dim: usize) -> Vec<f32> {
        match self.key() {
            KvType::Int4 => crate::int4::round_key_rows(keys, head_dim),
            KvType::Fp8 => crate::fp8::round_key_rows(keys, head_dim),
            k => k.round_rows(keys, head_dim),
        }
    }

    /// Whether the cache holds keys in a Hadamard basis (int4 and fp8 keys: RoPE + append
    /// turns a head's queries and keys alike, so `q . k` is unchanged and the decode and
    /// prefill kernels never turn anything back). int8 keys are left as they are: their
    /// uniform grid is fine enough (EVALUATION.md).
    pub fn turns_keys(self) -> bool {
        matches!(self.key(), KvType::Int4 | KvType::Fp8)
    }

    /// Bytes and scales back to values (a byte cache of one format; others, K8V4 included
    /// (ask its [`KvType::key`] or [`KvType::value`]), give their input's length of zeros).
    pub fn dequantise_rows(self, bytes: &[u8], scales: &[f32], head_dim: usize) -> Vec<f32> {
        match self {
            KvType::Fp8 => crate::fp8::dequantise_rows(bytes, scales, head_dim),
            KvType::Int8 => crate::int8::dequantise_rows(bytes, scales, head_dim),
            KvType::Int4 => crate::int4::dequantise_rows(bytes, scales, head_dim),
            _ => vec![0.0; bytes.len()],
        }
    }
}

/// `x` with keys and values as a `kv` cache holds them, for the reference.
pub fn rounded_to(kv: KvType, x: &DecodeInput) -> DecodeInput {
    DecodeInput {
        keys: kv.key().round_rows(&x.keys, x.head_dim),
        values: kv.value().round_rows(&x.values, x.head_dim),
        ..x.clone()
    }
}

/// Whether a warp may read `kpw` keys at once for heads of `head_dim`: each lane takes
/// `head_dim * kpw / 32` elements, which must fill whole 16-byte loads, and at most 4 keys.
pub fn keys_per_warp_fits(head_dim: usize, kpw: usize, kv: KvType) -> bool {
    [1, 2, 4].contains(&kpw)
        && kv.bytes_for(head_dim * kpw / 32) >= 16
        && kv.bytes_for(head_dim * kpw / 32).is_multiple_of(16)
}

/// Which partial kernel a decode launch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeKernel {
    /// CUDA cores, a warp reading this many keys at once (1, 2 or 4; see
    /// [`keys_per_warp_fits`]): every head size and cache type.
    Cores(usize),
    /// Tensor cores over `cp.async`-pipelined tiles ([`TENSOR_SOURCE`]): bf16 caches, heads of
    /// 64 or 128, at most 16 query heads per KV head.
    Tensor,
}

impl DecodeKernel {
    /// Whether this kernel takes heads of `head_dim` with `group` query heads per KV head
    /// over a `kv` cache.
    pub fn fits(self, head_dim: usize, group: usize, kv: KvType) -> bool {
        match self {
            DecodeKernel::Cores(kpw) => {
                !kv.is_quantised()
                    && keys_per_warp_fits(head_dim, kpw, kv)
                    && group * head_dim * kpw / 32 <= 64
            }
            DecodeKernel::Tensor => {
                kv != KvType::F32 && [64, 128].contains(&head_dim) && (1..=16).contains(&group)
            }
        }
    }

    /// The fastest kernel that fits (the tensor-core one where it does; measured in
    /// BENCHMARKS.md), else CUDA cores with `keys_per_warp` (or 4) keys per warp.
    pub fn best(head_dim: usize, group: usize, kv: KvType, keys_per_warp: usize) -> DecodeKernel {
        if DecodeKernel::Tensor.fits(head_dim, group, kv) {
            return DecodeKernel::Tensor;
        }
        [keys_per_warp, 4, 2, 1]
            .into_iter()
            .map(DecodeKernel::Cores)
            .find(|k| k.fits(head_dim, group, kv))
            .unwrap_or(DecodeKernel::Cores(1))
    }
}

/// Dynamic shared memory of the tensor-core partial kernel for heads of `head_dim` with
/// `group` query heads each: [`tensor_stages`] (bf16: three) stages of 64-key K and V tiles,
/// rows swizzled ([`tensor_swizzle`]) or padded by 8 elements (the merge reuses them). A
/// quantised cache's stages hold its raw rows (padded by [`tensor_byte_pad`] bytes) and row
/// scales, and, where values do
/// not go from their codes straight to the tensor cores ([`tensor_values_in_registers`],
/// up to 8 query heads), each warp its 16 keys' values dequantised to f16 beside them.
pub fn tensor_smem_bytes(head_dim: usize, group: usize, kv: KvType) -> usize {
    let stages = tensor_stages(kv);
    match kv {
        KvType::Fp8 | KvType::Int8 | KvType::Int4 | KvType::K8V4 => {
            let converted = if tensor_values_in_registers() && group <= 8 { 0 } else { 4 * 16 * (head_dim + 8) * 2 };
            let tile = tensor_byte_tile();
            // Key and value rows alike padded to the wider (the keys').
            let row = kv.key_bytes_for(head_dim);
            // Rows of 128 bytes swizzled, not padded (the kernel's RPAD).
            let pad = if tensor_swizzle() && row == 128 { 0 } else { tensor_byte_pad() };
            stages * 2 * tile * (row + pad) + stages * 2 * tile * 4 + converted
        }
        _ => stages * 2 * 64 * (head_dim + if tensor_swizzle() { 0 } else { 8 }) * 2,
    }
}

/// Pipeline stages of the tensor-core partial kernel over a `kv` cache, with
/// [`tensor_min_blocks`] blocks per multiprocessor: measured on the H200 (BENCHMARKS.md,
/// "Values from their codes into the tensor cores"). bf16 and fp8 keep bytes in flight with
/// two blocks of deep pipelines (three and five stages); int8 and int4, whose tiles cost more
/// work per byte, run faster with more warps per multiprocessor and shallower pipelines
/// (int8: three stages at four blocks; int4: four at four — int4 was measured at three
/// blocks, but at 125 registers it ran four; the whole-tile copy path takes more, so four
/// are now asked for, which keeps it at 128 without spills), at every batch size but one
/// row of a duo layer. For measuring others, `DUO_DECODE_STAGES` and `DUO_DECODE_MIN_BLOCKS`
/// override both for every cache type.
pub fn tensor_stages(kv: KvType) -> usize {
    if let Some(n) = tuning("DUO_DECODE_STAGES") {
        return n.clamp(2, 16);
    }
    let stages_of_64: usize = match kv {
        KvType::Int4 => 4,
        KvType::Int8 | KvType::K8V4 => 3,
        KvType::Fp8 => 5,
        _ => return 3,
    };
    // As many keys in flight (all stages but the one being read) with larger tiles.
    (stages_of_64 - 1).div_ceil(tensor_byte_tile() / 64) + 1
}

/// Keys per pipeline stage of the tensor-core kernel over a quantised cache: 64, or 128
/// with `DUO_DECODE_TILE=128` (each warp two 16-key slices per stage: half the barriers and
/// rounds of copies per key; a measurement knob until it is measured). bf16 stays at 64.
pub fn tensor_byte_tile() -> usize {
    if tuning("DUO_DECODE_TILE") == Some(128) { 128 } else { 64 }
}

/// Blocks per multiprocessor the tensor-core partial kernel over a `kv` cache is meant to
/// run with; see [`tensor_stages`]. What a launch plans for is [`tensor_blocks`]: this, or
/// fewer where the shared memory holds fewer.
pub fn tensor_min_blocks(kv: KvType) -> usize {
    if let Some(n) = tuning("DUO_DECODE_MIN_BLOCKS") {
        return n.clamp(1, 4);
    }
    match kv {
        KvType::Int4 | KvType::Int8 | KvType::K8V4 => 4,
        _ => 2,
    }
}

/// Shared memory of one multiprocessor of the H100/H200 (228 KiB), and what the driver
/// reserves per resident block (1 KiB).
pub(crate) const SMEM_PER_SM: usize = 228 * 1024;
pub(crate) const SMEM_PER_BLOCK_RESERVED: usize = 1024;

/// Blocks per multiprocessor the tensor-core partial kernel for heads of `head_dim` with
/// `group` query heads over a `kv` cache plans its registers for (`MIN_BLOCKS`) and
/// [`split_for`] sizes one row's splits by: [`tensor_min_blocks`], or as many as the shared
/// memory holds where that is fewer (promising more would cap the registers for blocks
/// that can never be resident).
pub fn tensor_blocks(head_dim: usize, group: usize, kv: KvType) -> usize {
    let fit = SMEM_PER_SM / (tensor_smem_bytes(head_dim, group, kv) + SMEM_PER_BLOCK_RESERVED);
    tensor_min_blocks(kv).min(fit).max(1)
}

/// The L2 prefetch size the tensor-core kernel's copies ask for (0, 128 or 256 bytes;
/// `DUO_DECODE_L2_PREFETCH` overrides it). 128 measured 2-3% faster than none on the H200
/// (bf16, 131K-524K tokens and 25 x 16K, `scripts/h200-decode-lab.sh`), 256 no faster.
pub fn tensor_l2_prefetch() -> usize {
    tuning("DUO_DECODE_L2_PREFETCH").map_or(128, |n| if n >= 256 { 256 } else if n >= 128 { 128 } else { 0 })
}

/// Whether the split merge runs a head on [`merge_block`] threads, groups of `head_dim`
/// summing the listed splits side by side (the kernel's `MERGE_WIDE`, the default), instead
/// of one group of `head_dim` threads (`DUO_DECODE_MERGE_WIDE=0`). Measured on the H200
/// (BENCHMARKS.md, session 21): a 128K Llama-3-8B step no slower for any method and cache,
/// duo 0.5 1.5-3.5% faster (bf16 6.89-6.93 to 6.78-6.79 ms, int4 5.98-6.01 to 5.79-5.80).
pub fn merge_wide() -> bool {
    tuning("DUO_DECODE_MERGE_WIDE") != Some(0)
}

/// Whether the wide merge takes a head's splits in one pass, each group of `head_dim`
/// threads keeping its own running maximum (`MERGE_ONEPASS`, the default), rather than
/// first the maximum of all splits, then a list of the live ones in shared memory
/// (`DUO_DECODE_MERGE_ONEPASS=0`, the form of sessions 19-27).
pub fn merge_onepass() -> bool {
    tuning("DUO_DECODE_MERGE_ONEPASS") != Some(0)
}

/// Threads of the wide merge's block for heads of `head_dim` (`MERGE_BLOCK` in the kernel):
/// as many whole groups of `head_dim` as [`MERGE_THREADS`] threads hold, one at least.
pub fn merge_block(head_dim: usize) -> usize {
    (MERGE_THREADS / head_dim).max(1) * head_dim
}

/// The wide merge's width in threads before rounding to whole heads ([`merge_block`]; the
/// kernel's `MERGE_THREADS`, given to NVRTC by the host so the two cannot disagree).
pub const MERGE_THREADS: usize = 512;

/// Whether the tensor-core kernel's bf16 stages, and a quantised cache's raw rows of 128
/// bytes, hold rows of swizzled 16-byte chunks (the default) rather than rows padded by 16
/// bytes (`DUO_DECODE_SWIZZLE=0`, the form before session 28). The padding put every odd
/// row's 32-byte sectors across a 32-byte boundary of shared memory, and the L2 was asked for
/// each of those sectors twice: 1.5 times the sectors the cache holds (Nsight Compute on the
/// H200, BENCHMARKS.md, session 28).
pub fn tensor_swizzle() -> bool {
    tuning("DUO_DECODE_SWIZZLE") != Some(0)
}

/// Bytes past each raw row of a quantised cache that is not swizzled (rows other than 128
/// bytes, or any with `DUO_DECODE_SWIZZLE=0`) in the tensor-core kernel's stages: 16 (the
/// default) or 32 (`DUO_DECODE_BYTE_PAD=32`, every row then on a 32-byte boundary, as the
/// swizzle keeps them, with two-way bank conflicts on 128-byte keys' reads).
pub fn tensor_byte_pad() -> usize {
    if tuning("DUO_DECODE_BYTE_PAD") == Some(32) { 32 } else { 16 }
}

/// Whether the tensor-core kernel over a quantised cache takes values from their codes
/// straight into the tensor cores (the default, for up to 8 query heads per KV head; see
/// `V_REGS` in [`TENSOR_SOURCE`]) rather than through an f16 copy in shared memory
/// (`DUO_DECODE_V_SMEM=1`, the previous form, kept to measure one against the other).
pub fn tensor_values_in_registers() -> bool {
    tuning("DUO_DECODE_V_SMEM") != Some(1)
}

/// Whether the tensor-core partial kernel records each block's multiprocessor and instants
/// (`DUO_DECODE_TRACE=1`; `Gpu::decode_trace`), for the decode timings to show how one
/// launch's blocks share the card. A measurement only: it adds a store per block.
pub fn decode_trace() -> bool {
    tuning("DUO_DECODE_TRACE") == Some(1)
}

/// A numeric tuning override from the environment (unset or unparsable: none), read once
/// per process: the kernels compiled with a value and the launches sized by it must agree.
pub(crate) fn tuning(name: &'static str) -> Option<usize> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static READ: OnceLock<Mutex<HashMap<&'static str, Option<usize>>>> = OnceLock::new();
    let mut read = READ.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    *read
        .entry(name)
        .or_insert_with(|| std::env::var(name).ok()?.trim().parse().ok())
}

/// Fewest keys per split.
pub const MIN_SPLIT: usize = 256;

/// How a long head's keys are split among partial blocks: every split of `split` keys
/// (`lead` 0), or `lead` splits of `split` keys and then splits of `tail` keys. The kernel
/// takes both forms (`block_work`); the second is [`fill_splits`]'s for one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Splits {
    /// Keys per split (the lead splits', where `lead` > 0).
    pub split: usize,
    /// Splits of `split` keys before the short ones (0: all of them).
    pub lead: usize,
    /// Keys per split past the lead ones.
    pub tail: usize,
}

impl Splits {
    /// Every split of `split` keys.
    pub fn uniform(split: usize) -> Self {
        Splits { split: split.max(1), lead: 0, tail: 0 }
    }

    /// Splits that hold a head of `len` keys.
    pub fn count(&self, len: usize) -> usize {
        let lead_keys = self.lead * self.split;
        if self.lead == 0 || len <= lead_keys {
            len.div_ceil(self.split)
        } else {
            self.lead + (len - lead_keys).div_ceil(self.tail.max(1))
        }
    }

    /// Split `s`'s first key and its keys (before a head's end cuts it).
    pub fn range(&self, s: usize) -> (usize, usize) {
        if self.lead == 0 || s < self.lead {
            (s * self.split, self.split)
        } else {
            (self.lead * self.split + (s - self.lead) * self.tail, self.tail)
        }
    }
}

/// The share (percent) of a block's fair share of a one-row launch that each lead split of
/// [`fill_splits`] takes (`DUO_DECODE_LEAD`, 0 to 95, default 90; 0: uniform splits,
/// [`fill_split`]). A one-row launch is one wave of equal blocks (two at 512K, where
/// `fill_split`'s splits stop at 8,192 keys), and the H200's multiprocessors do not stream
/// alike: traced at 1 x 128K (session 27, `DUO_DECODE_TRACE=1`), 24 of the 132 took their
/// two 2 MB splits in 93-103 us
/// where the rest took 116-129, and the launch waited for the slowest (9.7% of the
/// multiprocessors' time idle; 6.3% with lead splits, but each short split's block waits
/// about 3.7 us for its first tile, so the launch itself measured no faster). Whole steps
/// measured faster with them where a block's fair share is long ([`LEAD_MIN_FAIR`]):
/// Llama-3-8B 512K full 21.30 -> 20.90 ms, duo 0.5 13.76 -> 13.03, 128K full 9.13 -> 9.03;
/// and slower where it is short (duo 128K 6.96 -> 7.12, full 32K 5.87 -> 6.09; BENCHMARKS.md).
pub fn lead_share() -> usize {
    tuning("DUO_DECODE_LEAD").unwrap_or(90).min(95)
}

/// Fewest keys of a block's fair share of a one-row launch (the longest head's keys over its
/// blocks in one wave) for which [`fill_splits`] takes lead splits: 1.5 MB of bf16 keys and
/// values a block, where each short split's wait for its first tile costs little beside the
/// time the lead splits save at the end.
pub const LEAD_MIN_FAIR: usize = 3072;

/// [`LEAD_MIN_FAIR`], or `DUO_DECODE_LEAD_MIN` (keys) for measuring others.
pub fn lead_min_fair() -> usize {
    tuning("DUO_DECODE_LEAD_MIN").unwrap_or(LEAD_MIN_FAIR)
}

/// Keys per split past the lead ones in [`fill_splits`] (`DUO_DECODE_TAIL`, a multiple of
/// 64 from 64 to 8,192; default 512).
pub fn tail_split() -> usize {
    (tuning("DUO_DECODE_TAIL").unwrap_or(512).clamp(64, 8192)) / 64 * 64
}

/// A one-row launch's long-head splits on the tensor-core kernel: with a [`lead_share`], one
/// wave of lead splits of that share of a block's fair share (a multiple of 64 keys), then
/// [`tail_split`]-key splits that multiprocessors take as they free up; else (or where the
/// fair share is under [`lead_min_fair`] keys) [`fill_split`]'s uniform splits.
pub fn fill_splits(blocks: usize, lens: &[u32]) -> Splits {
    fill_splits_with(blocks, lens, lead_share(), tail_split(), lead_min_fair())
}

/// [`fill_splits`] with lead splits of `share` percent (at most 95) of a block's fair share
/// and `tail`-key splits after them (a multiple of 64, 64 at least), where that fair share is
/// at least `min_fair` keys.
pub fn fill_splits_with(blocks: usize, lens: &[u32], share: usize, tail: usize, min_fair: usize) -> Splits {
    let uniform = Splits::uniform(fill_split(blocks, lens));
    let (share, tail) = (share.min(95), (tail / 64).max(1) * 64);
    if share == 0 {
        return uniform;
    }
    let (max_len, per_head) = one_wave(blocks, lens);
    let split = max_len * share / (100 * per_head) / 64 * 64;
    if split < 512 || max_len / per_head < min_fair {
        return uniform;
    }
    Splits { split, lead: per_head, tail }
}

/// [`split_for`] as [`Splits`]: [`fill_splits`] where one row runs on the tensor-core kernel
/// over a bf16 cache (the form lead splits were measured on; quantised caches keep uniform
/// splits until they are).
pub fn splits_for(kernel: DecodeKernel, kv: KvType, blocks: usize, lens: &[u32], rows: usize) -> Splits {
    if kernel == DecodeKernel::Tensor && kv == KvType::Bf16 && rows <= 1 {
        return fill_splits(blocks, lens);
    }
    Splits::uniform(split_for(kernel, blocks, lens, rows))
}

/// The inputs of one decode step of one layer for several sequences (decode rows).
#[derive(Debug, Clone)]
pub struct DecodeInput {
    /// Query heads.
    pub n_heads: usize,
    /// Dimension of a head: 64, 128 or 256.
    pub head_dim: usize,
    /// Per KV head: retrieval, or streaming with its sink and recent window (offsets unused).
    pub heads: Vec<HeadEntry>,
    /// Per decode row: tokens cached, its own included (its position is `tokens - 1`).
    pub tokens: Vec<usize>,
    /// Queries, `[rows, n_heads, head_dim]` (after RoPE).
    pub q: Vec<f32>,
    /// Keys of every position of every row and KV head: `[row][kv head][position][head_dim]`.
    pub keys: Vec<f32>,
    /// Values, laid out as `keys`.
    pub values: Vec<f32>,
}

impl DecodeInput {
    /// Where row `b`'s keys of KV head `g` start in `keys`.
    pub fn key_offset(&self, b: usize, g: usize) -> usize {
        let before: usize = self.tokens[..b].iter().sum();
        (before * self.heads.len() + g * self.tokens[b]) * self.head_dim
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CudaError::Input(m));
        let (h, d, g) = (self.n_heads, self.head_dim, self.heads.len());
        if ![64, 128, 256].contains(&d) {
            return bad(format!("head_dim {d} must be 64, 128 or 256"));
        }
        if g == 0 || h % g != 0 {
            return bad(format!("{h} query heads for {g} KV heads"));
        }
        let total: usize = self.tokens.iter().sum();
        if self.tokens.contains(&0)
            || self.q.len() != self.tokens.len() * h * d
            || self.keys.len() != total * g * d
            || self.values.len() != self.keys.len()
        {
            return bad("q, keys or values have the wrong size (or a row has no token)".into());
        }
        Ok(())
    }
}

/// The reference: per row and query head, softmax(q k^T / sqrt(d)) v over the positions its KV
/// head sees at the row's position (all, or sinks + recent), in `f64`. Returns
/// `[rows, n_heads, head_dim]`.
pub fn reference(x: &DecodeInput) -> Result<Vec<f32>> {
    x.validate()?;
    let (h, d, group) = (x.n_heads, x.head_dim, x.n_heads / x.heads.len());
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0f32; x.tokens.len() * h * d];
    for (b, &n) in x.tokens.iter().enumerate() {
        for qh in 0..h {
            let g = qh / group;
            let e = x.heads[g];
            let base = x.key_offset(b, g);
            let q = &x.q[(b * h + qh) * d..][..d];
            let seen: Vec<usize> = (0..n).filter(|&p| e.visible(n - 1, p)).collect();
            let scores: Vec<f64> = seen
                .iter()
                .map(|&p| {
                    q.iter()
                        .zip(&x.keys[base + p * d..][..d])
                        .map(|(a, k)| *a as f64 * *k as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for (wi, &p) in w.iter().zip(&seen) {
                for c in 0..d {
                    out[(b * h + qh) * d + c] +=
                        (wi / z * x.values[base + p * d + c] as f64) as f32;
                }
            }
        }
    }
    Ok(out)
}

/// Random inputs: keys, values and queries ~ N(0, 1).
pub fn random_input(
    seed: u64,
    n_heads: usize,
    head_dim: usize,
    heads: Vec<HeadEntry>,
    tokens: &[usize],
) -> DecodeInput {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut normal = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                // Box-Muller from two uniforms.
                let (u, v): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect()
    };
    let total: usize = tokens.iter().sum();
    let g = heads.len();
    DecodeInput {
        n_heads,
        head_dim,
        q: normal(tokens.len() * n_heads * head_dim),
        keys: normal(total * g * head_dim),
        values: normal(total * g * head_dim),
        heads,
        tokens: tokens.to_vec(),
    }
}

/// What both decode kernels share (compiled before either): `HEAD_DIM` from `PER_LANE`, the
/// positions a head shows a step, and the merge of the splits' partials.
pub const COMMON_SOURCE: &str = r#"
// NVRTC has no math headers: negative infinity by its bits.
#ifndef NEG_INF
#define NEG_INF __int_as_float(0xff800000)
#endif
#define HEAD_DIM (PER_LANE * 32)

// The positions a KV head shows a decode step when `n` tokens are cached (the current one
// included): logical index `t < len` is position `t + (t >= sinks ? gap : 0)`. A retrieval
// head sees all `n`; a streaming head its sinks and the last `recent` positions.
__device__ __forceinline__ void visible_positions(int4 e, int n, int* len, int* sinks, int* gap) {
    if (e.w == 0) { *len = n; *sinks = n; *gap = 0; }
    else {
        const int s = min(n, e.y), v = n > e.y ? min(n - e.y, e.z) : 0;
        *len = s + v; *sinks = s; *gap = n - v - s;
    }
}

// Splits of KV head `g` that partial blocks write (of `n_splits` slots per head): every one,
// or a streaming head's `short_splits` where windows are split on their own.
__device__ __forceinline__ int kv_head_splits(int g, int n_splits, unsigned long long retrieval, int short_splits, int short_split) {
    return short_split == 0 || ((retrieval >> g) & 1ull) ? n_splits : short_splits;
}

// kv_head_splits for the merge's head `h` (row-major over rows x query heads).
__device__ __forceinline__ int head_splits(int h, int n_kv, int n_splits, unsigned long long retrieval, int short_splits, int short_split) {
    if (short_split == 0) return n_splits;
    return kv_head_splits((h % (n_kv * GROUP)) / GROUP, n_splits, retrieval, short_splits, short_split);
}

// The (KV head, split) a partial block reads and that split's keys. `short_split == 0`: the
// grid is (KV heads, `n_splits` splits of `long_split` keys), so blockIdx gives both for free
// (the list's arithmetic put about 240 instructions before a block's first load). Otherwise it
// lists every retrieval head's (its bit set in `retrieval`) `n_splits` splits of
// `long_split` keys, then every streaming head's `short_splits` of `short_split` keys (it
// shows at most sinks + recent), split-major, so that neighbouring blocks read different
// heads. A streaming head's window walked by one block in 64-key tiles, each waiting on its
// block-table lookups and then its copies, outlasted a long head's whole split. A launch
// may run part of the list from entry `block0` on: where streaming heads keep their own
// cache type, the retrieval heads' entries and the streaming heads' run in two launches of
// kernels compiled for each type (`Gpu::decode_attention`).
//
// A long head's splits are alike (`lead_splits` 0), or (a row on the tensor-core kernel,
// `DecodeLaunch::lead_splits`) its first `lead_splits` hold `long_split` keys each and the
// rest `tail_split` each: the long splits take about one wave, the short ones follow as
// multiprocessors free up, so the faster multiprocessors take more of them. `*begin` is the
// split's first key, `*split` its keys.
__device__ __forceinline__ void block_work(int n_kv, int n_splits, int long_split, unsigned long long retrieval,
                                           int short_splits, int short_split, int block0, int lead_splits, int tail_split,
                                           int* g, int* s, int* begin, int* split) {
    int j = blockIdx.x + block0;
    *split = long_split;
    if (short_split == 0) {
        *g = j; *s = blockIdx.y;
        if (lead_splits > 0 && *s >= lead_splits) { *begin = lead_splits * long_split + (*s - lead_splits) * tail_split; *split = tail_split; }
        else *begin = *s * long_split;
        return;
    }
    const unsigned long long all = n_kv >= 64 ? ~0ull : (1ull << n_kv) - 1ull;
    unsigned long long m = retrieval & all;
    int r = __popcll(m);
    const bool long_head = j < r * n_splits;
    if (!long_head) { j -= r * n_splits; m = ~retrieval & all; r = n_kv - r; *split = short_split; }
    *s = j / r;
    for (int i = j % r; i > 0; i--) m &= m - 1;  // drop the lowest set bits: the (j % r)-th head
    *g = __ffsll((long long)m) - 1;
    if (long_head && lead_splits > 0 && *s >= lead_splits) { *begin = lead_splits * long_split + (*s - lead_splits) * tail_split; *split = tail_split; }
    else *begin = *s * *split;
}



// Merges the splits of one (row, query head): grid rows x query heads, MERGE_BLOCK threads
// (HEAD_DIM where MERGE_WIDE is 0). Partial maxima are in natural-log units; a split without
// keys has maximum -inf and is skipped.
//
// Two forms of the wide merge: in one pass (MERGE_ONEPASS, the default since session 28: one
// round trip to the partials, below), or the listing form, which first takes the maximum of
// all splits' maxima, then, a block's worth of splits at a time, lists the live ones with
// their weights in shared memory (in split order), so no thread branches on an empty split:
// when a layer's splits were sized by its longest head, a streaming head's were nearly all
// empty (on the H200, 18.6 us a launch over 65-257 mostly empty splits, BENCHMARKS.md
// session 18; listing them took a 128K decode step from 8.98 to 8.86 ms, session 19; since
// then a streaming head's window has splits of its own, and the one-pass form measured
// 0.135 -> 0.131 ms at 1 x 128K, session 28). MERGE_PARTS groups of HEAD_DIM threads then
// sum the list, group k entries k, k + MERGE_PARTS, ... (for 64 splits sixteen independent
// loads a thread, where one group walks them in four dependent rounds of sixteen), and the
// groups add up in order.
// MERGE_WIDE = 0 (`DUO_DECODE_MERGE_WIDE=0`) keeps one group: the form before session 21,
// whose merge took 10.2 us a launch for data that moves in well under one; the groups took
// duo 0.5 decode attention at 1 x 128K from 0.080 to 0.077 ms (int4 0.047 to 0.043) and a
// 128K Llama-3-8B duo step from 6.89-6.93 to 6.78-6.79 ms (BENCHMARKS.md session 21).
#ifndef MERGE_WIDE
#define MERGE_WIDE 1
#endif
#ifndef MERGE_ONEPASS
#define MERGE_ONEPASS 1
#endif
#ifndef MERGE_THREADS
#error "MERGE_THREADS comes from the host (decode_attention::MERGE_THREADS)"
#endif
#define MERGE_PARTS (HEAD_DIM >= MERGE_THREADS ? 1 : MERGE_THREADS / HEAD_DIM)
#define MERGE_BLOCK (MERGE_PARTS * HEAD_DIM)  // MERGE_THREADS where HEAD_DIM divides it (64, 128)
#if MERGE_WIDE
#define MERGE_BOUNDS __launch_bounds__(MERGE_BLOCK)
#define M_PARTS MERGE_PARTS
#else
#define MERGE_BOUNDS
#define M_PARTS 1
#endif
#define M_BLOCK (M_PARTS * HEAD_DIM)
extern "C" __global__ void MERGE_BOUNDS duo_decode_merge(
    const float* __restrict__ part_m, const float* __restrict__ part_l, const float* __restrict__ part_acc,
    int n_splits, int n_kv, unsigned long long retrieval, int short_splits, int short_split,
    float* __restrict__ out, unsigned short* __restrict__ out_bf16)
{
    // Partials are laid out n_splits per head; a streaming head's past its first
    // short_splits were never written.
    const int live_splits = head_splits(blockIdx.x, n_kv, n_splits, retrieval, short_splits, short_split);
    pdl_wait();  // the partial kernel's output (DUO_PDL=1: this block may start before it ends)
    // The output projection after it (Gpu::gemv_fused) may start asking for its weights.
    pdl_launch_dependents();
#if MERGE_ONEPASS && M_PARTS > 1
    // One pass (MERGE_ONEPASS, the default; DUO_DECODE_MERGE_ONEPASS=0 for the listing form
    // below): group k of M_PARTS takes splits k, k + M_PARTS, ..., eight at a time with their
    // maxima, sums and values loaded together, and keeps its own running maximum (rescaling
    // what it has summed when it rises); the groups then meet in shared memory. One round
    // trip to the partials where the listing form takes three (maxima, maxima again, then
    // sums and values), and no barrier until the groups meet. A split without keys (maximum
    // -inf) adds nothing; its values, never written, are read but never summed.
    const int h = blockIdx.x, t = threadIdx.x;
    const int c = t % HEAD_DIM, group = t / HEAD_DIM;
    const float* pm = part_m + (size_t)h * n_splits;
    const float* pl = part_l + (size_t)h * n_splits;
    const float* pa = part_acc + (size_t)h * n_splits * HEAD_DIM;
    float mx = NEG_INF, l = 0.f, a = 0.f;
    const int mine = live_splits > group ? (live_splits - group + M_PARTS - 1) / M_PARTS : 0;
    for (int k0 = 0; k0 < mine; k0 += 8) {
        float ms[8], ls[8], as[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            // All three loaded at once (not the sum and values after the maximum, which
            // would be a second round trip); a split without keys then counts as zeros.
            const int si = group + (k0 + j) * M_PARTS;
            const bool in = k0 + j < mine;
            ms[j] = in ? pm[si] : NEG_INF;
            ls[j] = in ? pl[si] : 0.f;
            as[j] = in ? pa[(size_t)si * HEAD_DIM + c] : 0.f;
        }
#pragma unroll
        for (int j = 0; j < 8; j++) if (ms[j] == NEG_INF) { ls[j] = 0.f; as[j] = 0.f; }
        float m2 = mx;
#pragma unroll
        for (int j = 0; j < 8; j++) m2 = fmaxf(m2, ms[j]);
        if (m2 == NEG_INF) continue;
        const float cf = __expf(mx - m2);  // 0 while nothing was summed (mx -inf)
        l *= cf;
        a *= cf;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float w = __expf(ms[j] - m2);  // 0 for a split without keys
            l += ls[j] * w;
            a += as[j] * w;
        }
        mx = m2;
    }
    __shared__ float group_m[M_PARTS], group_l[M_PARTS], group_a[M_PARTS][HEAD_DIM];
    group_a[group][c] = a;
    if (c == 0) { group_m[group] = mx; group_l[group] = l; }
    __syncthreads();
    if (group > 0) return;
    float top = NEG_INF;
#pragma unroll
    for (int g = 0; g < M_PARTS; g++) top = fmaxf(top, group_m[g]);
    l = 0.f; a = 0.f;
#pragma unroll
    for (int g = 0; g < M_PARTS; g++) {
        const float w = __expf(group_m[g] - top);  // 0 for a group without keys
        l += group_l[g] * w;
        a += group_a[g][c] * w;
    }
#else
    // Each round lists up to M_BLOCK splits.
    __shared__ float live_w[M_BLOCK], warp_max[M_BLOCK / 32];
    __shared__ int live_s[M_BLOCK], warp_live[M_BLOCK / 32];
    const int h = blockIdx.x, t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const int c = M_PARTS > 1 ? t % HEAD_DIM : t, group = M_PARTS > 1 ? t / HEAD_DIM : 0;  // one group: the block is a head's dims
    const float* pm = part_m + (size_t)h * n_splits;
    const float* pl = part_l + (size_t)h * n_splits;
    const float* pa = part_acc + (size_t)h * n_splits * HEAD_DIM;
    float mm = NEG_INF;
    for (int s = t; s < live_splits; s += M_BLOCK) mm = fmaxf(mm, pm[s]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mm = fmaxf(mm, __shfl_xor_sync(0xffffffffu, mm, o));
    if (lane == 0) warp_max[warp] = mm;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < M_BLOCK / 32; w++) mm = fmaxf(mm, warp_max[w]);
    float l = 0.f, a = 0.f;
    for (int base = 0; base < live_splits; base += M_BLOCK) {
        const int s = base + t;
        const float ms = s < live_splits ? pm[s] : NEG_INF;
        const bool live = ms != NEG_INF;
        const unsigned ballot = __ballot_sync(0xffffffffu, live);
        if (lane == 0) warp_live[warp] = __popc(ballot);
        __syncthreads();
        int at = __popc(ballot & ((1u << lane) - 1u)), count = 0;
#pragma unroll
        for (int w = 0; w < M_BLOCK / 32; w++) {
            at += w < warp ? warp_live[w] : 0;
            count += warp_live[w];
        }
        if (live) { live_w[at] = __expf(ms - mm); live_s[at] = s; }
        __syncthreads();
#if M_PARTS > 1
        // A counted loop (entries group + M_PARTS k): with the stride in its condition the
        // compiler unrolled it with an exit test after every entry, one load in flight.
        const int mine = count > group ? (count - group + M_PARTS - 1) / M_PARTS : 0;
#else
        const int mine = count;
#endif
#pragma unroll 16
        for (int k = 0; k < mine; k++) {
            const int i = group + k * M_PARTS;
            const float w = live_w[i];
            const int si = live_s[i];
            l += pl[si] * w;
            a += pa[(size_t)si * HEAD_DIM + c] * w;
        }
        __syncthreads();
    }
#if M_PARTS > 1
    __shared__ float group_a[M_PARTS][HEAD_DIM], group_l[M_PARTS];  // group 0's slots unused
    if (group > 0) {
        group_a[group][c] = a;
        if (c == 0) group_l[group] = l;
    }
    __syncthreads();
    if (group > 0) return;
#pragma unroll
    for (int g = 1; g < M_PARTS; g++) { a += group_a[g][c]; l += group_l[g]; }
#endif
#endif
    const float r = a / l;
    if (out) out[h * HEAD_DIM + c] = r;
    if (out_bf16) {
        unsigned u = __float_as_uint(r);
        u += 0x7fffu + ((u >> 16) & 1u);
        out_bf16[h * HEAD_DIM + c] = (unsigned short)(u >> 16);
    }
}
"#;

/// The CUDA-core partial kernel (after [`COMMON_SOURCE`]): one block per KV head and split
/// (the `GROUP` query heads that share a KV head are served from one read of its keys and
/// values; a warp takes `KPW` keys at a time). `GROUP`, `PER_LANE` (`head_dim / 32`) and
/// `KPW` are compile-time constants, given to NVRTC per model shape. Every head size and
/// both cache types; the reference path of [`TENSOR_SOURCE`].
pub const CORES_SOURCE: &str = r#"
#define WARPS 4
// Block-table entries a split may keep in shared memory.
#define TAB_MAX 72

#ifdef KV_BF16
typedef unsigned short kv_t;
#else
typedef float kv_t;
#endif

// A warp works on KPW keys at a time, LANES lanes per key, DIMS dimensions per lane: the
// dot product of a key needs only log2(LANES) shuffles per query head.
#ifndef KPW
#define KPW 4
#endif
#define LANES (32 / KPW)
#define DIMS (HEAD_DIM / LANES)

// A lane's part of a row, DIMS elements from dimension `first`, as raw 16-byte words: loads
// are issued one iteration ahead of their use, so each warp keeps two steps of keys and values
// in flight (one step alone leaves too few bytes in flight to saturate HBM).
#define RAW_N (DIMS * (int)sizeof(kv_t) / 16)
__device__ __forceinline__ void load_raw(const kv_t* __restrict__ row, int first, uint4* r) {
    const uint4* p = reinterpret_cast<const uint4*>(row + first);
#pragma unroll
    for (int i = 0; i < RAW_N; i++) r[i] = p[i];
}

// Widens raw words to f32 (a bf16 is the top half of an f32).
__device__ __forceinline__ void unpack(const uint4* r, float* out) {
#pragma unroll
    for (int i = 0; i < RAW_N; i++) {
        const unsigned w[4] = {r[i].x, r[i].y, r[i].z, r[i].w};
#ifdef KV_BF16
#pragma unroll
        for (int j = 0; j < 4; j++) { out[8*i + 2*j] = __uint_as_float(w[j] << 16); out[8*i + 2*j + 1] = __uint_as_float(w[j] & 0xffff0000u); }
#else
#pragma unroll
        for (int j = 0; j < 4; j++) out[4*i + j] = __uint_as_float(w[j]);
#endif
    }
}

// Grid (the layer's (KV head, split) list of `block_work`, 1, decode rows), or (KV heads,
// splits, decode rows) where every head is split alike: row b is
// sequence slot row_slot[b] at position
// row_pos[b] (its own token already appended); a negative slot is padding.
extern "C" __global__ void duo_decode_partial(
    const float* __restrict__ q, const kv_t* __restrict__ keys, const kv_t* __restrict__ values,
    const int4* __restrict__ heads, const int* __restrict__ row_slot, const int* __restrict__ row_pos, Paged pg,
    int long_split, int n_splits, int n_kv, unsigned long long retrieval, int short_splits, int short_split, int block0,
    int lead_splits, int tail_split, float scale,
    float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_acc)
{
    pdl_launch_dependents();  // as the tensor-core kernel
    const int b = blockIdx.z;
    int g, s, first_key, split;
    block_work(n_kv, n_splits, long_split, retrieval, short_splits, short_split, block0, lead_splits, tail_split, &g, &s, &first_key, &split);
    const int seq_slot = row_slot[b];
    if (seq_slot < 0) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int sub = lane / LANES, first = (lane % LANES) * DIMS;
    const int4 e = heads[g];
    const int n_heads = n_kv * GROUP;
    q += (size_t)b * n_heads * HEAD_DIM;
    int len_i, sinks, gap;
    visible_positions(e, row_pos[b] + 1, &len_i, &sinks, &gap);
    const unsigned len = len_i;
    const unsigned begin = (unsigned)first_key;
    const unsigned end = min(len, begin + (unsigned)split);
    // A retrieval head's split covers consecutive positions: its block-table entries go to
    // shared memory first, so no key load waits on a table load from global memory.
    __shared__ int stab[TAB_MAX];
    const int tab0 = begin >> pg.block_log2;
    const bool shared_tab = e.w == 0 && (split >> pg.block_log2) + 2 <= TAB_MAX;
    if (shared_tab) {
        const int* trow = pg.tables + (size_t)seq_slot * pg.stride;
        const int last = begin < end ? (int)((end - 1) >> pg.block_log2) : tab0 - 1;
        for (int i = threadIdx.x; tab0 + i <= last; i += blockDim.x) stab[i] = trow[tab0 + i];
    }
    __syncthreads();
    const int bmask = (1 << pg.block_log2) - 1;
    auto row_of = [&](unsigned pos) -> size_t {
        if (shared_tab) return (((size_t)stab[(pos >> pg.block_log2) - tab0] * pg.group + e.x) << pg.block_log2) + (pos & bmask);
        return (size_t)kv_row(pg, e, seq_slot, pos);
    };
    pdl_wait();  // the queries and this step's rows (the tables above are older)
    float qr[GROUP][DIMS], acc[GROUP][DIMS], m[GROUP], l[GROUP];
#pragma unroll
    for (int j = 0; j < GROUP; j++) {
#pragma unroll
        for (int i = 0; i < DIMS; i++) { qr[j][i] = q[(size_t)(g * GROUP + j) * HEAD_DIM + first + i] * scale; acc[j][i] = 0.f; }
        m[j] = NEG_INF; l[j] = 0.f;
    }
    // Every lane runs the same number of steps (shuffles need the whole warp); a lane whose
    // key is past the end takes part in the reductions and changes nothing.
    const unsigned stride = WARPS * KPW;
    uint4 kr[RAW_N], vr[RAW_N];
    {
        const unsigned t = begin + warp * KPW + sub;
        if (t < end) {
            const size_t row = row_of(t + (t >= (unsigned)sinks ? gap : 0));
            load_raw(keys + key_row(pg, row) * HEAD_DIM, first, kr);
            load_raw(values + row * HEAD_DIM, first, vr);
        }
    }
    for (unsigned t0 = begin + warp * KPW; t0 < end; t0 += stride) {
        const unsigned t = t0 + sub;
        const bool valid = t < end;
        uint4 kn[RAW_N], vn[RAW_N];
        const unsigned tn = t + stride;
        if (tn < end) {
            const size_t row = row_of(tn + (tn >= (unsigned)sinks ? gap : 0));
            load_raw(keys + key_row(pg, row) * HEAD_DIM, first, kn);
            load_raw(values + row * HEAD_DIM, first, vn);
        }
        float k[DIMS], v[DIMS];
        if (valid) {
            unpack(kr, k);
            unpack(vr, v);
        } else {
#pragma unroll
            for (int i = 0; i < DIMS; i++) { k[i] = 0.f; v[i] = 0.f; }
        }
#pragma unroll
        for (int j = 0; j < GROUP; j++) {
            float dot = 0.f;
#pragma unroll
            for (int i = 0; i < DIMS; i++) dot += qr[j][i] * k[i];
#pragma unroll
            for (int o = LANES / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, o);
            if (valid) {
                // Rescale only when the running maximum grows (rare after the first keys).
                if (dot > m[j]) {
                    const float c = __expf(m[j] - dot);
#pragma unroll
                    for (int i = 0; i < DIMS; i++) acc[j][i] *= c;
                    l[j] *= c;
                    m[j] = dot;
                }
                const float p = __expf(dot - m[j]);
#pragma unroll
                for (int i = 0; i < DIMS; i++) acc[j][i] += p * v[i];
                l[j] += p;
            }
        }
#pragma unroll
        for (int i = 0; i < RAW_N; i++) { kr[i] = kn[i]; vr[i] = vn[i]; }
    }
    // Merge the WARPS * KPW partial states of the block, one query head at a time.
    __shared__ float sm[WARPS * KPW][GROUP], sl[WARPS * KPW][GROUP], sacc[WARPS * KPW][HEAD_DIM];
    const int slot = warp * KPW + sub;
#pragma unroll
    for (int j = 0; j < GROUP; j++) {
        if (lane % LANES == 0) { sm[slot][j] = m[j]; sl[slot][j] = l[j]; }
#pragma unroll
        for (int i = 0; i < DIMS; i++) sacc[slot][first + i] = acc[j][i];
        __syncthreads();
        if (warp == 0) {
            float mm = NEG_INF;
            for (int w = 0; w < WARPS * KPW; w++) mm = fmaxf(mm, sm[w][j]);
            float ll = 0.f, out[PER_LANE];
#pragma unroll
            for (int i = 0; i < PER_LANE; i++) out[i] = 0.f;
            for (int w = 0; w < WARPS * KPW; w++) {
                const float c = sm[w][j] == NEG_INF ? 0.f : __expf(sm[w][j] - mm);
                ll += sl[w][j] * c;
#pragma unroll
                for (int i = 0; i < PER_LANE; i++) out[i] += sacc[w][lane * PER_LANE + i] * c;
            }
            const size_t p = ((size_t)b * n_heads + g * GROUP + j) * n_splits + s;
            if (lane == 0) { part_m[p] = mm; part_l[p] = ll; }
#pragma unroll
            for (int i = 0; i < PER_LANE; i++) part_acc[p * HEAD_DIM + lane * PER_LANE + i] = out[i];
        }
        __syncthreads();
    }
}

"#;

/// The tensor-core partial kernel (after [`crate::prefill_attention::TENSOR_CORE_HELPERS`]
/// and [`COMMON_SOURCE`]): bf16 caches, heads of 64 or 128, up to 16 query heads per KV head.
///
/// A block (4 warps) walks its split in tiles of 64 keys that `cp.async` brings into shared
/// memory three stages deep, so two tiles (64 KiB for heads of 128) are in flight while one is
/// reduced: enough bytes in flight per multiprocessor to stream HBM, without the registers a
/// CUDA-core loop spends holding loads. The `GROUP` query heads of the KV head are the rows
/// of an m16n8k16 `mma.sync` (padded to 16), each warp takes 16 keys of a tile: `Q K^T` and
/// `P V` are two short runs of tensor-core instructions instead of `GROUP x HEAD_DIM` FMAs
/// per key. Queries and softmax weights enter as bf16 (as in the prefill kernel), so its
/// parity bound is the prefill kernel's `1e-2`.
pub const TENSOR_SOURCE: &str = r#"
// Keys per pipeline stage: 64, or BYTE_TILE for a quantised cache (DUO_DECODE_TILE=128, a
// measurement knob: each warp then takes two 16-key slices per stage, one barrier and one
// round of copies per 128 keys).
#if defined(KV_BYTES) && defined(BYTE_TILE)
#define TILE BYTE_TILE
#else
#define TILE 64
#endif
#if TILE % 64 != 0
#error "a tile is whole 64-key runs (the scale copies take 2 TILE / 128 per thread)"
#endif
#define WARP_KEYS (TILE / 4)
// bf16 stages: rows of HEAD_DIM elements whose 16-byte chunks are swizzled (KV_SWIZZLE, the
// default: chunk c of tile row r lies at chunk c ^ (r & 7) of its row), or rows padded by 8
// elements (KV_SWIZZLE=0). Both keep ldmatrix's eight rows on distinct banks; the padding
// leaves every odd row 16 bytes off a 32-byte boundary, and a cp.async whose 32-byte sector
// lands across one is asked of the L2 twice: Nsight Compute counted 24 sectors a warp's copy
// of 512 bytes against 16 (BENCHMARKS.md, session 28). The swizzle keeps each sector in one
// aligned 32-byte unit of shared memory. (A quantised cache's f16 values in shared memory,
// `conv`, stay padded: no copy writes them.)
#if KV_SWIZZLE && !defined(KV_BYTES)
#define TPAD HEAD_DIM
#define SWZ_T(r, c) ((c) ^ (((r) & 7) << 4))
#else
#define TPAD (HEAD_DIM + 8)
#define SWZ_T(r, c) (c)
#endif
// The element offset of tile row r's column col (a multiple of 8) in a bf16 tile.
#define SOFF(r, col) ((r) * TPAD + SWZ_T(r, (col) * 2) / 2)
// Where byte c (a multiple of 8) of a staged row r lies in it: bf16 stages as above; raw rows
// of 128 bytes (fp8, int8, K8V4 at heads of 128) swizzled the same way (their reads then
// land on distinct banks as the padded rows' did); shorter raw rows (int4, heads of 64)
// padded (RPAD below), where a swizzle within 64 bytes would put a load's rows on half
// the banks.
#if KV_SWIZZLE && (!defined(KV_BYTES) || ROW_BYTES == 128)
#define SWZ(r, c) ((c) ^ (((r) & 7) << 4))
#else
#define SWZ(r, c) (c)
#endif
#define TILE_ELEMS (TILE * TPAD)
#ifdef KV_BYTES
// A quantised cache (fp8, int8, int4, K8V4): stages hold raw rows (ROW_BYTES, see RPAD) and
// their scales; the tensor cores run in f16 (see TENSOR_CORE_HELPERS). A byte stage is half a
// bf16 stage, so fp8's five stages keep as many bytes in flight as bf16's three; int8 and
// int4, with more work per byte, gain more from more blocks per multiprocessor (three int8
// stages at four blocks, four int4 stages at three) than from deep pipelines. STAGES and
// MIN_BLOCKS come from the host (tensor_stages, tensor_blocks), which sizes the shared
// memory and the splits from the same numbers.
typedef unsigned char kv_t;
// Rows of 128 bytes are swizzled (SWZ) and unpadded; others are padded by BYTE_PAD (16, the
// default, or 32: DUO_DECODE_BYTE_PAD): 16 leaves odd rows 16 bytes off a 32-byte boundary,
// as bf16's padding did (see KV_SWIZZLE); 32 keeps every row aligned to 32 bytes at the
// price of two-way bank conflicts on 128-byte keys' reads (measured: session 28).
#if KV_SWIZZLE && ROW_BYTES == 128
#define RPAD ROW_BYTES
#else
#define RPAD (ROW_BYTES + BYTE_PAD)
#endif
// Staged int4 key rows lie KPAD apart, unpadded: a lane reads 16 bytes (8 at 64 dims) of
// row gr and row gr + 8, so the eight lanes of a quarter-warp read two rows, 128 bytes, and
// those rows must not share banks, which the 80 bytes of RPAD broke (two wavefronts each
// where one does, as the copies' writes). Value rows keep RPAD: a lane reads four rows'
// words at 2 tq (+ 1, + 8, + 9), which padding spreads over the banks.
#ifdef KEY_INT4
#define KPAD K_ROW_BYTES
#else
#define KPAD RPAD
#endif
// N 32-bit words from shared memory at p (aligned to 4 N bytes) in one load.
template <int N>
__device__ __forceinline__ void load_words(const unsigned char* p, unsigned* w) {
    if (N == 4) { const uint4 x = *reinterpret_cast<const uint4*>(p); w[0] = x.x; w[1] = x.y; w[2] = x.z; w[3] = x.w; }
    else if (N == 2) { const uint2 x = *reinterpret_cast<const uint2*>(p); w[0] = x.x; w[1] = x.y; }
    else { w[0] = *reinterpret_cast<const unsigned*>(p); }
}
// Values straight from their codes into the tensor cores (V_REGS, up to 8 query heads per
// KV head): the product is taken transposed, O^T = V^T P^T, so that the values are the A
// operand (rows = head dimensions, k = the warp's 16 keys) and the softmax weights the B
// operand (n = the query heads, straight from the score fragments). A lane's A fragments
// need two keys' codes of one dimension per register: it reads its HEAD_DIM / 8 dimensions
// (dims permuted: fragment row gr of product i is dim (HEAD_DIM / 8) gr + 2 i, row gr + 8 the
// next) from each of its four key rows and pairs the rows' bytes by byte permutes, then
// scales each pair in f16 by its two keys' row scales (int4: step and minimum, one fused
// multiply-add): the values the previous form dequantised into shared memory, with the same
// roundings, but in registers. (Folding the scales into the weights instead would be cheaper
// but rounds weight times scale to f16, which underflows for small scales.) No dequantised
// copy in shared memory, and half the products of the m16 form for heads of <= 8 queries.
#if V_REGS && GROUP <= 8
#define VREG 1
#endif
#define RAW_TILE (TILE * RPAD)
#define PACK pack_h
#define MMA mma_h
#else
typedef bf16_t kv_t;
#define PACK pack
#define MMA mma
#endif

#ifdef DUO_TRACE
// A measurement of where one launch's time goes (DUO_DECODE_TRACE=1, timings only): per
// block its multiprocessor, its first and last instants on the global timer (ns) and its
// cycles from entry to its first tile in shared memory and to its end (`Gpu::decode_trace`).
__device__ unsigned long long duo_trace[5 * 4096];
#endif
extern "C" __global__ void __launch_bounds__(128, MIN_BLOCKS) duo_decode_partial_tc(
    const float* __restrict__ q, const kv_t* __restrict__ keys, const kv_t* __restrict__ values,
    const int4* __restrict__ heads, const int* __restrict__ row_slot, const int* __restrict__ row_pos, Paged pg,
    int long_split, int n_splits, int n_kv, unsigned long long retrieval, int short_splits, int short_split, int block0,
    int lead_splits, int tail_split, float scale_log2,
    float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_acc)
{
#ifdef DUO_TRACE
    unsigned long long tr_t0, tr_c0 = clock64(), tr_c1 = 0;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(tr_t0));
#endif
    pdl_launch_dependents();  // the merge may be placed (DUO_PDL=1); it waits for this grid
    const int b = blockIdx.z;
    int g, s, first_key, split;
    block_work(n_kv, n_splits, long_split, retrieval, short_splits, short_split, block0, lead_splits, tail_split, &g, &s, &first_key, &split);
    const int seq_slot = row_slot[b];
    if (seq_slot < 0) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4, tq = lane % 4;
    const int4 e = heads[g];
    const int n_heads = n_kv * GROUP;
    int len, sinks, gap;
    visible_positions(e, row_pos[b] + 1, &len, &sinks, &gap);
    const int begin = first_key, end = min(len, begin + split);
    const size_t p_first = ((size_t)b * n_heads + g * GROUP) * n_splits + s;  // row 0's partial
    // The queries and this step's key and value rows come from RoPE + append: under DUO_PDL=1
    // this block may have started before it finished, so everything below waits for it, an
    // empty split's partials too (the kernel before may read them, as a timing loop's merge).
    pdl_wait();
    if (begin >= end) {
        // A split past this head's keys: an empty partial, which the merge skips.
        if (threadIdx.x < GROUP) { part_m[p_first + (size_t)threadIdx.x * n_splits] = NEG_INF; part_l[p_first + (size_t)threadIdx.x * n_splits] = 0.f; }
        return;
    }

    // The queries as A fragments (rows = the GROUP query heads, zero beyond), scaled for exp2.
    const float* qb = q + ((size_t)b * n_heads + g * GROUP) * HEAD_DIM;
    unsigned qa[HEAD_DIM / 16][4];
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; kk++) {
#pragma unroll
        for (int x = 0; x < 4; x++) {
#ifdef KV_BYTES
            // Dims permuted (the same for keys, below): lane tq's k-slots of product kk take
            // dims (HEAD_DIM / 4) tq + 4 kk .. + 3, so that its key bytes are contiguous.
            const int r = gr + (x & 1) * 8, c = (HEAD_DIM / 4) * tq + 4 * kk + (x >> 1) * 2;
#else
            const int r = gr + (x & 1) * 8, c = kk * 16 + (x >> 1) * 8 + 2 * tq;
#endif
            qa[kk][x] = r < GROUP ? PACK(qb[r * HEAD_DIM + c] * scale_log2, qb[r * HEAD_DIM + c + 1] * scale_log2) : 0u;
        }
    }
#ifdef KEY_INT4
    // Each query row's sum (rows gr and gr + 8), of the f16 values the tensor cores see.
    float qsum[2] = {0.f, 0.f};
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; kk++)
#pragma unroll
        for (int x = 0; x < 4; x++) qsum[x & 1] += h2f(qa[kk][x] & 0xffffu) + h2f(qa[kk][x] >> 16);
#pragma unroll
    for (int i = 0; i < 2; i++) {
        qsum[i] += __shfl_xor_sync(0xffffffff, qsum[i], 1);
        qsum[i] += __shfl_xor_sync(0xffffffff, qsum[i], 2);
    }
#endif

    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int n_tiles = (end - begin + TILE - 1) / TILE;
    // A tile is copied in 16-byte chunks, NCH per thread; chunk j of this thread holds key
    // row CH_ROW(j) of the tile (below).
#ifdef KV_BYTES
#define CPR (ROW_BYTES / 16)
#else
#define CPR (HEAD_DIM / 8)
#endif
#define NCH (TILE * CPR / 128)
// Which row and 16-byte column of the tile chunk j of this thread copies: the block's 128
// threads share the tile, NCH chunks each. (Each warp copying and waiting for its own 16
// keys, without a block-wide barrier per tile, measured no faster on the H200: BENCHMARKS.md
// session 12.)
#define CH_ROW(j) ((threadIdx.x + (j) * 128) / CPR)
// Key rows spaced out (PagedArgs::key_shift) are only ever bf16 windows' (beside K8V4), so a
// byte cache's kernel never shifts: its copies keep their instructions (ptxas: one int4 form
// spilled 40 bytes more with the shift read from the arguments).
#ifdef KV_BYTES
#define KEY_ROW(r) (r)
#else
#define KEY_ROW(r) key_row(pg, r)
#endif
#define CH_COL(j) ((threadIdx.x + (j) * 128) % CPR)
    const int cap = e.w == 0 ? 1 : slot_cap(pg, seq_slot);
    const int* trow = pg.tables + (size_t)seq_slot * pg.stride;
    auto pos_of = [&](int t) { return t + (t >= sinks ? gap : 0); };
    // The block-table entries of the next tile to copy, loaded one tile ahead: their latency
    // then hides behind a tile's compute instead of stalling the copies that need them.
    int ent[NCH];
#ifdef KV_BYTES
    int sent;  // the entry of the row whose scale this thread copies
#endif
    // A retrieval head's 64-key runs that start on a block of at least 64 tokens are each one
    // run of consecutive rows: one table entry per run (a tile of 128 keys has two), and
    // each row its run's first row plus its index (no per-row lookup).
    const bool page_tiles = e.w == 0 && pg.block_log2 >= 6 && (begin & 63) == 0;
    long long row0[TILE / 64] = {};  // each 64-row run's first row, for the next tile to copy
#if TILE > 64
    // Each run's first row picked by comparisons: indexing row0 by a thread-dependent run
    // would put it on the stack.
    auto run_row0 = [&](int r) {
        long long f = row0[0];
#pragma unroll
        for (int h = 1; h < TILE / 64; h++) if (r >= 64 * h) f = row0[h];
        return f;
    };
#define PAGED_ROW(r) (run_row0(r) + (r) % 64)
#else
#define PAGED_ROW(r) (row0[(r) / 64] + (r) % 64)
#endif
    auto fetch_entries = [&](int tile) {
        const int t0 = begin + tile * TILE;
        if (page_tiles) {
#pragma unroll
            for (int h = 0; h < TILE / 64; h++) {
                const int t = t0 + 64 * h;
                row0[h] = t < end ? kv_row_from(pg, e, t, cap, trow[kv_entry_at(pg, e, t, cap)]) : 0;
            }
            return;
        }
#pragma unroll
        for (int j = 0; j < NCH; j++) {
            const int t = t0 + CH_ROW(j);
            ent[j] = t < end ? trow[kv_entry_at(pg, e, pos_of(t), cap)] : 0;
        }
#ifdef KV_BYTES
        const int t = t0 + threadIdx.x % TILE;
        sent = t < end ? trow[kv_entry_at(pg, e, pos_of(t), cap)] : 0;
#endif
    };
    // A whole tile of a retrieval head's page run (page_tiles, every key before `end`): each
    // thread's NCH chunks lie at fixed strides from its first one, in the pool and in shared
    // memory (chunk j is row CH_ROW(0) + RS j of the tile), so one address per 64-row run and
    // constant offsets replace the per-chunk row arithmetic, a third of a byte cache's
    // instructions per key. Measured on the H200 at 1 x 128K: int8 0.117 -> 0.105 ms, fp8,
    // int4 and bf16 unchanged (BENCHMARKS.md).
#define RS (128 / CPR)
    const unsigned smem_base = smem_addr(smem_raw);
    // Value rows are as wide as key rows (`row_bytes`), or (K8V4) narrower (`v_row_bytes`):
    // then a thread copies its chunk of a value row only where the row has one.
    auto copy_run_tile = [&](unsigned k_dst, unsigned v_dst, const char* kbase, const char* vbase, int row_bytes, int v_row_bytes, int pad, int v_pad) {
        const int r = threadIdx.x / CPR, c = (threadIdx.x % CPR) * 16;
        long long first[TILE / 64], v_first[TILE / 64];
#pragma unroll
        for (int h = 0; h < TILE / 64; h++) { first[h] = (row0[h] + r) * row_bytes + c; v_first[h] = (row0[h] + r) * v_row_bytes + c; }
#pragma unroll
        for (int j = 0; j < NCH; j++) {
            const int run = (j * RS) / 64, in_run = (j * RS) % 64;
            cp_async16_full(k_dst + (r + j * RS) * pad + SWZ(r + j * RS, c), kbase + first[run] + (long long)in_run * row_bytes);
            if (c < v_row_bytes) cp_async16_full(v_dst + (r + j * RS) * v_pad + SWZ(r + j * RS, c), vbase + v_first[run] + (long long)in_run * v_row_bytes);
        }
    };
    // A tile's keys and values from `t0` into the stage at byte `stage_at` of shared memory
    // (K, then V `tile_bytes` on; rows of `row_bytes` in the pool, `pad` apart here, values
    // `v_pad`): a whole
    // page-run tile by copy_run_tile, else chunk by chunk, each row looked up (the rows past
    // `end` zero-filled). Both caches' forms, bf16 rows and byte rows alike.
    auto copy_tile = [&](int t0, unsigned stage_at, unsigned tile_bytes, int row_bytes, int v_row_bytes, int pad, int v_pad) {
        const char* kbase = reinterpret_cast<const char*>(keys);
        const char* vbase = reinterpret_cast<const char*>(values);
        if (page_tiles && t0 + TILE <= end) {
            copy_run_tile(smem_base + stage_at, smem_base + stage_at + tile_bytes, kbase, vbase, row_bytes, v_row_bytes, pad, v_pad);
            return;
        }
        unsigned char* kd = smem_raw + stage_at;
        unsigned char* vd = kd + tile_bytes;
#pragma unroll
        for (int j = 0; j < NCH; j++) {
            const int r = CH_ROW(j), c = CH_COL(j) * 16;
            const int t = t0 + r;
            const bool live = t < end;
            const long long row = page_tiles ? PAGED_ROW(r) : kv_row_from(pg, e, pos_of(t), cap, ent[j]);
            // A streaming head's key row in its view (KEY_ROW; page runs are retrieval heads').
            const size_t at = live ? (size_t)KEY_ROW(row) * row_bytes + c : 0, v_at = live ? (size_t)row * v_row_bytes + c : 0;
            cp_async16(kd + r * pad + SWZ(r, c), kbase + at, live ? 16 : 0);
            if (c < v_row_bytes) cp_async16(vd + r * v_pad + SWZ(r, c), vbase + v_at, live ? 16 : 0);
        }
    };
#ifdef KV_BYTES
    unsigned char* raw = smem_raw;                                         // [STAGES][K, V][TILE][RPAD] (keys KPAD apart)
    float* scl = reinterpret_cast<float*>(smem_raw + STAGES * 2 * RAW_TILE);  // [STAGES][K, V][TILE]
    bf16_t* conv = reinterpret_cast<bf16_t*>(scl + STAGES * 2 * TILE) + warp * 16 * TPAD;  // this warp's V (f16)
    auto load_tile = [&](int tile) {
        const int t0 = begin + tile * TILE;
        copy_tile(t0, (tile % STAGES) * 2 * RAW_TILE, RAW_TILE, K_ROW_BYTES, V_ROW_BYTES, KPAD, RPAD);
        // Row scales, keys' then values' (2 TILE of them): thread x copies row x % TILE's. A
        // fixed count of copies per thread (one, or two for 128-key tiles): a loop from
        // threadIdx.x, whose trip count the compiler cannot know, compiled to a remainder
        // loop of about 30 instructions a tile (the int4 kernel's profile, BENCHMARKS.md).
        const int r = threadIdx.x % TILE, t = t0 + r;
        const bool live = t < end;
        const long long row = !live ? 0 : page_tiles ? PAGED_ROW(r) : kv_row_from(pg, e, pos_of(t), cap, sent);
#pragma unroll
        for (int k = 0; k < 2 * TILE / 128; k++) {
            const int idx = threadIdx.x + 128 * k;
            cp_async4(scl + ((tile % STAGES) * 2 + idx / TILE) * TILE + r, (idx < TILE ? pg.kscale : pg.vscale) + row, live ? 4 : 0);
        }
    };
#else
    bf16_t* smem = reinterpret_cast<bf16_t*>(smem_raw);
    auto load_tile = [&](int tile) {
        copy_tile(begin + tile * TILE, (tile % STAGES) * 2 * TILE_ELEMS * 2, TILE_ELEMS * 2, HEAD_DIM * 2, HEAD_DIM * 2, TPAD * 2, TPAD * 2);
    };
#endif
    fetch_entries(0);
#pragma unroll
    for (int t = 0; t < STAGES - 1; t++) {
        if (t < n_tiles) {
            load_tile(t);
            fetch_entries(t + 1);
        }
        cp_async_commit();
    }

#ifdef VREG
    // O^T fragments: product i's rows are dims (HEAD_DIM / 8) gr + 2 i (+ 1), columns the
    // query heads 2 tq and 2 tq + 1.
#define O_FRAGS (HEAD_DIM / 16)
#else
#define O_FRAGS (HEAD_DIM / 8)
#endif
    float o[O_FRAGS][4];
#pragma unroll
    for (int i = 0; i < O_FRAGS; i++) { o[i][0] = 0.f; o[i][1] = 0.f; o[i][2] = 0.f; o[i][3] = 0.f; }
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};  // rows gr and gr + 8

    for (int tile = 0; tile < n_tiles; tile++) {
        cp_async_wait<STAGES - 2>();   // this tile's group is in (newer ones may still fly)
        __syncthreads();     // ... for every thread; and the stage reloaded below is consumed
#ifdef DUO_TRACE
        if (tile == 0) tr_c1 = clock64();
#endif
        if (tile + STAGES - 1 < n_tiles) {
            load_tile(tile + STAGES - 1);
            fetch_entries(tile + STAGES);
        }
        cp_async_commit();
        // The warp's WARP_KEYS keys of the tile, 16 at a time (wk: the first of them).
#pragma unroll
        for (int sub = 0; sub < WARP_KEYS / 16; sub++) {
        const int wk = warp * WARP_KEYS + sub * 16;
        // Scores of these 16 keys: n-tile j holds keys 8j..8j+7.
        float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#ifdef KV_BYTES
        // Keys straight from their codes: lane (gr, tq) holds keys gr and gr + 8, dims
        // (HEAD_DIM / 4) tq.. (the permutation of the queries above), four per product, each
        // pair an f16x2 B register. Without VREG, values go to f16 in shared memory
        // (dequant_row16: times their row scale, or int4's step and minimum), as P V reads
        // them transposed; the keys' scales multiply the scores (int4: step times the score plus minimum times
        // the query's sum).
        const float* ksc = scl + (tile % STAGES) * 2 * TILE + wk;
        const unsigned char* kr = raw + (tile % STAGES) * 2 * RAW_TILE + wk * KPAD;  // the warp's key rows
        const unsigned char* vr0 = raw + (tile % STAGES) * 2 * RAW_TILE + RAW_TILE + wk * RPAD;  // its value rows
#ifndef VREG
        {
            __syncwarp();  // the previous tile's value fragments are read
#pragma unroll
            for (int j = 0; j < HEAD_DIM / 32; j++) {
                const int i = lane + 32 * j;
                const int r = i / (HEAD_DIM / 16), c = (i % (HEAD_DIM / 16)) * 16;
                // Its bytes at cb of the row, where the swizzle put them (dequant_row16 reads
                // at c, or c / 2 for int4 values).
                const int cb = VAL_IS_INT4 ? c / 2 : c;
                dequant_row16<VAL_IS_INT4>(vr0 + r * RPAD + SWZ(r, cb) - cb, c, ksc[TILE + r], conv + r * TPAD + c);
            }
            __syncwarp();
        }
        const bf16_t* vs = conv;
#endif
#ifdef KEY_INT4
        const unsigned char* kq = kr + (K_ROW_BYTES / 4) * tq;  // int4 rows are never swizzled
        // Two words (16 codes) of keys gr and gr + 8 at a time: word w's pairs 0-1 are the
        // k-slots of product 2w, pairs 2-3 those of product 2w + 1, each as 1024 + the code
        // (exact in f16; the bias, the step and the minimum apply to the scores below, so a
        // code costs one logic op, not two and a subtraction).
#pragma unroll
        for (int w = 0; w < HEAD_DIM / 32; w += 2) {
            const uint2 a = *reinterpret_cast<const uint2*>(kq + gr * KPAD + 4 * w);
            const uint2 b = *reinterpret_cast<const uint2*>(kq + (gr + 8) * KPAD + 4 * w);
            MMA(sc[0], qa[2 * w], nib2_biased(a.x, 0), nib2_biased(a.x, 1));
            MMA(sc[0], qa[2 * w + 1], nib2_biased(a.x, 2), nib2_biased(a.x, 3));
            MMA(sc[0], qa[2 * w + 2], nib2_biased(a.y, 0), nib2_biased(a.y, 1));
            MMA(sc[0], qa[2 * w + 3], nib2_biased(a.y, 2), nib2_biased(a.y, 3));
            MMA(sc[1], qa[2 * w], nib2_biased(b.x, 0), nib2_biased(b.x, 1));
            MMA(sc[1], qa[2 * w + 1], nib2_biased(b.x, 2), nib2_biased(b.x, 3));
            MMA(sc[1], qa[2 * w + 2], nib2_biased(b.y, 0), nib2_biased(b.y, 1));
            MMA(sc[1], qa[2 * w + 3], nib2_biased(b.y, 2), nib2_biased(b.y, 3));
        }
#else
#pragma unroll
        for (int h16 = 0; h16 < HEAD_DIM / 64; h16++) {
            // The lane's bytes of rows gr and gr + 8 (one place in both: the swizzle takes the
            // row's index modulo 8).
            const int at = SWZ(gr, (K_ROW_BYTES / 4) * tq + 16 * h16);
            const uint4 a = *reinterpret_cast<const uint4*>(kr + gr * KPAD + at);
            const uint4 b = *reinterpret_cast<const uint4*>(kr + (gr + 8) * KPAD + at);
            const unsigned wa[4] = {a.x, a.y, a.z, a.w}, wb[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                MMA(sc[0], qa[4 * h16 + j], bytes2_h(wa[j] & 0xffffu), bytes2_h(wa[j] >> 16));
                MMA(sc[1], qa[4 * h16 + j], bytes2_h(wb[j] & 0xffffu), bytes2_h(wb[j] >> 16));
            }
        }
#endif
#else
        const bf16_t* ks = smem + (tile % STAGES) * 2 * TILE_ELEMS + wk * TPAD;
        const bf16_t* vs = ks + TILE_ELEMS;
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; kk++) {
            unsigned kb[4];
            ldmatrix_x4(kb, ks + SOFF((lane & 7) + ((lane >> 4) & 1) * 8, kk * 16 + ((lane >> 3) & 1) * 8));
            MMA(sc[0], qa[kk], kb[0], kb[1]);
            MMA(sc[1], qa[kk], kb[2], kb[3]);
        }
#endif
#if defined(KEY_INT4)
        // q . (n step + min) = step (q . n) + min (sum of q), per key, where the products
        // summed q . (1024 + n): step times that plus (min - 1024 step) times the sum of q.
        // The bias's share of a score, 1024 step (sum of q), cancels in f32 (relative error
        // 2^-24 of it, as the tensor cores' f32 sums of q . (1024 + n)): far below the f16
        // rounding of the queries and the bf16 of the weights.
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const uint2 w2 = *reinterpret_cast<const uint2*>(ksc + 8 * j + 2 * tq);
            const float s0 = h2f(w2.x & 0xffffu), s1 = h2f(w2.y & 0xffffu);
            const float z0 = h2f(w2.x >> 16) - 1024.f * s0, z1 = h2f(w2.y >> 16) - 1024.f * s1;
            sc[j][0] = sc[j][0] * s0 + z0 * qsum[0]; sc[j][1] = sc[j][1] * s1 + z1 * qsum[0];
            sc[j][2] = sc[j][2] * s0 + z0 * qsum[1]; sc[j][3] = sc[j][3] * s1 + z1 * qsum[1];
        }
#elif defined(KV_BYTES)
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const float2 s2 = *reinterpret_cast<const float2*>(ksc + 8 * j + 2 * tq);
            sc[j][0] *= s2.x; sc[j][1] *= s2.y; sc[j][2] *= s2.x; sc[j][3] *= s2.y;
        }
#endif
        const int k0 = begin + tile * TILE + wk;
        if (k0 + 16 > end) {
#pragma unroll
            for (int j = 0; j < 2; j++)
#pragma unroll
                for (int x = 0; x < 4; x++)
                    if (k0 + 8 * j + 2 * tq + (x & 1) >= end) sc[j][x] = NEG_INF;
        }
        float cf[2] = {1.f, 1.f};  // each row's rescaling of what it has summed (1 while its maximum holds)
        // Rows gr + 8 are query heads 8-15: with at most 8 per KV head they hold nothing, and
        // their weights are zero (no exponentials spent on them).
#define SOFTMAX_HALVES (GROUP > 8 ? 2 : 1)
#if GROUP <= 8
#pragma unroll
        for (int j = 0; j < 2; j++) { sc[j][2] = 0.f; sc[j][3] = 0.f; }
#endif
#pragma unroll
        for (int hf = 0; hf < SOFTMAX_HALVES; hf++) cf[hf] = softmax_row<2>(&sc[0][2 * hf], m[hf], l[hf]);
        // Past the first tiles a row's maximum rarely moves: the warp skips the rescaling of
        // its output fragments (HEAD_DIM / 2 multiplications per lane) when no row's did.
#ifdef VREG
        if (__any_sync(0xffffffff, cf[0] != 1.f || cf[1] != 1.f)) {
            // Columns are query heads 2 tq and 2 tq + 1, whose factors lanes 8 tq and 8 tq + 4 hold.
            const float c0 = __shfl_sync(0xffffffff, cf[0], 8 * tq), c1 = __shfl_sync(0xffffffff, cf[0], 8 * tq + 4);
#pragma unroll
            for (int i = 0; i < O_FRAGS; i++) { o[i][0] *= c0; o[i][1] *= c1; o[i][2] *= c0; o[i][3] *= c1; }
        }
        // P^T as the B operand (k = keys 2 tq, 2 tq + 1, 2 tq + 8, 2 tq + 9; n = query head gr).
        const unsigned pb[2] = {PACK(sc[0][0], sc[0][1]), PACK(sc[1][0], sc[1][1])};
        // The row scales of keys (2 tq, 2 tq + 1) and (2 tq + 8, 2 tq + 9) as f16 pairs, low
        // half the first key's: int4's steps (s) and minima (z), or the byte caches' scales.
        const float* vsc = ksc + TILE;
#ifdef VAL_INT4
        unsigned s_ab, z_ab, s_cd, z_cd;
        {
            const uint2 w0 = *reinterpret_cast<const uint2*>(vsc + 2 * tq), w1 = *reinterpret_cast<const uint2*>(vsc + 8 + 2 * tq);
            s_ab = __byte_perm(w0.x, w0.y, 0x5410); z_ab = __byte_perm(w0.x, w0.y, 0x7632);
            s_cd = __byte_perm(w1.x, w1.y, 0x5410); z_cd = __byte_perm(w1.x, w1.y, 0x7632);
        }
#else
        unsigned s_ab, s_cd;
        {
            const float2 s0 = *reinterpret_cast<const float2*>(vsc + 2 * tq), s1 = *reinterpret_cast<const float2*>(vsc + 8 + 2 * tq);
            s_ab = pack_h(s0.x, s0.y);
            s_cd = pack_h(s1.x, s1.y);
        }
#endif
        // This lane's HEAD_DIM / 8 dimensions of keys 2 tq, 2 tq + 1 (a, b) and 2 tq + 8,
        // 2 tq + 9 (c, d) of the warp's 16, as 32-bit words.
#define VW (V_ROW_BYTES / 32)
        unsigned va[VW], vb_[VW], vc[VW], vd[VW];
        {
            // The lane's bytes of rows 2 tq (and 2 tq + 8) and 2 tq + 1 (and 2 tq + 9).
            const int at0 = SWZ(2 * tq, (V_ROW_BYTES / 8) * gr), at1 = SWZ(2 * tq + 1, (V_ROW_BYTES / 8) * gr);
            load_words<VW>(vr0 + (2 * tq) * RPAD + at0, va);
            load_words<VW>(vr0 + (2 * tq + 1) * RPAD + at1, vb_);
            load_words<VW>(vr0 + (2 * tq + 8) * RPAD + at0, vc);
            load_words<VW>(vr0 + (2 * tq + 9) * RPAD + at1, vd);
        }
#pragma unroll
        for (int i = 0; i < O_FRAGS; i++) {
            unsigned a[4];
#ifdef VAL_INT4
            // Word i / 4 holds this lane's dims 8 (i / 4) ..; value 2 j of a word is nibble j,
            // value 2 j + 1 nibble j + 4 (crate::int4): dims 2 i and 2 i + 1 are nibble i % 4
            // of the low and of the high half-word.
            const int w = i / 4, j = i % 4;
            const unsigned ab_lo = __byte_perm(va[w], vb_[w], 0x5410), ab_hi = __byte_perm(va[w], vb_[w], 0x7632);
            const unsigned cd_lo = __byte_perm(vc[w], vd[w], 0x5410), cd_hi = __byte_perm(vc[w], vd[w], 0x7632);
            a[0] = nib2_h(ab_lo, j); a[1] = nib2_h(ab_hi, j); a[2] = nib2_h(cd_lo, j); a[3] = nib2_h(cd_hi, j);
            // n * step + min per value (as crate::int4::value, and dequant_row16).
            asm("fma.rn.f16x2 %0, %0, %1, %2;" : "+r"(a[0]) : "r"(s_ab), "r"(z_ab));
            asm("fma.rn.f16x2 %0, %0, %1, %2;" : "+r"(a[1]) : "r"(s_ab), "r"(z_ab));
            asm("fma.rn.f16x2 %0, %0, %1, %2;" : "+r"(a[2]) : "r"(s_cd), "r"(z_cd));
            asm("fma.rn.f16x2 %0, %0, %1, %2;" : "+r"(a[3]) : "r"(s_cd), "r"(z_cd));
#else
            // Word i / 2 holds dims 4 (i / 2) ..: dims 2 i and 2 i + 1 are its bytes 0-1 (i
            // even) or 2-3, each paired with the same byte of the other key.
            const int w = i / 2;
            const unsigned sel = (i & 1) ? 0x7362u : 0x5140u;
            const unsigned ab = __byte_perm(va[w], vb_[w], sel), cd = __byte_perm(vc[w], vd[w], sel);
            a[0] = bytes2_h(ab & 0xffffu); a[1] = bytes2_h(ab >> 16); a[2] = bytes2_h(cd & 0xffffu); a[3] = bytes2_h(cd >> 16);
            // Codes times their rows' scales (as dequant_row16).
            asm("mul.rn.f16x2 %0, %0, %1;" : "+r"(a[0]) : "r"(s_ab));
            asm("mul.rn.f16x2 %0, %0, %1;" : "+r"(a[1]) : "r"(s_ab));
            asm("mul.rn.f16x2 %0, %0, %1;" : "+r"(a[2]) : "r"(s_cd));
            asm("mul.rn.f16x2 %0, %0, %1;" : "+r"(a[3]) : "r"(s_cd));
#endif
            MMA(o[i], a, pb[0], pb[1]);
        }
#else
        if (__any_sync(0xffffffff, cf[0] != 1.f || cf[1] != 1.f)) {
#pragma unroll
            for (int i = 0; i < HEAD_DIM / 8; i++) { o[i][0] *= cf[0]; o[i][1] *= cf[0]; o[i][2] *= cf[1]; o[i][3] *= cf[1]; }
        }
        // P (16 rows x 16 keys) as an A fragment, straight from the score fragments.
        const unsigned pa[4] = {PACK(sc[0][0], sc[0][1]), PACK(sc[0][2], sc[0][3]), PACK(sc[1][0], sc[1][1]), PACK(sc[1][2], sc[1][3])};
#pragma unroll
        for (int i = 0; i < HEAD_DIM / 8; i += 2) {
            // Keys 0..15 of the warp (rows), dims 8i.. and 8(i+1).. (columns), transposed.
            unsigned vb[4];
            ldmatrix_x4_trans(vb, vs + SOFF((lane & 7) + ((lane >> 3) & 1) * 8, (i + (lane >> 4)) * 8));
            MMA(o[i], pa, vb[0], vb[1]);
            MMA(o[i + 1], pa, vb[2], vb[3]);
        }
#endif
        }  // the warp's next 16 keys
    }
    cp_async_wait_0();
    __syncthreads();  // the stages are reused for the merge below

    // Merge the 4 warps' states per query head; maxima leave in natural-log units.
    float* wm = reinterpret_cast<float*>(smem_raw);  // [4][16]
    float* wl = wm + 4 * 16;                        // [4][16]
    float* wo = wl + 4 * 16;                        // [4][GROUP][HEAD_DIM]
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        float sum = l[hf];
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        sum += __shfl_xor_sync(0xffffffff, sum, 2);
        const int r = gr + 8 * hf;
        if (r < GROUP) {
            if (tq == 0) { wm[warp * 16 + r] = m[hf]; wl[warp * 16 + r] = sum; }
#ifndef VREG
#pragma unroll
            for (int i = 0; i < HEAD_DIM / 8; i++) {
                wo[(warp * GROUP + r) * HEAD_DIM + 8 * i + 2 * tq] = o[i][2 * hf];
                wo[(warp * GROUP + r) * HEAD_DIM + 8 * i + 2 * tq + 1] = o[i][2 * hf + 1];
            }
#endif
        }
    }
#ifdef VREG
#pragma unroll
    for (int i = 0; i < O_FRAGS; i++)
#pragma unroll
        for (int x = 0; x < 4; x++) {
            const int r = 2 * tq + (x & 1), c = (HEAD_DIM / 8) * gr + 2 * i + (x >> 1);
            if (r < GROUP) wo[(warp * GROUP + r) * HEAD_DIM + c] = o[i][x];
        }
#endif
    __syncthreads();
    for (int idx = threadIdx.x; idx < GROUP * HEAD_DIM; idx += 128) {
        const int r = idx / HEAD_DIM, c = idx % HEAD_DIM;
        float mm = NEG_INF;
#pragma unroll
        for (int w = 0; w < 4; w++) mm = fmaxf(mm, wm[w * 16 + r]);
        float ll = 0.f, acc = 0.f;
#pragma unroll
        for (int w = 0; w < 4; w++) {
            const float cw = wm[w * 16 + r] == NEG_INF ? 0.f : fast_exp2(wm[w * 16 + r] - mm);
            ll += wl[w * 16 + r] * cw;
            acc += wo[(w * GROUP + r) * HEAD_DIM + c] * cw;
        }
        const size_t p = p_first + (size_t)r * n_splits;
        part_acc[p * HEAD_DIM + c] = acc;
        if (c == 0) { part_m[p] = mm * 0.69314718056f; part_l[p] = ll; }
    }
#ifdef DUO_TRACE
    const unsigned tr_i = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    if (threadIdx.x == 0 && tr_i < 4096) {
        unsigned long long t1, sm;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
        asm volatile("{ .reg .u32 r; mov.u32 r, %%smid; cvt.u64.u32 %0, r; }" : "=l"(sm));
        unsigned long long* at = duo_trace + 5 * tr_i;
        at[0] = sm; at[1] = tr_t0; at[2] = t1; at[3] = tr_c1 - tr_c0; at[4] = clock64() - tr_c0;
    }
#endif
}
"#;

/// Keys per split for one decode launch over `rows` sequences whose KV heads show `lens`
/// (at the longest row): enough blocks to give each of the H100's 132 multiprocessors four
/// (the two-keys-per-warp kernel fits four blocks per multiprocessor; each KV head counts by
/// its length relative to the longest, each row counts once), but splits of 256 to 2048
/// keys, rounded up to 64. Measured on the H100 at 128K tokens, one row (BENCHMARKS.md): a
/// full layer is fastest with 2048-key splits (512 blocks), a duo layer with 1024 (its 4 long
/// heads give 512 blocks); with 2048 the duo layer leaves half the card idle (0.198 vs 0.137
/// ms). The serving pool uses one constant split instead (rows independent of the batch);
/// this is the kernel timings' choice.
pub fn batch_split(lens: &[u32], rows: usize) -> usize {
    let max_len = lens.iter().copied().max().unwrap_or(1).max(1) as usize;
    // Work in units of the longest head: 8 full heads count 8, 4 long + 4 streaming about 4.
    let heads = lens.iter().map(|&l| l as f64).sum::<f64>() / max_len as f64 * rows.max(1) as f64;
    let want = (max_len as f64 * heads / 528.0).ceil() as usize;
    want.clamp(MIN_SPLIT, 2048).div_ceil(64) * 64
}

/// Keys per split for `kernel` and `rows` rows whose KV heads show `lens` (at the longest
/// row), in a pool whose rows need not be independent of the batch: one row on the tensor-core
/// kernel takes [`fill_split`] (about one wave of blocks), a batch and the CUDA-core kernel
/// [`batch_split`] (many waves; at 25 x 16K within 3% of the best split).
pub fn split_for(kernel: DecodeKernel, blocks: usize, lens: &[u32], rows: usize) -> usize {
    if kernel != DecodeKernel::Tensor || rows > 1 {
        return batch_split(lens, rows);
    }
    fill_split(blocks, lens)
}

/// Keys per split for one row on the tensor-core kernel, which holds `blocks` blocks per
/// multiprocessor ([`tensor_blocks`]; bf16: two, 264 on the H200's 132): the long heads'
/// splits as many as one wave holds for each, each a multiple of 64 keys, from 512 to 8,192.
/// One row runs fastest with about one wave (measured on the H200 over powers of two from 512
/// to 8,192, BENCHMARKS.md: full 128K 4,096 best, 0.148 ms against 0.158 at 2,048; 512K
/// 8,192). A power of two landed a duo layer's long blocks anywhere from 195 to 325 against
/// the wave's 264 (five retrieval heads at 128K: 325 blocks, 1.23 waves, 3.09 TB/s); filling
/// the wave (five heads: 52 splits of 2,560 keys, 260 blocks) measured a Llama-3-8B duo 0.5
/// step at 128K 7.06 -> 6.92 ms and full and layer steps unchanged (BENCHMARKS.md, session 20).
/// Two and three waves measured no faster (session 21).
pub fn fill_split(blocks: usize, lens: &[u32]) -> usize {
    let (max_len, per_head) = one_wave(blocks, lens);
    (max_len.div_ceil(per_head).div_ceil(64) * 64).clamp(512, 8192)
}

/// The longest head's keys of a one-row launch over KV heads showing `lens`, and the blocks
/// each long head gets in one wave of `blocks` blocks a multiprocessor on the H200's 132.
fn one_wave(blocks: usize, lens: &[u32]) -> (usize, usize) {
    let max_len = lens.iter().copied().max().unwrap_or(1).max(1) as usize;
    // The long heads: a streaming window's few keys take blocks of their own, one tile each
    // (`crate::runtime::DecodeLaunch::for_layer`), which come and go within the wave.
    let long = lens.iter().filter(|&&l| 2 * l as usize >= max_len).count().max(1);
    (max_len, (132 * blocks.max(1) / long).max(1))
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use crate::paged::{Allocator, PagedLayout, Ring, Tables};
    use crate::prefill_attention::HeadEntry;
    use crate::runtime::{DecodeLaunch, Gpu};
    use crate::Parity;

    /// A one-layer layout for `kinds` (true = retrieval) whose streaming heads keep `sink` +
    /// `recent`, blocks of `block_tokens`, rows of up to `max_tokens`.
    pub fn layer_layout(
        kinds: &[bool],
        sink: usize,
        recent: usize,
        block_tokens: usize,
        max_tokens: usize,
    ) -> PagedLayout {
        PagedLayout {
            retrieval: vec![kinds.to_vec()],
            sink,
            recent,
            block_tokens,
            max_chunk: 1,
            max_tokens,
            kv: KvType::Bf16,
            kv_streaming: KvType::Bf16,
        }
    }

    /// Every row's tables, with blocks handed out in a seeded shuffled order (so no row's
    /// blocks are contiguous; `contiguous`: in order), and the pool's size in blocks.
    fn place_tables(layout: &PagedLayout, tokens: &[usize], seed: u64, contiguous: bool) -> (Vec<Tables>, usize) {
        use rand::{seq::SliceRandom, SeedableRng};
        let total: usize = tokens
            .iter()
            .map(|&n| layout.blocks_for(n, Ring::Decode))
            .sum::<usize>()
            + 3;
        let mut perm: Vec<u32> = (0..total as u32).collect();
        if !contiguous {
            perm.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        }
        let mut alloc = Allocator::new(total, tokens.len());
        let tables = tokens
            .iter()
            .map(|&n| {
                let streaming = alloc
                    .take(layout.streaming_blocks(Ring::Decode))
                    .unwrap_or_default()
                    .iter()
                    .map(|&b| perm[b as usize])
                    .collect();
                let retrieval = alloc
                    .take(layout.retrieval_blocks(n))
                    .unwrap_or_default()
                    .iter()
                    .map(|&b| perm[b as usize])
                    .collect();
                Tables {
                    retrieval,
                    streaming,
                    cap: layout.ring_rows(Ring::Decode),
                }
            })
            .collect();
        (tables, total)
    }

    /// The device form of per-row tables: one row of `table_stride` entries per slot.
    pub fn table_rows(layout: &PagedLayout, tables: &[Tables]) -> Vec<i32> {
        tables.iter().flat_map(|t| t.device_row(layout)).collect()
    }

    /// The launch shape for rows of `tokens` (each with its own token cached).
    fn launch_for(
        x_heads: &[HeadEntry],
        n_heads: usize,
        head_dim: usize,
        tokens: &[usize],
        kv: KvType,
        splits: Option<Splits>,
        kernel: DecodeKernel,
    ) -> DecodeLaunch {
        let max_n = *tokens.iter().max().unwrap_or(&1);
        let lens: Vec<u32> = x_heads
            .iter()
            .map(|e| {
                if e.kind == HeadEntry::RETRIEVAL {
                    max_n as u32
                } else {
                    (max_n as u32).min((e.sink + e.recent) as u32)
                }
            })
            .collect();
        let splits = splits.unwrap_or_else(|| splits_for(kernel, kv, tensor_blocks(head_dim, n_heads / x_heads.len(), kv), &lens, tokens.len()));
        let max_len = *lens.iter().max().unwrap_or(&1) as usize;
        let kinds: Vec<bool> = x_heads.iter().map(|e| e.kind == HeadEntry::RETRIEVAL).collect();
        let short_len = x_heads.iter().filter(|e| e.kind != HeadEntry::RETRIEVAL).map(|e| (e.sink + e.recent) as usize).max().unwrap_or(0);
        let shape = (n_heads / x_heads.len(), head_dim, tokens.len(), kv, kernel);
        DecodeLaunch::for_layer_split(&kinds, shape, splits, max_len, short_len.min(max_len), tokens.len(), usize::MAX)
    }

    /// Runs the fused decode attention on the GPU over a paged pool of `block_tokens`
    /// (copying inputs in and the output out) with `kernel`, its long heads in `splits` (or
    /// the launch's own choice). `x.heads` must be `layer_layout`'s heads.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention(
        gpu: &Gpu,
        x: &DecodeInput,
        layout: &PagedLayout,
        kv: KvType,
        kernel: DecodeKernel,
        split: Option<Splits>,
        seed: u64,
    ) -> Result<Vec<f32>> {
        x.validate()?;
        if !kernel.fits(x.head_dim, x.n_heads / x.heads.len(), kv) {
            return Err(CudaError::Input(format!(
                "{kernel:?} does not suit heads of {} ({} per KV head, {kv:?})",
                x.head_dim,
                x.n_heads / x.heads.len()
            )));
        }
        let (h, d) = (x.n_heads, x.head_dim);
        let (tables, blocks) = place_tables(layout, &x.tokens, seed, false);
        // Unused rows are poisoned: a read outside a row's blocks shows in the result.
        let rows = blocks * layout.group() * layout.block_tokens;
        let (mut keys, mut values) = (vec![1e3f32; rows * d], vec![1e3f32; rows * d]);
        // Where streaming heads keep bf16 beside the cache's type (`layout.split_types()`),
        // their rows (in their own units) go in over the quantised bytes below.
        // (value row, key row, keys, values): the key row spaced out where the view says so.
        let mut windows: Vec<(usize, usize, &[f32], &[f32])> = Vec::new();
        for (b, &n) in x.tokens.iter().enumerate() {
            for (g, &e) in x.heads.iter().enumerate() {
                let base = x.key_offset(b, g);
                for p in 0..n {
                    // In order of position: the ring keeps the latest.
                    let r = tables[b].row(layout, e, p);
                    let (k, v) = (&x.keys[base + p * d..][..d], &x.values[base + p * d..][..d]);
                    if layout.split_types() && e.kind == HeadEntry::STREAMING {
                        windows.push((r, tables[b].key_row(layout, e, p), k, v));
                    } else {
                        keys[r * d..][..d].copy_from_slice(k);
                        values[r * d..][..d].copy_from_slice(v);
                    }
                }
            }
        }
        let mut launch = launch_for(&x.heads, h, d, &x.tokens, kv, split, kernel);
        if layout.split_types() {
            let kinds: Vec<bool> = x.heads.iter().map(|e| e.kind == HeadEntry::RETRIEVAL).collect();
            let st = crate::runtime::StreamingKernel { kv: layout.kv_streaming, kernel: DecodeKernel::Tensor };
            launch = launch.with_streaming_type(&kinds, st)?;
        }
        let heads = gpu.upload(&HeadEntry::table(&x.heads))?;
        let tab = gpu.upload(&table_rows(layout, &tables))?;
        let slots: Vec<i32> = (0..x.tokens.len() as i32).collect();
        let pos: Vec<i32> = x.tokens.iter().map(|&n| n as i32 - 1).collect();
        let (slots, pos, q) = (gpu.upload(&slots)?, gpu.upload(&pos)?, gpu.upload(&x.q)?);
        let out = gpu.zeros::<f32>(x.tokens.len() * h * d)?;
        // The partials start as NaN: what an empty split leaves unwritten must not reach the
        // merged result.
        let parts_n = x.tokens.len() * h * launch.n_splits;
        let (pm, pl, pa) = (
            gpu.upload(&vec![f32::NAN; parts_n])?,
            gpu.upload(&vec![f32::NAN; parts_n])?,
            gpu.upload(&vec![f32::NAN; parts_n * d])?,
        );
        let (k32, v32, k16, v16, k8, v8, ks, vs);
        let mut paged = layout.paged_args(gpu.addr(&tab));
        let (kc, vc) = match kv {
            KvType::F32 => {
                (k32, v32) = (gpu.upload(&keys)?, gpu.upload(&values)?);
                (gpu.addr(&k32), gpu.addr(&v32))
            }
            KvType::Bf16 => {
                (k16, v16) = (
                    gpu.upload(&crate::ops::bf16_bits(&keys))?,
                    gpu.upload(&crate::ops::bf16_bits(&values))?,
                );
                (gpu.addr(&k16), gpu.addr(&v16))
            }
            KvType::Fp8 | KvType::Int8 | KvType::Int4 | KvType::K8V4 => {
                let ((mut kb, ksc), (mut vb, vsc)) =
                    (kv.key().quantise_rows(&keys, d)?, kv.value().quantise_rows(&values, d)?);
                // (Read later by row order: a later position of a ring row overwrites.)
                for (r, kr, k, v) in &windows {
                    let (kw, vw) = (crate::ops::bf16_bits(k), crate::ops::bf16_bits(v));
                    for (bytes, words, row) in [(&mut kb, kw, kr), (&mut vb, vw, r)] {
                        let at = row * 2 * d;
                        for (i, w) in words.iter().enumerate() {
                            bytes[at + 2 * i..][..2].copy_from_slice(&w.to_le_bytes());
                        }
                    }
                }
                (k8, v8, ks, vs) = (
                    gpu.upload(&kb)?,
                    gpu.upload(&vb)?,
                    gpu.upload(&ksc)?,
                    gpu.upload(&vsc)?,
                );
                paged = paged.with_scales(gpu.addr(&ks), gpu.addr(&vs));
                (gpu.addr(&k8), gpu.addr(&v8))
            }
        };
        if !windows.is_empty() && !kv.is_quantised() {
            return Err(CudaError::Input(format!("bf16 windows beside a {kv:?} cache")));
        }
        let parts = (gpu.addr(&pm), gpu.addr(&pl), gpu.addr(&pa));
        gpu.decode_attention(
            &launch,
            gpu.addr(&q),
            kc,
            vc,
            gpu.addr(&heads),
            gpu.addr(&slots),
            gpu.addr(&pos),
            (paged, layout.streaming_args(paged)),
            parts,
            Some((gpu.addr(&out), 0)),
        )?;
        gpu.download(&out)
    }

    /// Milliseconds per launch pair (partial + merge) of decode attention over a `kv` cache
    /// (bf16 or fp8) for a layer of `kinds` (true = retrieval; streaming heads keep 64 + 256)
    /// over `rows` sequences of `tokens` tokens in a pool of `block_tokens`-token blocks
    /// filled with random values; mean of `iters` after one warm-up. Also the KV bytes each
    /// launch reads (row scales included).
    #[allow(clippy::too_many_arguments)]
    pub fn time_decode_attention(
        gpu: &Gpu,
        n_heads: usize,
        head_dim: usize,
        kinds: &[bool],
        tokens: usize,
        rows: usize,
        block_tokens: usize,
        split: Option<usize>,
        kernel: DecodeKernel,
        kv: KvType,
        iters: usize,
    ) -> Result<(f64, usize)> {
        let layout = PagedLayout {
            kv,
            kv_streaming: kv,
            ..layer_layout(kinds, 64, 256, block_tokens, tokens)
        };
        let all = vec![tokens; rows];
        // DUO_TIME_PLACEMENT=contiguous keeps the blocks in order, for measuring what the
        // scattering costs (timings only: parity always scatters).
        let contiguous = std::env::var("DUO_TIME_PLACEMENT").as_deref() == Ok("contiguous");
        let (tables, blocks) = place_tables(&layout, &all, 7, contiguous);
        let elems = blocks * layout.block_elems(head_dim);
        // The values' buffer may start DUO_TIME_V_SKEW bytes (a multiple of 256) into its
        // allocation, for measuring whether keys and values at the same offsets collide.
        let skew = tuning("DUO_TIME_V_SKEW").unwrap_or(0) / 256 * 256;
        let (k, v) = (
            gpu.zeros::<u8>(kv.key_bytes_for(elems))?,
            gpu.zeros::<u8>(kv.value_bytes_for(elems) + skew)?,
        );
        let scale_rows = if kv.is_quantised() {
            blocks * layout.block_rows()
        } else {
            1
        };
        let (ks, vs) = (gpu.zeros::<f32>(scale_rows)?, gpu.zeros::<f32>(scale_rows)?);
        if kv == KvType::F32 {
            return Err(CudaError::Input(
                "timed decode attention takes bf16 or byte caches".into(),
            ));
        }
        gpu.fill_synthetic_rows(
            kv,
            (gpu.addr(&k), gpu.addr(&v) + skew as u64),
            (gpu.addr(&ks), gpu.addr(&vs)),
            blocks * layout.block_rows(),
            head_dim,
            (1, 2),
        )?;
        let heads_v = layout.heads(0);
        let launch = launch_for(&heads_v, n_heads, head_dim, &all, kv, split.map(Splits::uniform), kernel);
        let heads = gpu.upload(&HeadEntry::table(&heads_v))?;
        let tab = gpu.upload(&table_rows(&layout, &tables))?;
        let slots = gpu.upload(&(0..rows as i32).collect::<Vec<_>>())?;
        let pos = gpu.upload(&vec![tokens as i32 - 1; rows])?;
        let q = gpu.zeros::<f32>(rows * n_heads * head_dim)?;
        let out = gpu.zeros::<u16>(rows * n_heads * head_dim)?;
        let parts_n = rows * n_heads * launch.n_splits;
        let (pm, pl, pa) = (
            gpu.zeros::<f32>(parts_n)?,
            gpu.zeros::<f32>(parts_n)?,
            gpu.zeros::<f32>(parts_n * head_dim)?,
        );
        let parts = (gpu.addr(&pm), gpu.addr(&pl), gpu.addr(&pa));
        let mut args = layout.paged_args(gpu.addr(&tab));
        if kv.is_quantised() {
            args = args.with_scales(gpu.addr(&ks), gpu.addr(&vs));
        }
        // DUO_TIME_PARTIAL_ONLY=1 times the partial kernel alone (no merge), for seeing what
        // the merge and its launch add.
        let merged = std::env::var("DUO_TIME_PARTIAL_ONLY").as_deref() != Ok("1");
        let run = || {
            gpu.decode_attention(
                &launch,
                gpu.addr(&q),
                gpu.addr(&k),
                gpu.addr(&v) + skew as u64,
                gpu.addr(&heads),
                gpu.addr(&slots),
                gpu.addr(&pos),
                (args, layout.streaming_args(args)),
                parts,
                merged.then(|| (0, gpu.addr(&out))),
            )
        };
        let ms = gpu.time_ms(iters, run)?;
        if decode_trace() && kernel == DecodeKernel::Tensor {
            // One more launch into a cleared record, then each block's line (stderr).
            let group = n_heads / kinds.len();
            gpu.decode_trace(group, head_dim, kv, 0, true)?;
            run()?;
            let blocks = launch.blocks() * rows;
            let label = format!("{kv:?} {rows}x{tokens} {}", if kinds.iter().all(|&k| k) { "full" } else { "mixed" });
            if blocks > 4096 {
                eprintln!("trace {label}: {blocks} blocks, the first 4096 kept");
            }
            // Blocks that wrote nothing (past a row's keys) are left out.
            for (i, t) in gpu.decode_trace(group, head_dim, kv, blocks, false)?.iter().enumerate().filter(|(_, t)| t[1] != 0) {
                eprintln!("trace {label} block {i} sm {} t0 {} t1 {} first {} end {}", t[0], t[1], t[2], t[3], t[4]);
            }
        }
        let per_row: usize = heads_v
            .iter()
            .map(|e| {
                if e.kind == HeadEntry::RETRIEVAL {
                    tokens
                } else {
                    tokens.min(320)
                }
            })
            .sum();
        Ok((
            ms,
            rows * per_row * (kv.key_bytes_for(head_dim) + kv.value_bytes_for(head_dim) + 2 * kv.scale_bytes()),
        ))
    }

    /// A parity case's forced splits, as its label says them.
    fn split_label(s: Splits) -> String {
        if s.lead == 0 {
            format!(", splits of {}", s.split)
        } else {
            format!(", {} splits of {} then splits of {}", s.lead, s.split, s.tail)
        }
    }

    /// Parity on random inputs over shuffled paged pools: GQA and MHA groups, head dims 64,
    /// 128 and 256, several rows of different lengths in one launch, retrieval caches from 1 to
    /// 40,000 tokens next to streaming heads (sinks + recent), blocks of 16 to 128 tokens; and
    /// splits forced small, so that a head has more splits than the merge's threads (a duo
    /// layer's streaming heads leave most of theirs empty).
    pub fn check(gpu: &Gpu, seed: u64, cases: Option<&str>) -> Result<Vec<Parity>> {
        // (query heads, head dim, kinds, sink, recent, block tokens, row lengths, keys per
        // split: the launch's own choice, or forced)
        type Case = (
            usize,
            usize,
            &'static [bool],
            usize,
            usize,
            usize,
            &'static [usize],
            Option<Splits>,
        );
        const LLAMA3_MIXED: &[bool] = &[true, false, true, false, false, false, true, false];
        let small = Some(Splits::uniform(MIN_SPLIT));
        // Lead splits then short ones (`fill_splits`' form): 5 of 2,048 keys, then 512-key
        // splits, over heads that end in a lead split, at its end, in the first short split and
        // well past it, so that some blocks begin past a row's keys.
        let led = Some(Splits { split: 2048, lead: 5, tail: 512 });
        let layer_cases: [Case; 11] = [
            (
                9,
                64,
                &[true, false, true],
                64,
                256,
                64,
                &[1, 57, 320, 1000],
                None,
            ), // SmolLM2-like
            (32, 64, &[true, false], 4, 40, 64, &[700, 5, 2049], None), // 16 query heads per KV head
            (32, 128, LLAMA3_MIXED, 64, 256, 16, &[4096, 9000, 17], None), // Llama-3-8B-like, mixed
            (32, 128, &[true; 8], 64, 256, 128, &[40_000], None), // one long row
            (
                8,
                128,
                &[true, false, true, false, true, false, true, false],
                16,
                100,
                32,
                &[300, 256, 257, 513, 1, 2, 3],
                None,
            ), // boundaries, MHA
            (4, 256, &[true, false], 8, 20, 64, &[1000, 21], None), // widest head
            // The fewest keys a split may have (MIN_SPLIT, 256): 157 splits of a 40,000-token
            // head of 128 and 79 of a 20,000-token head of 64, so that the merge's HEAD_DIM
            // threads list a head's splits in two rounds.
            (
                32,
                128,
                &[false, true, false, false, false, false, false, false],
                64,
                256,
                64,
                &[40_000, 700],
                small,
            ), // one retrieval head, small splits
            (9, 64, &[true, false, true], 64, 256, 64, &[20_000, 100], small), // small splits, heads of 64
            // More splits than the wide merge's 512 threads take in one round (547), as a
            // pool's 2,048-key splits give a row past a million tokens.
            (9, 64, &[false, true, false], 64, 256, 64, &[140_000, 3], small),
            (32, 128, &[true; 8], 64, 256, 64, &[15_000, 10_240, 10_241, 6_000], led), // lead and short splits, full layer
            (32, 128, LLAMA3_MIXED, 64, 256, 16, &[13_000, 300], led), // lead and short splits beside streaming heads' windows
        ];
        let mut out = Vec::new();
        for kv in [KvType::F32, KvType::Bf16, KvType::Fp8, KvType::Int8, KvType::Int4, KvType::K8V4] {
            if !crate::checks::case_wanted(cases, &format!("paged decode attention {kv:?}, ")) {
                continue;
            }
            for (i, (h, d, kinds, sink, recent, bt, tokens, split)) in layer_cases.iter().enumerate() {
                let layout = layer_layout(
                    kinds,
                    *sink,
                    *recent,
                    *bt,
                    *tokens.iter().max().unwrap_or(&1),
                );
                let x = random_input(seed + i as u64, *h, *d, layout.heads(0), tokens);
                // Kernels over a rounded or quantised cache are compared with the reference on
                // the same cache.
                let want = reference(&rounded_to(kv, &x))?;
                let group = h / kinds.len();
                let kernels = [
                    DecodeKernel::Tensor,
                    DecodeKernel::Cores(4),
                    DecodeKernel::Cores(2),
                    DecodeKernel::Cores(1),
                ];
                for kernel in kernels.into_iter().filter(|k| k.fits(*d, group, kv)) {
                    let got = decode_attention(gpu, &x, &layout, kv, kernel, *split, seed + i as u64)?;
                    let err = crate::checks::max_err(&want, &got);
                    // The tensor-core kernel rounds queries and softmax weights to bf16.
                    let bound = if kernel == DecodeKernel::Tensor {
                        1e-2
                    } else {
                        1e-4
                    };
                    let split = split.map_or(String::new(), split_label);
                    out.push(Parity { case: format!("paged decode attention {kv:?}, {kernel:?}, blocks of {bt}{split}: {h} heads x {d}, kinds {kinds:?}, rows {tokens:?}"), max_abs_err: err, bound });
                }
            }
        }
        // Streaming heads in bf16 beside a quantised cache: the layer's two launches (each
        // kind by its type's kernel, one merge), against the reference with each head's rows
        // rounded as its kind keeps them. Every case with both kinds, and one of streaming
        // heads only.
        for kv in [KvType::Fp8, KvType::Int8, KvType::Int4, KvType::K8V4] {
            if !crate::checks::case_wanted(cases, &format!("paged decode attention {kv:?} with bf16 windows")) {
                continue;
            }
            let all_streaming: Case = (8, 128, &[false, false], 16, 100, 32, &[300, 7], None);
            for (i, (h, d, kinds, sink, recent, bt, tokens, split)) in layer_cases.iter().copied().chain([all_streaming]).enumerate() {
                if !kinds.contains(&false) || !DecodeKernel::Tensor.fits(d, h / kinds.len(), kv) {
                    continue;
                }
                let layout = PagedLayout { kv, kv_streaming: KvType::Bf16, ..layer_layout(kinds, sink, recent, bt, *tokens.iter().max().unwrap_or(&1)) };
                let x = random_input(seed + 100 + i as u64, h, d, layout.heads(0), tokens);
                let mut rounded = x.clone();
                for (b, &len) in tokens.iter().enumerate() {
                    for (g, e) in x.heads.iter().enumerate() {
                        let ty = layout.kv_of(e.kind == HeadEntry::RETRIEVAL);
                        let (at, n) = (x.key_offset(b, g), len * d);
                        rounded.keys[at..][..n].copy_from_slice(&ty.key().round_rows(&x.keys[at..][..n], d));
                        rounded.values[at..][..n].copy_from_slice(&ty.value().round_rows(&x.values[at..][..n], d));
                    }
                }
                let want = reference(&rounded)?;
                let got = decode_attention(gpu, &x, &layout, kv, DecodeKernel::Tensor, split, seed + i as u64)?;
                let split = split.map_or(String::new(), split_label);
                out.push(Parity {
                    case: format!("paged decode attention {kv:?} with bf16 windows (two launches), Tensor, blocks of {bt}{split}: {h} heads x {d}, kinds {kinds:?}, rows {tokens:?}"),
                    max_abs_err: crate::checks::max_err(&want, &got),
                    bound: 1e-2,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(feature = "cuda")]
pub use gpu::{
    check as check_kernel, decode_attention, layer_layout, table_rows, time_decode_attention,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int4_and_fp8_hold_keys_in_a_hadamard_basis_and_the_others_as_they_are() {
        let kinds = [KvType::Bf16, KvType::Fp8, KvType::Int8, KvType::Int4, KvType::K8V4];
        let turned: Vec<bool> = kinds.iter().map(|k| k.turns_keys()).collect();
        assert_eq!(turned, [false, true, false, true, false]);
        // fp8 keys: each row turned, rounded as an fp8 row, turned back; values plain rows.
        let x: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0 + if i % 128 == 5 { 30.0 } else { 0.0 }).collect();
        let mut want = x.clone();
        for row in want.chunks_mut(128) {
            crate::int4::hadamard(row);
            let rounded = KvType::Fp8.round_rows(row, 128);
            row.copy_from_slice(&rounded);
            crate::int4::hadamard(row);
        }
        assert_eq!(KvType::Fp8.round_key_rows(&x, 128), want);
        assert_ne!(KvType::Fp8.round_key_rows(&x, 128), KvType::Fp8.round_rows(&x, 128));
        assert_eq!(KvType::Int8.round_key_rows(&x, 128), KvType::Int8.round_rows(&x, 128));
    }

    #[test]
    fn k8v4_holds_keys_as_int8_and_values_as_int4() {
        let kv = KvType::K8V4;
        assert_eq!((kv.key(), kv.value()), (KvType::Int8, KvType::Int4));
        assert_eq!((kv.key_bytes_for(128), kv.value_bytes_for(128), kv.scale_bytes()), (128, 64, 4));
        assert_eq!(KvType::Int4.key_bytes_for(128), 64, "other types are alike on both sides");
        assert_eq!(kv.format_code(), 4);
        assert!(kv.is_quantised());
        // A block of 16 rows: keys 128 bytes a row, values 64, a 4-byte word each.
        let layout = crate::paged::PagedLayout { retrieval: vec![vec![true]], sink: 4, recent: 16, block_tokens: 16, max_chunk: 8, max_tokens: 64, kv, kv_streaming: kv };
        assert_eq!(layout.block_bytes(128), 16 * (128 + 64 + 8));
        // Keys round as int8 rows, values as int4 rows, exactly as those caches do.
        let x: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        assert_eq!(kv.round_key_rows(&x, 128), KvType::Int8.round_rows(&x, 128));
        assert_eq!(kv.value().round_rows(&x, 128), KvType::Int4.round_rows(&x, 128));
        assert_ne!(kv.round_key_rows(&x, 128), kv.value().round_rows(&x, 128), "the two sides differ");
        let (bytes, scales) = kv.value().quantise_rows(&x, 128).expect("a byte cache");
        assert_eq!((bytes.len(), scales.len()), (128, 2), "values: half a byte each");
        let (kb, _) = kv.key().quantise_rows(&x, 128).expect("a byte cache");
        assert_eq!(kb.len(), 256, "keys: a byte each");
        assert_eq!(kv.value().dequantise_rows(&bytes, &scales, 128), KvType::Int4.round_rows(&x, 128));
        // Its sides differ, so the one-format questions are refused rather than answered for
        // one side.
        assert!(kv.quantise_rows(&x, 128).is_err());
        assert!(std::panic::catch_unwind(|| kv.round_rows(&x, 128)).is_err() && std::panic::catch_unwind(|| kv.bytes_for(128)).is_err());
        // Its decode kernel runs as int8's: three stages, four blocks.
        assert_eq!((tensor_stages(kv), tensor_min_blocks(kv)), (tensor_stages(KvType::Int8), tensor_min_blocks(KvType::Int8)));
        assert_eq!(tensor_smem_bytes(128, 4, kv), tensor_smem_bytes(128, 4, KvType::Int8));
    }

    #[test]
    fn splits_fill_the_card_within_256_to_2048_keys() {
        assert_eq!(batch_split(&[131_072; 8], 1), 2048);
        assert_eq!(
            batch_split(&[131_072, 131_072, 131_072, 131_072, 320, 320, 320, 320], 1),
            1024,
            "4 long heads: 128 splits each"
        );
        assert_eq!(
            batch_split(&[16_384; 8], 1),
            256,
            "16K: 64 splits of each of 8 heads fill the card"
        );
        assert_eq!(
            batch_split(&[1_000_000; 8], 1),
            2048,
            "long caches: the largest split, many waves"
        );
        assert_eq!(
            batch_split(&[100, 320], 1),
            256,
            "short caches: one split of at least 256 keys"
        );
        assert_eq!(batch_split(&[1000, 20], 1), 256);
    }

    #[test]
    fn the_tensor_core_kernel_where_it_fits() {
        assert_eq!(
            DecodeKernel::best(128, 4, KvType::Bf16, 2),
            DecodeKernel::Tensor,
            "Llama-3-8B"
        );
        assert_eq!(
            DecodeKernel::best(64, 3, KvType::Bf16, 2),
            DecodeKernel::Tensor,
            "SmolLM2"
        );
        assert_eq!(
            DecodeKernel::best(128, 1, KvType::Bf16, 2),
            DecodeKernel::Tensor,
            "MHA"
        );
        assert_eq!(
            DecodeKernel::best(128, 4, KvType::F32, 2),
            DecodeKernel::Cores(2),
            "f32 caches: CUDA cores"
        );
        assert_eq!(
            DecodeKernel::best(256, 1, KvType::Bf16, 2),
            DecodeKernel::Cores(2),
            "heads of 256: CUDA cores"
        );
        assert!(
            !DecodeKernel::Tensor.fits(128, 17, KvType::Bf16),
            "at most 16 query heads per KV head"
        );
        assert!(
            !DecodeKernel::Cores(4).fits(128, 8, KvType::Bf16),
            "8 x 128 x 4 / 32 values per lane are too many registers"
        );
        assert!(DecodeKernel::Cores(2).fits(128, 8, KvType::Bf16));
        assert_eq!(
            DecodeKernel::best(128, 4, KvType::Fp8, 2),
            DecodeKernel::Tensor,
            "fp8 caches: tensor cores"
        );
        assert!(
            !DecodeKernel::Cores(1).fits(128, 4, KvType::Fp8),
            "no CUDA-core kernel reads fp8"
        );
        assert!(
            !DecodeKernel::Tensor.fits(256, 1, KvType::Fp8)
                && !DecodeKernel::Tensor.fits(128, 4, KvType::F32)
        );
        assert!(
            [1, 4, 16].iter().all(|&group| tensor_smem_bytes(128, group, KvType::Fp8) * 2 <= 227 * 1024
                && tensor_smem_bytes(128, group, KvType::Int4) * 2 <= 227 * 1024),
            "two fp8 blocks fit a multiprocessor"
        );
        // The blocks a launch plans for are resident at once, for every type, head size and
        // group; and the measured defaults hold where the memory allows (up to 8 query heads).
        for kv in [KvType::Bf16, KvType::Fp8, KvType::Int8, KvType::Int4, KvType::K8V4] {
            for d in [64, 128] {
                for group in 1..=16 {
                    let b = tensor_blocks(d, group, kv);
                    assert!(b >= 1 && b * (tensor_smem_bytes(d, group, kv) + 1024) <= 228 * 1024, "{kv:?} {d} x {group}: {b} blocks");
                }
                assert_eq!(tensor_blocks(d, 4, kv), tensor_min_blocks(kv), "{kv:?} {d}");
            }
        }
        assert_eq!(tensor_blocks(128, 16, KvType::Int8), 3, "the f16 value copy leaves room for three int8 blocks");
    }

    #[test]
    fn the_wide_merge_takes_whole_groups_of_a_head_up_to_512_threads() {
        // (head_dim, threads): groups of head_dim threads each sum every group-th split, so a
        // block must be a whole number of them; the kernel's MERGE_BLOCK is the same number.
        for (d, threads) in [(64, 512), (128, 512), (96, 480), (160, 480), (256, 512), (512, 512), (1024, 1024)] {
            assert_eq!(merge_block(d), threads, "heads of {d}");
            assert!(merge_block(d).is_multiple_of(d) && merge_block(d).is_multiple_of(32), "heads of {d}");
        }
    }

    #[test]
    fn lead_and_short_splits_cover_a_head_once_in_order() {
        let s = Splits { split: 2048, lead: 5, tail: 512 };
        for len in [1, 2047, 2048, 6000, 10_240, 10_241, 15_000] {
            let n = s.count(len);
            let mut next = 0;
            for i in 0..n {
                let (begin, keys) = s.range(i);
                assert_eq!(begin, next, "len {len}, split {i}");
                assert!(begin < len, "len {len}: split {i} begins past the head");
                next = begin + keys;
            }
            assert!(next >= len, "len {len}: {n} splits end at {next}");
        }
        assert_eq!((s.count(10_240), s.count(10_241), s.count(15_000)), (5, 6, 15));
        assert_eq!(Splits::uniform(4032).count(131_072), 33);
    }

    #[test]
    fn lead_splits_take_their_share_of_one_wave_and_short_ones_the_rest() {
        // A full Llama-3-8B layer at 128K, two blocks a multiprocessor: 33 blocks a head,
        // a fair share of 3,971 keys.
        let full = fill_splits_with(2, &[131_072; 8], 80, 512, LEAD_MIN_FAIR);
        assert_eq!((full.split, full.lead, full.tail), (3136, 33, 512));
        assert_eq!(full.count(131_072), 33 + (131_072 - 33 * 3136usize).div_ceil(512));
        // Four long heads of eight at 512K: 66 blocks a head, a fair share of 7,943 keys.
        let duo = fill_splits_with(2, &[524_288, 320, 524_288, 320, 524_288, 320, 524_288, 320], 80, 512, LEAD_MIN_FAIR);
        assert_eq!((duo.split, duo.lead), (6336, 66));
        // No share: fill_split's uniform splits; a fair share under LEAD_MIN_FAIR (the same
        // four heads at 128K: 1,985 keys; a full layer at 16K): the same.
        assert_eq!(fill_splits_with(2, &[131_072; 8], 0, 512, LEAD_MIN_FAIR), Splits::uniform(fill_split(2, &[131_072; 8])));
        let mixed_128k = [131_072, 320, 131_072, 320, 131_072, 320, 131_072, 320];
        assert_eq!(fill_splits_with(2, &mixed_128k, 80, 512, LEAD_MIN_FAIR), Splits::uniform(fill_split(2, &mixed_128k)));
        assert_eq!(fill_splits_with(2, &[16_384; 8], 80, 512, LEAD_MIN_FAIR), Splits::uniform(fill_split(2, &[16_384; 8])));
        // Short splits never of 0 keys; only bf16 caches take lead splits.
        assert_eq!(fill_splits_with(2, &[131_072; 8], 80, 0, LEAD_MIN_FAIR).tail, 64);
        // A lower threshold takes the four long heads at 128K too.
        assert_eq!(fill_splits_with(2, &mixed_128k, 80, 512, 1024).lead, 66);
        assert_eq!(splits_for(DecodeKernel::Tensor, KvType::Fp8, 2, &[131_072; 8], 1), Splits::uniform(fill_split(2, &[131_072; 8])));
        assert_eq!(splits_for(DecodeKernel::Tensor, KvType::Bf16, 2, &[131_072; 8], 2), Splits::uniform(split_for(DecodeKernel::Tensor, 2, &[131_072; 8], 2)));
    }

    #[test]
    fn a_filling_split_gives_one_wave_of_long_blocks() {
        // Retrieval heads of 131,073 keys beside streaming windows of 384, two blocks on each
        // of 132 multiprocessors: (heads, keys per split, long blocks).
        for (long, split, blocks) in [(8, 4032, 264), (6, 3008, 264), (5, 2560, 260), (4, 2048, 260), (3, 1536, 258), (2, 1024, 258), (1, 512, 257)] {
            let lens: Vec<u32> = (0..8).map(|g| if g < long { 131_073 } else { 384 }).collect();
            let got = fill_split(2, &lens);
            assert_eq!(got, split, "{long} long heads");
            assert!(got.is_multiple_of(64));
            assert_eq!(long * 131_073usize.div_ceil(got), blocks, "{long} long heads");
            assert!(long * 131_073usize.div_ceil(got) <= 264);
        }
        assert_eq!(fill_split(2, &[524_288; 8]), 8192, "the longest split: two waves");
        assert_eq!(fill_split(2, &[4096; 8]), 512, "the shortest split");
    }

    #[test]
    fn one_row_on_tensor_cores_takes_about_one_wave() {
        let duo_128k = [131_072, 131_072, 131_072, 131_072, 320, 320, 320, 320];
        assert_eq!(
            split_for(DecodeKernel::Tensor, 2, &[131_072; 8], 1),
            4032,
            "8 x 33 blocks"
        );
        assert_eq!(
            split_for(DecodeKernel::Tensor, 2, &duo_128k, 1),
            2048,
            "4 long heads x 64 blocks"
        );
        assert_eq!(
            split_for(DecodeKernel::Tensor, 2, &[524_288; 8], 1),
            8192,
            "the longest split"
        );
        assert_eq!(
            split_for(DecodeKernel::Tensor, 2, &[4096; 8], 1),
            512,
            "the shortest split"
        );
        assert_eq!(
            split_for(DecodeKernel::Tensor, 2, &[16_384; 8], 25),
            batch_split(&[16_384; 8], 25),
            "a batch: many waves"
        );
        assert_eq!(
            split_for(DecodeKernel::Cores(2), 2, &[131_072; 8], 1),
            batch_split(&[131_072; 8], 1)
        );
    }

    #[test]
    fn a_batch_counts_every_row() {
        assert_eq!(
            batch_split(&[16_384; 8], 64),
            2048,
            "64 rows fill the card with long splits"
        );
        assert_eq!(
            batch_split(&[16_384; 8], 4),
            1024,
            "4 rows: 4 x 8 x 16,384 / 528 keys, rounded up to 64"
        );
        assert_eq!(batch_split(&[1000, 320], 8), 256);
    }

    fn heads(kinds: &[bool], sink: usize, recent: usize) -> Vec<HeadEntry> {
        kinds
            .iter()
            .enumerate()
            .map(|(i, &r)| {
                if r {
                    HeadEntry::retrieval(i)
                } else {
                    HeadEntry::streaming(i, sink, recent)
                }
            })
            .collect()
    }

    #[test]
    fn reference_is_a_softmax_average() {
        // Row 0 has one token: the output is its value. Row 1 has two equal keys: the mean.
        let mut x = random_input(1, 2, 64, heads(&[true, true], 0, 0), &[1, 2]);
        let out = reference(&x).unwrap();
        let v0 = x.key_offset(0, 0);
        assert!(out[..64]
            .iter()
            .zip(&x.values[v0..v0 + 64])
            .all(|(a, b)| (a - b).abs() < 1e-6));
        let at = x.key_offset(1, 1);
        let k1 = x.keys[at..at + 64].to_vec();
        x.keys[at + 64..at + 128].copy_from_slice(&k1);
        let (a, b) = (
            x.values[at..at + 64].to_vec(),
            x.values[at + 64..at + 128].to_vec(),
        );
        let out = reference(&x).unwrap();
        let row1_head1 = &out[(2 + 1) * 64..(2 + 2) * 64];
        assert!(row1_head1
            .iter()
            .zip(a.iter().zip(&b))
            .all(|(o, (a, b))| (o - (a + b) / 2.0).abs() < 1e-5));
    }

    #[test]
    fn a_streaming_head_sees_only_sinks_and_recent() {
        // 6 tokens, sink 1, recent 2: positions 0, 4, 5 are seen; 1..4 poisoned.
        let mut x = random_input(2, 1, 64, heads(&[false], 1, 2), &[6]);
        for p in 1..4 {
            x.values[p * 64..(p + 1) * 64].fill(1e6);
        }
        assert!(reference(&x).unwrap().iter().all(|v| v.abs() < 100.0));
    }

    #[test]
    fn bad_shapes_are_refused() {
        let x = random_input(1, 3, 64, heads(&[true, true], 0, 0), &[4, 4]);
        assert!(
            reference(&x).is_err(),
            "3 query heads cannot share 2 KV heads"
        );
        let mut x = random_input(1, 2, 64, heads(&[true, true], 0, 0), &[4, 4]);
        x.tokens[1] = 9;
        assert!(reference(&x).is_err());
        let x = random_input(1, 2, 96, heads(&[true, true], 0, 0), &[4, 4]);
        assert!(reference(&x).is_err(), "head_dim must be 64, 128 or 256");
    }
}
