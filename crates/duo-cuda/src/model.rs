//! A Llama-family model on one GPU: bf16 weights, a hybrid bf16 KV cache, chunked prefill,
//! and a decode step replayed as one CUDA graph.
//!
//! Cache layout, per layer: each KV head owns a region of rows. A retrieval head's region has
//! a row per possible token (`max_tokens`). A streaming head's region has `sink` rows for the
//! first tokens, then a *window* of consecutive positions with `recent + slack` rows: new
//! tokens are appended at the window's end, and only when it is full are its last `recent`
//! rows moved to its front (one small launch for all heads, every `slack` tokens), instead of
//! a ring that would need position lists. Every streaming head sees the same tokens, so one
//! window start serves them all, and a step's positions are two integers in device memory
//! (`state`), which lets the decode step be captured once and replayed.
//!
//! Invariants: after any call, `tokens()` positions are cached; streaming windows hold at most
//! `recent + slack` rows; a decode step reads `tokens() + 1 <= max_tokens`.
//!
//! [`reference_logits`] is the plain CPU forward pass (same seeded weights, same bf16
//! rounding points, attention in `f64`) that the GPU model is checked against.

use crate::ops::{hash_uniform, rms_norm_ref, rope_ref, round_bf16, silu_mul_ref, uniform_bf16};
use duo_core::random_weights::{scale_for, RandomTensor};
use crate::prefill_attention::HeadEntry;
use crate::{CudaError, Result};

/// The shape of the model the GPU runs.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuConfig {
    /// Transformer blocks.
    pub n_layers: usize,
    /// Residual width.
    pub hidden: usize,
    /// Query heads.
    pub n_heads: usize,
    /// KV heads.
    pub n_kv_heads: usize,
    /// Dimension of a head (64 or 128).
    pub head_dim: usize,
    /// MLP width.
    pub ffn: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// RoPE inverse frequencies, `[head_dim / 2]`.
    pub inv_freq: Vec<f32>,
    /// RoPE pairs `(i, i + d/2)` (Hugging Face) rather than `(2i, 2i+1)`.
    pub half_split: bool,
}

impl GpuConfig {
    /// From a model configuration (Llama architecture). The RoPE table is the CPU engine's
    /// own, so both rotate by exactly the same angles.
    pub fn from_model(c: &duo_core::config::ModelConfig) -> Self {
        let half_split = c.rope_style == duo_core::config::RopeStyle::HalfSplit;
        let inv_freq = duo_kernels::ops::Rope::new(c.head_dim, c.rope_theta, half_split, c.rope_freq_factors.as_deref()).inv_freq().to_vec();
        Self {
            n_layers: c.n_layers,
            hidden: c.hidden_size,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            ffn: c.intermediate_size,
            vocab: c.vocab_size,
            eps: c.rms_norm_eps,
            inv_freq,
            half_split,
        }
    }

    fn qkv_dim(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }

    fn validate(&self) -> Result<()> {
        if ![64, 128].contains(&self.head_dim) || self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) || self.inv_freq.len() * 2 != self.head_dim {
            return Err(CudaError::Input(format!("unsupported shape: {} heads / {} KV heads of {} dims", self.n_heads, self.n_kv_heads, self.head_dim)));
        }
        Ok(())
    }

    /// Bytes of bf16 weights on the GPU (no embedding table for random weights).
    pub fn weight_bytes(&self) -> usize {
        let (h, f) = (self.hidden, self.ffn);
        let per_layer = self.qkv_dim() * h + h * self.n_heads * self.head_dim + 2 * f * h + h * f;
        2 * (self.n_layers * per_layer + self.vocab * h) + 4 * (2 * self.n_layers + 1) * h
    }
}

/// Which heads keep what, and how big the caches are.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheLayout {
    /// `[layer][kv head]`: true for a retrieval head.
    pub retrieval: Vec<Vec<bool>>,
    /// Sink tokens of streaming heads.
    pub sink: usize,
    /// Recent window of streaming heads (the current token included).
    pub recent: usize,
    /// Prefill chunk (rows of the activation buffers).
    pub chunk: usize,
    /// Most tokens a sequence may hold.
    pub max_tokens: usize,
}

impl CacheLayout {
    /// Window rows beyond `recent`: tokens appended between two compactions.
    pub fn slack(&self) -> usize {
        self.chunk.max(2048)
    }

    /// Rows of one head's region.
    pub fn head_rows(&self, retrieval: bool) -> usize {
        if retrieval { self.max_tokens } else { self.sink + self.recent + self.slack() }
    }

    /// The layer's head table.
    pub fn heads(&self, layer: usize) -> Vec<HeadEntry> {
        let mut at = 0;
        self.retrieval[layer]
            .iter()
            .map(|&r| {
                let e = if r { HeadEntry::retrieval(at) } else { HeadEntry::streaming(at, self.sink, self.recent) };
                at += self.head_rows(r);
                e
            })
            .collect()
    }

    /// Rows of the layer's cache.
    pub fn layer_rows(&self, layer: usize) -> usize {
        self.retrieval[layer].iter().map(|&r| self.head_rows(r)).sum()
    }

    /// Bytes the caches take on the GPU (keys and values, bf16).
    pub fn allocated_bytes(&self, head_dim: usize) -> usize {
        (0..self.retrieval.len()).map(|l| self.layer_rows(l)).sum::<usize>() * head_dim * 2 * 2
    }

    fn validate(&self, c: &GpuConfig) -> Result<()> {
        if self.retrieval.len() != c.n_layers || self.retrieval.iter().any(|l| l.len() != c.n_kv_heads) {
            return Err(CudaError::Input(format!("the head pattern is not {} layers x {} KV heads", c.n_layers, c.n_kv_heads)));
        }
        if self.recent == 0 || self.chunk == 0 || self.max_tokens == 0 {
            return Err(CudaError::Input("recent window, chunk and max_tokens must be positive".into()));
        }
        Ok(())
    }
}

/// A weight matrix (or a row range of a stacked one) as the host hands it to the GPU.
#[derive(Debug, Clone)]
pub enum HostMatrix<'a> {
    /// bf16 bits, row-major.
    Bf16(Vec<u16>),
    /// Raw GGUF blocks (rows of whole blocks), dequantised to bf16 on the GPU.
    Blocks(crate::dequant::QuantType, &'a [u8]),
}

impl HostMatrix<'_> {
    /// Values held.
    pub fn len(&self) -> usize {
        match self {
            HostMatrix::Bf16(v) => v.len(),
            HostMatrix::Blocks(ty, bytes) => {
                let (per, size) = ty.block();
                bytes.len() / size * per
            }
        }
    }

    /// True when it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One block's weights on the host as the GPU takes them; the stacked matrices are lists of
/// row ranges (q, k, v; gate, up), placed one after the other on the GPU.
#[derive(Debug, Clone, Default)]
pub struct HostLayer<'a> {
    /// RMSNorm before attention.
    pub attn_norm: Vec<f32>,
    /// Query, key and value projections, stacked to `[(heads + 2 kv) * head_dim, hidden]`.
    pub qkv: Vec<HostMatrix<'a>>,
    /// Output projection `[hidden, heads * head_dim]`.
    pub o: Vec<HostMatrix<'a>>,
    /// RMSNorm before the MLP.
    pub ffn_norm: Vec<f32>,
    /// Gate and up projections, stacked to `[2 * ffn, hidden]`.
    pub gate_up: Vec<HostMatrix<'a>>,
    /// Down projection `[hidden, ffn]`.
    pub down: Vec<HostMatrix<'a>>,
}

/// A matrix outside the blocks, asked for by [`GpuWeights::load`] one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalMatrix {
    /// Token embeddings, `[vocab, hidden]`.
    Embed,
    /// The LM head `[vocab, hidden]` (`None` when tied to the embeddings).
    LmHead,
}

fn size_error(what: &str, got: usize, want: usize) -> CudaError {
    CudaError::Input(format!("{what} has {got} values, the shape needs {want}"))
}

fn parts_len(parts: &[HostMatrix]) -> usize {
    parts.iter().map(HostMatrix::len).sum()
}

impl HostLayer<'_> {
    fn validate(&self, c: &GpuConfig, i: usize) -> Result<()> {
        let (h, f, qd) = (c.hidden, c.ffn, c.n_heads * c.head_dim);
        for (what, got, want) in [
            ("attn_norm", self.attn_norm.len(), h),
            ("qkv", parts_len(&self.qkv), c.qkv_dim() * h),
            ("o", parts_len(&self.o), h * qd),
            ("ffn_norm", self.ffn_norm.len(), h),
            ("gate_up", parts_len(&self.gate_up), 2 * f * h),
            ("down", parts_len(&self.down), h * f),
        ] {
            if got != want {
                return Err(size_error(&format!("layer {i} {what}"), got, want));
            }
        }
        Ok(())
    }
}



/// The CPU reference: logits at every position of `tokens` from position `from` on
/// (`[tokens.len() - from, vocab]`), for the seeded random model and the layout's masks.
/// Meant for small shapes (it keeps every weight in `f32`).
pub fn reference_logits(c: &GpuConfig, layout: &CacheLayout, seed: u64, tokens: &[u32], from: usize) -> Result<Vec<f32>> {
    c.validate()?;
    layout.validate(c)?;
    let (h, d, nh, ng, f) = (c.hidden, c.head_dim, c.n_heads, c.n_kv_heads, c.ffn);
    let t = tokens.len();
    let matmul = |x: &[f32], w: &[f32], out_dim: usize, in_dim: usize| -> Vec<f32> {
        x.chunks(in_dim).flat_map(|row| (0..out_dim).map(move |o| row.iter().zip(&w[o * in_dim..][..in_dim]).map(|(a, b)| a * b).sum::<f32>())).collect()
    };
    let mut x: Vec<f32> = tokens
        .iter()
        .flat_map(|&tok| (0..h as u64).map(move |i| round_bf16(hash_uniform(RandomTensor::Embed.seed(seed), tok as u64 * h as u64 + i))))
        .collect();
    let ones = vec![1.0f32; h.max(f)];
    let scale = 1.0 / (d as f64).sqrt();
    for l in 0..c.n_layers {
        let wqkv = uniform_bf16(RandomTensor::Qkv(l).seed(seed), c.qkv_dim() * h, scale_for(h));
        let wo = uniform_bf16(RandomTensor::O(l).seed(seed), h * nh * d, scale_for(nh * d));
        let wgu = uniform_bf16(RandomTensor::GateUp(l).seed(seed), 2 * f * h, scale_for(h));
        let wd = uniform_bf16(RandomTensor::Down(l).seed(seed), h * f, scale_for(f));
        let xn = rms_norm_ref(&x, &ones[..h], c.eps);
        // The qkv and gate/up products come out of the GPU's matmuls as bf16.
        let mut qkv: Vec<f32> = matmul(&xn, &wqkv, c.qkv_dim(), h).into_iter().map(round_bf16).collect();
        for (p, row) in qkv.chunks_mut(c.qkv_dim()).enumerate() {
            for hd in 0..nh + ng {
                rope_ref(&mut row[hd * d..][..d], p, &c.inv_freq, c.half_split);
            }
            for v in &mut row[nh * d..] {
                *v = round_bf16(*v); // keys and values are cached as bf16
            }
        }
        let mut att = vec![0.0f32; t * nh * d];
        for qh in 0..nh {
            let g = qh / (nh / ng);
            let e = if layout.retrieval[l][g] { HeadEntry::retrieval(0) } else { HeadEntry::streaming(0, layout.sink, layout.recent) };
            for i in 0..t {
                let q = &qkv[i * c.qkv_dim() + qh * d..][..d];
                let seen: Vec<usize> = (0..=i).filter(|&j| e.visible(i, j)).collect();
                let s: Vec<f64> = seen.iter().map(|&j| q.iter().zip(&qkv[j * c.qkv_dim() + (nh + g) * d..][..d]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale).collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for k in 0..d {
                    let v: f64 = w.iter().zip(&seen).map(|(wi, &j)| wi * qkv[j * c.qkv_dim() + (nh + ng + g) * d + k] as f64).sum();
                    att[(i * nh + qh) * d + k] = round_bf16((v / z) as f32);
                }
            }
        }
        for (xi, o) in x.iter_mut().zip(matmul(&att, &wo, h, nh * d)) {
            *xi += o;
        }
        let xn = rms_norm_ref(&x, &ones[..h], c.eps);
        let gu: Vec<f32> = matmul(&xn, &wgu, 2 * f, h).into_iter().map(round_bf16).collect();
        let act = silu_mul_ref(&gu, f);
        for (xi, o) in x.iter_mut().zip(matmul(&act, &wd, h, f)) {
            *xi += o;
        }
    }
    let head = uniform_bf16(RandomTensor::LmHead.seed(seed), c.vocab * h, scale_for(h));
    let xn = rms_norm_ref(&x[from * h..], &ones[..h], c.eps);
    Ok(matmul(&xn, &head, c.vocab, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (GpuConfig, CacheLayout) {
        let inv_freq: Vec<f32> = (0..32).map(|i| 10_000f32.powf(-(i as f32) / 32.0)).collect();
        let c = GpuConfig { n_layers: 2, hidden: 64, n_heads: 4, n_kv_heads: 2, head_dim: 64, ffn: 96, vocab: 50, eps: 1e-5, inv_freq, half_split: true };
        let l = CacheLayout { retrieval: vec![vec![true, false], vec![false, false]], sink: 2, recent: 5, chunk: 8, max_tokens: 100 };
        (c, l)
    }

    #[test]
    fn layout_rows_offsets_and_bytes_follow_the_heads() {
        let (_, l) = tiny();
        assert_eq!(l.slack(), 2048, "at least 2048 window rows between compactions");
        assert_eq!(l.head_rows(true), 100);
        assert_eq!(l.head_rows(false), 2 + 5 + 2048);
        let heads = l.heads(0);
        assert_eq!((heads[0].offset, heads[0].kind), (0, HeadEntry::RETRIEVAL));
        assert_eq!((heads[1].offset, heads[1].kind, heads[1].sink, heads[1].recent), (100, HeadEntry::STREAMING, 2, 5));
        assert_eq!(l.layer_rows(1), 2 * 2055);
        // 40 tokens: the retrieval head holds 40, each of the 3 streaming heads 2 + 5.
        assert_eq!(l.allocated_bytes(64), (100 + 2055 + 2 * 2055) * 64 * 2 * 2);
    }

    #[test]
    fn a_window_longer_than_the_text_is_full_attention() {
        let (c, l) = tiny();
        let tokens: Vec<u32> = (0..12).map(|i| (i * 7 % 50) as u32).collect();
        let full = CacheLayout { retrieval: vec![vec![true; 2]; 2], ..l.clone() };
        let wide = CacheLayout { recent: 64, ..l.clone() };
        let a = reference_logits(&c, &full, 3, &tokens, 0).unwrap();
        let b = reference_logits(&c, &wide, 3, &tokens, 0).unwrap();
        assert_eq!(a, b, "every key is within the window: streaming heads see what retrieval heads see");
        let narrow = reference_logits(&c, &l, 3, &tokens, 0).unwrap();
        assert_eq!(narrow[..7 * 50], a[..7 * 50], "positions 0..7 see everything within sink + recent");
        assert_ne!(narrow[11 * 50..], a[11 * 50..], "position 11 has lost keys 2..6");
        assert_eq!(a.len(), 12 * 50);
        assert!(a.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn wrong_shapes_are_refused() {
        let (c, l) = tiny();
        let bad = CacheLayout { retrieval: vec![vec![true; 3]; 2], ..l.clone() };
        assert!(reference_logits(&c, &bad, 0, &[1, 2], 0).is_err());
        let bad = GpuConfig { head_dim: 96, ..c.clone() };
        assert!(reference_logits(&bad, &l, 0, &[1, 2], 0).is_err());
        let err = HostLayer::default().validate(&c, 0).unwrap_err().to_string();
        assert!(err.contains("layer 0 attn_norm"), "{err}");
    }

    #[test]
    fn rope_tables_follow_the_model_config() {
        let mut mc = duo_core::config::ModelConfig {
            architecture: duo_core::config::Architecture::Llama,
            n_layers: 1,
            hidden_size: 64,
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 64,
            intermediate_size: 64,
            vocab_size: 10,
            context_length: 128,
            rope_theta: 10_000.0,
            rope_style: duo_core::config::RopeStyle::HalfSplit,
            rope_freq_factors: None,
            rms_norm_eps: 1e-5,
            tie_embeddings: true,
            bos_token_id: None,
            eos_token_ids: vec![],
        };
        let g = GpuConfig::from_model(&mc);
        assert_eq!(g.inv_freq.len(), 32);
        assert_eq!(g.inv_freq[0], 1.0);
        assert!((g.inv_freq[1] - 10_000f32.powf(-2.0 / 64.0)).abs() < 1e-7);
        assert!(g.half_split);
        mc.rope_freq_factors = Some(vec![2.0; 32]);
        assert_eq!(GpuConfig::from_model(&mc).inv_freq[0], 0.5, "frequency factors divide");
    }
}

#[cfg(feature = "cuda")]
pub use gpu::*;

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use crate::decode_attention::{auto_split, keys_per_warp_fits, KvType, MIN_SPLIT};

    /// Keys a warp of the decode kernel reads at once, where the head size allows.
    pub const DECODE_KEYS_PER_WARP: usize = 2;
    use crate::runtime::{driver, DecodeLaunch, Gpu, StepGraph};
    use crate::Parity;
    use cudarc::driver::{sys as drv, CudaSlice};
    use std::sync::Arc;

    /// One bf16 buffer holding `parts` one after the other: bf16 parts copied, GGUF blocks
    /// uploaded as they are and dequantised in place by the GPU.
    fn upload_parts(gpu: &Gpu, parts: &[HostMatrix]) -> Result<CudaSlice<u16>> {
        let mut out = gpu.zeros::<u16>(parts_len(parts))?;
        let mut at = 0;
        for p in parts {
            let n = p.len();
            match p {
                HostMatrix::Bf16(v) => {
                    let mut view = out.slice_mut(at..at + n);
                    gpu.stream.memcpy_htod(v, &mut view).map_err(driver)?;
                }
                HostMatrix::Blocks(ty, bytes) => {
                    let raw = gpu.upload(bytes)?;
                    gpu.dequant_bf16(gpu.addr(&raw), gpu.addr(&out) + (at * 2) as u64, n, *ty)?;
                    // The raw blocks are freed when `raw` drops: wait for the kernel first.
                    gpu.sync()?;
                }
            }
            at += n;
        }
        gpu.sync()?;
        Ok(out)
    }

    struct LayerWeights {
        attn_norm: CudaSlice<f32>,
        qkv: CudaSlice<u16>,
        o: CudaSlice<u16>,
        ffn_norm: CudaSlice<f32>,
        gate_up: CudaSlice<u16>,
        down: CudaSlice<u16>,
    }

    /// The model's weights on the GPU.
    pub struct GpuWeights {
        /// The shape.
        pub config: GpuConfig,
        seed: u64,
        layers: Vec<LayerWeights>,
        norm: CudaSlice<f32>,
        /// The embedding table; `None` for random weights (rows generated from the token id).
        embed: Option<CudaSlice<u16>>,
        /// `None` when tied to `embed`.
        lm_head: Option<CudaSlice<u16>>,
        inv_freq: CudaSlice<f32>,
    }

    impl GpuWeights {
        /// Seeded random bf16 weights (uniform, unit-variance outputs) and unit norms,
        /// generated on the GPU. The embedding table is not stored: rows are generated from
        /// the token id when needed.
        pub fn random(gpu: &Gpu, config: GpuConfig, seed: u64) -> Result<Self> {
            config.validate()?;
            let c = &config;
            let (h, f) = (c.hidden, c.ffn);
            let random = |n: usize, s: u64, in_dim: usize| -> Result<CudaSlice<u16>> {
                let b = gpu.zeros::<u16>(n)?;
                gpu.fill_uniform(gpu.addr(&b), n, s, scale_for(in_dim))?;
                Ok(b)
            };
            let ones = gpu.upload(&vec![1.0f32; h])?;
            let mut layers = Vec::with_capacity(c.n_layers);
            for l in 0..c.n_layers {
                layers.push(LayerWeights {
                    attn_norm: gpu.upload(&vec![1.0f32; h])?,
                    qkv: random(c.qkv_dim() * h, RandomTensor::Qkv(l).seed(seed), h)?,
                    o: random(h * c.n_heads * c.head_dim, RandomTensor::O(l).seed(seed), c.n_heads * c.head_dim)?,
                    ffn_norm: gpu.upload(&vec![1.0f32; h])?,
                    gate_up: random(2 * f * h, RandomTensor::GateUp(l).seed(seed), h)?,
                    down: random(h * f, RandomTensor::Down(l).seed(seed), f)?,
                });
            }
            let lm_head = random(c.vocab * h, RandomTensor::LmHead.seed(seed), h)?;
            let inv_freq = gpu.upload(&c.inv_freq)?;
            gpu.sync()?;
            Ok(Self { config, seed, layers, norm: ones, embed: None, lm_head: Some(lm_head), inv_freq })
        }

        /// Uploads a checkpoint one tensor at a time: `matrix` yields the embedding table and
        /// then the LM head (or `None`, tied), `layer(l)` block `l`; each is uploaded (GGUF
        /// blocks dequantised on the GPU) and dropped before the next is asked for, so the
        /// host holds one at a time.
        pub fn load<'a>(
            gpu: &Gpu,
            config: GpuConfig,
            norm: Vec<f32>,
            mut matrix: impl FnMut(GlobalMatrix) -> Result<Option<HostMatrix<'a>>>,
            mut layer: impl FnMut(usize) -> Result<HostLayer<'a>>,
        ) -> Result<Self> {
            config.validate()?;
            let c = &config;
            if norm.len() != c.hidden {
                return Err(size_error("the final norm", norm.len(), c.hidden));
            }
            let mut global = |which: GlobalMatrix| -> Result<Option<CudaSlice<u16>>> {
                let Some(w) = matrix(which)? else { return Ok(None) };
                if w.len() != c.vocab * c.hidden {
                    return Err(size_error(if which == GlobalMatrix::Embed { "the embedding table" } else { "the LM head" }, w.len(), c.vocab * c.hidden));
                }
                Ok(Some(upload_parts(gpu, &[w])?))
            };
            let embed = Some(global(GlobalMatrix::Embed)?.ok_or_else(|| CudaError::Input("a checkpoint needs an embedding table".into()))?);
            let lm_head = global(GlobalMatrix::LmHead)?;
            let (norm, inv_freq) = (gpu.upload(&norm)?, gpu.upload(&config.inv_freq)?);
            let mut layers = Vec::with_capacity(c.n_layers);
            for l in 0..c.n_layers {
                let w = layer(l)?;
                w.validate(c, l)?;
                layers.push(LayerWeights {
                    attn_norm: gpu.upload(&w.attn_norm)?,
                    qkv: upload_parts(gpu, &w.qkv)?,
                    o: upload_parts(gpu, &w.o)?,
                    ffn_norm: gpu.upload(&w.ffn_norm)?,
                    gate_up: upload_parts(gpu, &w.gate_up)?,
                    down: upload_parts(gpu, &w.down)?,
                });
            }
            gpu.sync()?;
            Ok(Self { config, seed: 0, layers, norm, embed, lm_head, inv_freq })
        }

        fn lm_head(&self) -> &CudaSlice<u16> {
            self.lm_head.as_ref().or(self.embed.as_ref()).expect("random weights have an LM head; checkpoints an embedding table")
        }
    }

    struct LayerCache {
        keys: CudaSlice<u16>,
        values: CudaSlice<u16>,
        heads: CudaSlice<i32>,
        streaming_offsets: CudaSlice<i32>,
        n_streaming: usize,
    }

    struct Buffers {
        tokens: CudaSlice<i32>,
        state: CudaSlice<i32>,
        x: CudaSlice<f32>,
        xn: CudaSlice<u16>,
        qkv: CudaSlice<u16>,
        q: CudaSlice<f32>,
        att: CudaSlice<u16>,
        gu: CudaSlice<u16>,
        act: CudaSlice<u16>,
        logits: CudaSlice<f32>,
        next: CudaSlice<i32>,
        part_m: CudaSlice<f32>,
        part_l: CudaSlice<f32>,
        part_acc: CudaSlice<f32>,
    }

    impl Buffers {
        fn new(gpu: &Gpu, c: &GpuConfig, layout: &CacheLayout) -> Result<Self> {
            let t = layout.chunk;
            let max_splits = layout.max_tokens.div_ceil(MIN_SPLIT) + 1;
            let qd = c.n_heads * c.head_dim;
            Ok(Self {
                tokens: gpu.zeros(t)?,
                state: gpu.zeros(2)?,
                x: gpu.zeros(t * c.hidden)?,
                xn: gpu.zeros(t * c.hidden)?,
                qkv: gpu.zeros(t * c.qkv_dim())?,
                q: gpu.zeros(t * qd)?,
                att: gpu.zeros(t * qd)?,
                gu: gpu.zeros(t * 2 * c.ffn)?,
                act: gpu.zeros(t * c.ffn)?,
                logits: gpu.zeros(c.vocab)?,
                next: gpu.zeros(1)?,
                part_m: gpu.zeros(c.n_heads * max_splits)?,
                part_l: gpu.zeros(c.n_heads * max_splits)?,
                part_acc: gpu.zeros(c.n_heads * max_splits * c.head_dim)?,
            })
        }
    }

    /// One sequence on the GPU: its caches, activation buffers and the captured decode step.
    pub struct GpuSequence {
        gpu: Arc<Gpu>,
        w: Arc<GpuWeights>,
        layout: CacheLayout,
        caches: Vec<LayerCache>,
        b: Buffers,
        tokens: usize,
        window_start: usize,
        graph: Option<(Vec<DecodeLaunch>, StepGraph)>,
        pending: Option<Vec<DecodeLaunch>>,
        /// Decode steps replayed from the graph (the rest ran launch by launch).
        pub graph_steps: usize,
        /// `[ROW_BLOCK, vocab]` logits of several rows (scoring), allocated on first use.
        row_logits: Option<CudaSlice<f32>>,
    }

    /// Rows whose logits one LM-head product computes when every row's logits are asked for.
    const ROW_BLOCK: usize = 256;

    impl GpuSequence {
        /// Allocates the caches and buffers of one sequence.
        pub fn new(gpu: Arc<Gpu>, w: Arc<GpuWeights>, layout: CacheLayout) -> Result<Self> {
            let c = &w.config;
            layout.validate(c)?;
            let mut caches = Vec::with_capacity(c.n_layers);
            for l in 0..c.n_layers {
                let rows = layout.layer_rows(l);
                let table = layout.heads(l);
                let streaming: Vec<i32> = table.iter().filter(|e| e.kind == HeadEntry::STREAMING).map(|e| e.offset).collect();
                caches.push(LayerCache {
                    keys: gpu.zeros(rows * c.head_dim)?,
                    values: gpu.zeros(rows * c.head_dim)?,
                    heads: gpu.upload(&HeadEntry::table(&table))?,
                    n_streaming: streaming.len(),
                    streaming_offsets: gpu.upload(&if streaming.is_empty() { vec![0] } else { streaming })?,
                });
            }
            let b = Buffers::new(&gpu, c, &layout)?;
            gpu.sync()?;
            Ok(Self { gpu, w, window_start: layout.sink, layout, caches, b, tokens: 0, graph: None, pending: None, graph_steps: 0, row_logits: None })
        }

        /// A copy of this sequence: the same cached tokens, the same last logits, its own
        /// buffers (device-to-device copies; the decode graph is captured anew).
        pub fn fork(&self) -> Result<Self> {
            let mut copy = Self::new(self.gpu.clone(), self.w.clone(), self.layout.clone())?;
            let s = &self.gpu.stream;
            for (dst, src) in copy.caches.iter_mut().zip(&self.caches) {
                s.memcpy_dtod(&src.keys, &mut dst.keys).map_err(driver)?;
                s.memcpy_dtod(&src.values, &mut dst.values).map_err(driver)?;
            }
            s.memcpy_dtod(&self.b.logits, &mut copy.b.logits).map_err(driver)?;
            s.memcpy_dtod(&self.b.next, &mut copy.b.next).map_err(driver)?;
            copy.tokens = self.tokens;
            copy.window_start = self.window_start;
            self.gpu.sync()?;
            Ok(copy)
        }

        /// Logits of each of the last `t` positions processed (`t` at most the last chunk's
        /// length), `[t, vocab]`: the final norm and LM head over the residual rows the last
        /// forward left, `ROW_BLOCK` rows per product.
        pub fn last_rows_logits(&mut self, t: usize) -> Result<Vec<f32>> {
            let c = &self.w.config;
            if t == 0 || t > self.layout.chunk.max(1) {
                return Err(CudaError::Input(format!("logits of {t} rows: at most one chunk ({})", self.layout.chunk)));
            }
            if self.row_logits.is_none() {
                self.row_logits = Some(self.gpu.zeros(ROW_BLOCK * c.vocab)?);
            }
            let (g, b) = (&*self.gpu, &self.b);
            let buf = self.row_logits.as_ref().ok_or_else(|| CudaError::Driver("row logits buffer".into()))?;
            let mut out = Vec::with_capacity(t * c.vocab);
            for r0 in (0..t).step_by(ROW_BLOCK) {
                let rows = ROW_BLOCK.min(t - r0);
                let x = g.addr(&b.x) + (r0 * c.hidden * 4) as u64;
                g.rms_norm(x, g.addr(&self.w.norm), g.addr(&b.xn), rows, c.hidden, c.eps)?;
                g.gemm(g.addr(&b.xn), g.addr(self.w.lm_head()), g.addr(buf), rows, c.hidden, c.vocab, 0.0, false)?;
                let all = g.download(buf)?;
                out.extend_from_slice(&all[..rows * c.vocab]);
            }
            Ok(out)
        }

        /// Tokens cached.
        pub fn tokens(&self) -> usize {
            self.tokens
        }

        /// The layout.
        pub fn layout(&self) -> &CacheLayout {
            &self.layout
        }

        /// Logits of the last position processed.
        pub fn logits(&self) -> Result<Vec<f32>> {
            self.gpu.download(&self.b.logits)
        }

        /// The greedy next token (argmax of the last logits).
        pub fn next_token(&self) -> Result<u32> {
            Ok(self.gpu.download(&self.b.next)?[0] as u32)
        }

        /// Makes room for `t` more tokens: checks the length and compacts streaming windows.
        fn make_room(&mut self, t: usize) -> Result<()> {
            let (n, s, r) = (self.tokens, self.layout.sink, self.layout.recent);
            if n + t > self.layout.max_tokens {
                return Err(CudaError::Input(format!("{} tokens exceed this sequence's {} tokens", n + t, self.layout.max_tokens)));
            }
            if t > 1 && t > self.layout.chunk {
                return Err(CudaError::Input(format!("a chunk of {t} tokens is longer than the buffers' {}", self.layout.chunk)));
            }
            let w = if n > s { n - self.window_start } else { 0 };
            if w + t > r + self.layout.slack() {
                let keep = w.min(r);
                for lc in self.caches.iter().filter(|lc| lc.n_streaming > 0) {
                    self.gpu.compact_window(self.gpu.addr(&lc.keys), self.gpu.addr(&lc.values), self.gpu.addr(&lc.streaming_offsets), lc.n_streaming, s + w - keep, s, keep, self.w.config.head_dim)?;
                }
                self.window_start += w - keep;
            }
            Ok(())
        }

        fn set_state(&mut self) -> Result<()> {
            let st = [self.tokens as i32, self.window_start as i32];
            self.gpu.write(&st, &mut self.b.state)
        }

        /// Every launch of one forward over `t` tokens whose ids are at `tokens`; decode
        /// (`Some`) uses the split-K decode attention with these launch shapes.
        fn forward(&self, t: usize, tokens: u64, decode: Option<&[DecodeLaunch]>) -> Result<()> {
            let (g, c, b) = (&*self.gpu, &self.w.config, &self.b);
            let (h, qd, kvd) = (c.hidden, c.n_heads * c.head_dim, c.qkv_dim());
            let a = |s: &CudaSlice<f32>| g.addr(s);
            let a16 = |s: &CudaSlice<u16>| g.addr(s);
            let seed = RandomTensor::Embed.seed(self.w.seed);
            g.embed(tokens, self.w.embed.as_ref().map_or(0, &a16), seed, 1.0, a(&b.x), h, t)?;
            for (l, (lw, lc)) in self.w.layers.iter().zip(&self.caches).enumerate() {
                g.rms_norm(a(&b.x), a(&lw.attn_norm), a16(&b.xn), t, h, c.eps)?;
                g.gemm(a16(&b.xn), a16(&lw.qkv), a16(&b.qkv), t, h, kvd, 0.0, true)?;
                let (kc, vc, heads, state) = (a16(&lc.keys), a16(&lc.values), g.addr(&lc.heads), g.addr(&b.state));
                g.rope_append(a16(&b.qkv), state, a(&self.w.inv_freq), heads, c.n_heads, c.n_kv_heads, c.head_dim, c.half_split, a(&b.q), kc, vc, t)?;
                match decode {
                    Some(shapes) => {
                        let parts = (a(&b.part_m), a(&b.part_l), a(&b.part_acc));
                        g.decode_attention(&shapes[l], a(&b.q), kc, vc, heads, state, parts, 0, a16(&b.att))?;
                    }
                    None => g.prefill_attention(a(&b.q), kc, vc, heads, state, t, c.n_heads, c.n_heads / c.n_kv_heads, c.head_dim, a16(&b.att))?,
                }
                g.gemm(a16(&b.att), a16(&lw.o), a(&b.x), t, qd, h, 1.0, false)?;
                g.rms_norm(a(&b.x), a(&lw.ffn_norm), a16(&b.xn), t, h, c.eps)?;
                g.gemm(a16(&b.xn), a16(&lw.gate_up), a16(&b.gu), t, h, 2 * c.ffn, 0.0, true)?;
                g.silu_mul(a16(&b.gu), a16(&b.act), t, c.ffn)?;
                g.gemm(a16(&b.act), a16(&lw.down), a(&b.x), t, c.ffn, h, 1.0, false)?;
            }
            let last = a(&b.x) + ((t - 1) * h * 4) as u64;
            g.rms_norm(last, a(&self.w.norm), a16(&b.xn), 1, h, c.eps)?;
            g.gemm(a16(&b.xn), a16(self.w.lm_head()), a(&b.logits), 1, h, c.vocab, 0.0, false)?;
            g.argmax(a(&b.logits), c.vocab, g.addr(&b.next))
        }

        /// Prefills `tokens` in chunks; `progress` gets the tokens done after each chunk.
        /// Leaves the last position's logits and greedy next token.
        pub fn prefill(&mut self, tokens: &[u32], mut progress: impl FnMut(usize)) -> Result<()> {
            if let Some(bad) = tokens.iter().find(|&&t| t as usize >= self.w.config.vocab) {
                return Err(CudaError::Input(format!("token id {bad} is outside the vocabulary of {}", self.w.config.vocab)));
            }
            for (i, chunk) in tokens.chunks(self.layout.chunk).enumerate() {
                let t = chunk.len();
                self.make_room(t)?;
                self.set_state()?;
                let ids: Vec<i32> = chunk.iter().map(|&x| x as i32).collect();
                self.gpu.write(&ids, &mut self.b.tokens)?;
                self.forward(t, self.gpu.addr(&self.b.tokens), None)?;
                self.tokens += t;
                self.gpu.sync()?;
                progress((i * self.layout.chunk + t).min(tokens.len()));
            }
            Ok(())
        }

        /// Pretends `n` tokens were prefilled: every cache row gets seeded random keys and
        /// values (what a decode step reads does not depend on what they say). For decode
        /// measurements at lengths whose prefill would take too long.
        pub fn fill_synthetic(&mut self, n: usize, seed: u64) -> Result<()> {
            if n + 1 > self.layout.max_tokens {
                return Err(CudaError::Input(format!("{n} tokens leave no room in {}", self.layout.max_tokens)));
            }
            for (l, lc) in self.caches.iter().enumerate() {
                let len = self.layout.layer_rows(l) * self.w.config.head_dim;
                self.gpu.fill_uniform(self.gpu.addr(&lc.keys), len, seed.wrapping_add(2 * l as u64), 1.0)?;
                self.gpu.fill_uniform(self.gpu.addr(&lc.values), len, seed.wrapping_add(2 * l as u64 + 1), 1.0)?;
            }
            let (s, r) = (self.layout.sink, self.layout.recent);
            self.tokens = n;
            self.window_start = if n > s { n - (n - s).min(r) } else { s };
            self.gpu.sync()
        }

        /// Decode launch shapes for the current length, constant over a bucket of 2048
        /// tokens (so a captured graph is reused until the length leaves the bucket). The
        /// bucket never exceeds `max_tokens`, so the splits always fit the partial buffers.
        fn shapes(&self) -> Vec<DecodeLaunch> {
            let c = &self.w.config;
            let bucket = ((self.tokens + 1).div_ceil(2048) * 2048).min(self.layout.max_tokens);
            let short = (self.layout.sink + self.layout.recent) as u32;
            self.caches
                .iter()
                .enumerate()
                .map(|(l, _)| {
                    let lens: Vec<u32> = self.layout.retrieval[l].iter().map(|&r| if r { bucket as u32 } else { short.min(bucket as u32) }).collect();
                    let split = auto_split(&lens);
                    let max_len = *lens.iter().max().unwrap_or(&1) as usize;
                    let keys_per_warp = [DECODE_KEYS_PER_WARP, 4].into_iter().find(|&k| keys_per_warp_fits(c.head_dim, k, KvType::Bf16)).unwrap_or(4);
                    DecodeLaunch { n_kv: c.n_kv_heads, group: c.n_heads / c.n_kv_heads, head_dim: c.head_dim, split, n_splits: max_len.div_ceil(split), kv: KvType::Bf16, keys_per_warp }
                })
                .collect()
        }

        /// One decode step on `token`: appends it and
        /// leaves the logits and the greedy next token on the GPU. Replays the captured graph
        /// when the launch shapes are unchanged; the first step of new shapes runs launch by
        /// launch and the next one captures.
        pub fn decode_step(&mut self, token: u32) -> Result<()> {
            if token as usize >= self.w.config.vocab {
                return Err(CudaError::Input(format!("token id {token} is outside the vocabulary of {}", self.w.config.vocab)));
            }
            self.gpu.write(&[token as i32], &mut self.b.next)?;
            self.make_room(1)?;
            self.set_state()?;
            let shapes = self.shapes();
            let max_splits = self.b.part_m.len() / self.w.config.n_heads;
            if let Some(s) = shapes.iter().find(|s| s.n_splits > max_splits) {
                return Err(CudaError::Input(format!("{} decode splits exceed the {max_splits} the buffers hold", s.n_splits)));
            }
            let next = self.gpu.addr(&self.b.next);
            if self.graph.as_ref().is_some_and(|(s, _)| *s == shapes) {
                self.graph.as_ref().map(|(_, g)| g.launch()).transpose()?;
                self.graph_steps += 1;
            } else if self.pending.as_ref() == Some(&shapes) {
                self.graph = None;
                let stream = &self.gpu.stream;
                stream.begin_capture(drv::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(driver)?;
                let captured = self.forward(1, next, Some(&shapes));
                let graph = stream.end_capture(drv::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH).map_err(driver)?;
                captured?;
                let graph = StepGraph::new(graph.ok_or_else(|| CudaError::Driver("stream capture produced no graph".into()))?);
                graph.launch()?;
                self.graph = Some((shapes, graph));
                self.pending = None;
                self.graph_steps += 1;
            } else {
                self.forward(1, next, Some(&shapes))?;
                self.pending = Some(shapes);
            }
            self.tokens += 1;
            Ok(())
        }
    }

    /// The whole model against [`reference_logits`]: a small mixed layout (retrieval and
    /// streaming heads in one layer, a streaming-only layer), prefill in chunks that force
    /// window compactions, then decode steps (the first ones launch by launch, the rest from
    /// the captured graph). Error: max |gpu - cpu| over all compared logits, relative to the
    /// largest |logit|; bound 2e-2 (bf16 activations), and every greedy token must agree
    /// where the reference's top two logits differ by more than that.
    pub fn check_model(gpu: &Arc<Gpu>, seed: u64) -> Result<Vec<Parity>> {
        let mut out = Vec::new();
        // (name, heads, KV heads, head dim, half-split RoPE, prompt tokens, max_tokens)
        for (name, heads, kv, d, half, prompt_len, max_tokens) in [("GQA", 4, 2, 64, true, 2990, 4096), ("MHA", 2, 2, 128, false, 2990, 4096), ("GQA, short sequence", 4, 2, 64, true, 90, 101)] {
            let theta: f32 = 10_000.0;
            let inv_freq: Vec<f32> = (0..d / 2).map(|i| theta.powf(-2.0 * i as f32 / d as f32)).collect();
            let config = GpuConfig { n_layers: 3, hidden: 128, n_heads: heads, n_kv_heads: kv, head_dim: d, ffn: 256, vocab: 300, eps: 1e-5, inv_freq, half_split: half };
            let layout = CacheLayout { retrieval: vec![vec![true, false], vec![false, false], vec![false, true]], sink: 4, recent: 40, chunk: 48, max_tokens };
            let w = Arc::new(GpuWeights::random(gpu, config.clone(), seed)?);
            // 3000 tokens: windows of 40 + slack 2048 compact during prefill and decode; the
            // short sequence keeps the decode splits within buffers sized by max_tokens.
            let prompt: Vec<u32> = (0..prompt_len as u64).map(|i| (hash_uniform(seed, i).abs() * 299.0) as u32).collect();
            let mut seq = GpuSequence::new(gpu.clone(), w, layout.clone())?;
            seq.prefill(&prompt, |_| {})?;
            let mut got = seq.logits()?;
            let mut all = prompt.clone();
            let mut tokens_agree = true;
            for step in 0..10 {
                let next = seq.next_token()?;
                all.push(next);
                seq.decode_step(next)?;
                got.extend(seq.logits()?);
                let _ = step;
            }
            let want = reference_logits(&config, &layout, seed, &all, prompt.len() - 1)?;
            let top = want.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
            let err = want.iter().zip(&got).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0.0, f64::max) / top;
            for (wr, gr) in want.chunks(config.vocab).zip(got.chunks(config.vocab)) {
                let mut sorted: Vec<(usize, f32)> = wr.iter().copied().enumerate().collect();
                sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
                let g_best = gr.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0);
                if (sorted[0].1 - sorted[1].1) as f64 > 2e-2 * top && g_best != sorted[0].0 {
                    tokens_agree = false;
                }
            }
            let graph_steps = seq.graph_steps;
            out.push(Parity {
                case: format!("whole model {name} ({heads} heads / {kv} KV of {d}), {prompt_len}-token chunked prefill + 10 decode steps ({graph_steps} from the graph, max_tokens {max_tokens}), greedy tokens agree: {tokens_agree}"),
                max_abs_err: if tokens_agree && graph_steps > 0 { err } else { f64::INFINITY },
                bound: 2e-2,
            });
        }
        Ok(out)
    }
}
