//! The model as differentiable candle tensors, for identification.
//!
//! Identification needs gradients through every layer, so it cannot use the inference
//! engine's quantised kernels: weights are dequantised to `f32` once, and each layer is
//! written with candle primitives that all have a backward pass (candle's fused
//! `rms_norm`, `softmax_last_dim` and `rope` kernels silently drop gradients, so RMSNorm,
//! softmax and RoPE are spelled out here). The passes no gradient flows through (the
//! teacher's, and the student's first pass that only keeps each layer's input) take the
//! fused RMSNorm and softmax instead: the choice is made per call from whether the input
//! tracks a gradient, so a pass cannot silently lose one.
//!
//! Attention runs over query blocks against only the keys a block can see, so a
//! Λ-shaped (sink + recent) attention costs time and memory linear in the length, and
//! full attention never materialises more than one block of scores.

use crate::{IdentifyError, Result};
use candle_core::{Device, Tensor, D};
use duo_core::config::{ModelConfig, RopeStyle};
use duo_kernels::ops::Rope;
use duo_model::checkpoint::names;
use duo_model::Checkpoint;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cell::RefCell;
use std::collections::HashMap;

/// Which keys a query sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Span {
    /// Every earlier key and itself.
    Causal,
    /// The first `sink` keys and the last `recent` (itself included), causally.
    Lambda {
        /// Attention-sink tokens.
        sink: usize,
        /// Recent window, the query itself included.
        recent: usize,
    },
}

impl Span {
    /// Whether query position `i` sees key position `j`.
    pub fn sees(self, i: usize, j: usize) -> bool {
        match self {
            Span::Causal => j <= i,
            Span::Lambda { sink, recent } => duo_core::cache_spec::lambda_sees(sink, recent, i, j),
        }
    }
}

/// One transformer block's weights, `[out, in]` as in the checkpoint.
#[derive(Debug)]
struct DenseLayer {
    attn_norm: Tensor,
    qkv: Tensor,              // [(n_heads + 2 n_kv) hd, hidden]
    qkv_bias: Option<Tensor>, // [(n_heads + 2 n_kv) hd]
    o: Tensor,                // [hidden, n_heads hd]
    ffn_norm: Tensor,
    gate_up: Tensor, // [2 ffn, hidden]
    down: Tensor,    // [hidden, ffn]
}

/// A Llama-family model with `f32` weights on a candle device.
#[derive(Debug)]
pub struct DenseModel {
    config: ModelConfig,
    device: Device,
    embed: Tensor, // [vocab, hidden]
    layers: Vec<DenseLayer>,
    norm: Tensor,
    rope: Rope,
    /// A fixed attention query block instead of [`DenseModel::block`]'s choice.
    block_override: Option<usize>,
    /// RoPE's cosines and sines for positions 0..n on the device, `[n, 1, hd/2]` each:
    /// built on the host once for the longest sequence seen, not for every layer and pass
    /// (90 tables of 8K positions cost 0.25 s of host time per step).
    rope_cache: RefCell<Option<(Tensor, Tensor)>>,
}

/// A layer's query, key and value, split by KV group.
pub struct Qkv {
    /// `[n_kv, group, t, hd]` after RoPE.
    pub q: Tensor,
    /// `[n_kv, t, hd]` after RoPE.
    pub k: Tensor,
    /// `[n_kv, t, hd]`.
    pub v: Tensor,
}

impl DenseModel {
    /// Dequantises a checkpoint onto `device`.
    pub fn load(ck: &Checkpoint, device: &Device) -> Result<Self> {
        let c = ck.config()?;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let mat = |name: &str, shape: &[usize]| -> Result<Tensor> { Ok(ck.matrix(name, shape)?.dequantize(device)?) };
        let vec = |name: &str, n: usize| -> Result<Tensor> { Ok(Tensor::from_vec(ck.f32(name, &[n])?, (n,), device)?) };
        let bias = c.architecture == duo_core::Architecture::Qwen2;
        let mut layers = Vec::new();
        for l in 0..c.n_layers {
            let w = |part: &str| names::block(l, part);
            let b = |part: &str| names::block_bias(l, part);
            let qkv = Tensor::cat(&[mat(&w(names::Q), &[c.n_heads * hd, h])?, mat(&w(names::K), &[c.n_kv_heads * hd, h])?, mat(&w(names::V), &[c.n_kv_heads * hd, h])?], 0)?;
            let qkv_bias = if bias {
                Some(Tensor::cat(&[vec(&b(names::Q), c.n_heads * hd)?, vec(&b(names::K), c.n_kv_heads * hd)?, vec(&b(names::V), c.n_kv_heads * hd)?], 0)?)
            } else {
                None
            };
            let gate_up = Tensor::cat(&[mat(&w(names::GATE), &[c.intermediate_size, h])?, mat(&w(names::UP), &[c.intermediate_size, h])?], 0)?;
            layers.push(DenseLayer {
                attn_norm: vec(&w(names::ATTN_NORM), h)?,
                qkv,
                qkv_bias,
                o: mat(&w(names::O), &[h, c.n_heads * hd])?,
                ffn_norm: vec(&w(names::FFN_NORM), h)?,
                gate_up,
                down: mat(&w(names::DOWN), &[h, c.intermediate_size])?,
            });
        }
        let embed = mat(names::EMBED, &[c.vocab_size, h])?;
        let norm = vec(names::OUTPUT_NORM, h)?;
        Ok(Self::assemble(c, device.clone(), embed, layers, norm))
    }

    /// A model of the given shape with seeded random weights (normal with std
    /// `1/sqrt(fan_in)` for matrices, unit-variance embeddings, norms near 1): for tests and for speed measurements at real shapes.
    pub fn random(config: ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut mat = |rows: usize, cols: usize, std: f32| -> Result<Tensor> {
            let std = if std == 0.0 { 1.0 / (cols as f32).sqrt() } else { std };
            let data: Vec<f32> = (0..rows * cols).map(|_| normal(&mut rng) * std).collect();
            Ok(Tensor::from_vec(data, (rows, cols), device)?)
        };
        let mut layers = Vec::new();
        for _ in 0..c.n_layers {
            let qkv = mat((c.n_heads + 2 * c.n_kv_heads) * hd, h, 0.0)?;
            let o = mat(h, c.n_heads * hd, 0.0)?;
            let gate_up = mat(2 * c.intermediate_size, h, 0.0)?;
            let down = mat(h, c.intermediate_size, 0.0)?;
            let attn_norm = (mat(1, h, 0.1)?.reshape(h)? + 1.0)?;
            let ffn_norm = (mat(1, h, 0.1)?.reshape(h)? + 1.0)?;
            layers.push(DenseLayer { attn_norm, qkv, qkv_bias: None, o, ffn_norm, gate_up, down });
        }
        let embed = mat(c.vocab_size, h, 1.0)?;
        let norm = (mat(1, h, 0.1)?.reshape(h)? + 1.0)?;
        Ok(Self::assemble(config, device.clone(), embed, layers, norm))
    }

    fn assemble(config: ModelConfig, device: Device, embed: Tensor, layers: Vec<DenseLayer>, norm: Tensor) -> Self {
        let rope = Rope::new(
            config.head_dim,
            config.rope_theta,
            config.rope_style == RopeStyle::HalfSplit,
            config.rope_freq_factors.as_deref(),
        );
        Self { config, device, embed, layers, norm, rope, block_override: None, rope_cache: RefCell::new(None) }
    }

    /// Every attention pass with query blocks of `block` (at least 1) instead of the
    /// device's default: to measure what the block size costs.
    pub fn with_block(mut self, block: Option<usize>) -> Self {
        self.block_override = block.map(|b| b.max(1));
        self
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Token embeddings `[t, hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            return Err(IdentifyError::Invalid(format!("token id {bad} is outside the vocabulary")));
        }
        let ids = Tensor::from_slice(ids, (ids.len(),), &self.device)?;
        Ok(self.embed.index_select(&ids, 0)?)
    }

    /// The final RMSNorm, always from differentiable primitives: the teacher's target and
    /// the student's output (which carries a gradient) must round alike, so that a student
    /// equal to the teacher has a loss of exactly 0.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm_primitives(x, &self.norm, self.config.rms_norm_eps)
    }

    /// RMSNorm, q/k/v projections and RoPE of layer `l` for `x` (`[t, hidden]`, positions 0..t).
    pub fn qkv(&self, l: usize, x: &Tensor) -> Result<Qkv> {
        let c = &self.config;
        let layer = &self.layers[l];
        let t = x.dim(0)?;
        let (hd, nq, nkv) = (c.head_dim, c.n_heads, c.n_kv_heads);
        let hn = rms_norm(x, &layer.attn_norm, c.rms_norm_eps)?;
        let mut qkv = hn.matmul(&layer.qkv.t()?)?;
        if let Some(b) = &layer.qkv_bias {
            qkv = qkv.broadcast_add(b)?;
        }
        let (cos, sin) = self.rope_tables(t)?;
        let q = qkv.narrow(1, 0, nq * hd)?.reshape((t, nq, hd))?;
        let k = qkv.narrow(1, nq * hd, nkv * hd)?.reshape((t, nkv, hd))?;
        let v = qkv.narrow(1, (nq + nkv) * hd, nkv * hd)?.reshape((t, nkv, hd))?;
        let q = self.apply_rope(&q, &cos, &sin)?; // [t, nq, hd]
        let k = self.apply_rope(&k, &cos, &sin)?;
        let group = nq / nkv;
        let q = q.reshape((t, nkv, group, hd))?.permute((1, 2, 0, 3))?.contiguous()?;
        let k = k.transpose(0, 1)?.contiguous()?;
        let v = v.transpose(0, 1)?.contiguous()?;
        Ok(Qkv { q, k, v })
    }

    /// The rest of layer `l` after attention: output projection, residual, feed-forward,
    /// residual. `attn`: `[n_kv, group, t, hd]`; `x`: the layer input `[t, hidden]`.
    pub fn finish_layer(&self, l: usize, x: &Tensor, attn: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let layer = &self.layers[l];
        let t = x.dim(0)?;
        let attn = attn.permute((2, 0, 1, 3))?.reshape((t, c.n_heads * c.head_dim))?;
        let x = (x + attn.matmul(&layer.o.t()?)?)?;
        let hn = rms_norm(&x, &layer.ffn_norm, c.rms_norm_eps)?;
        let gu = hn.matmul(&layer.gate_up.t()?)?;
        let ffn = c.intermediate_size;
        let act = (gu.narrow(1, 0, ffn)?.silu()? * gu.narrow(1, ffn, ffn)?)?;
        Ok((&x + act.matmul(&layer.down.t()?)?)?)
    }

    /// A whole full-attention layer (the unmodified model).
    pub fn layer(&self, l: usize, x: &Tensor) -> Result<Tensor> {
        let qkv = self.qkv(l, x)?;
        let attn = attention(&qkv, Span::Causal, self.block(x.dim(0)?))?;
        self.finish_layer(l, x, &attn)
    }

    /// Final-norm hidden states of the unmodified model, `[t, hidden]`.
    pub fn hidden_states(&self, ids: &[u32]) -> Result<Tensor> {
        let mut x = self.embed(ids)?;
        for l in 0..self.config.n_layers {
            x = self.layer(l, &x)?;
        }
        self.final_norm(&x)
    }

    /// Query block size of attention over a sequence of `t` tokens: 256 on the CPU (one
    /// block of scores stays in cache), 512 on a GPU while one block's scores (every
    /// query head, `block x t` in `f32`) stay within 1 GiB. A block's queries all take
    /// the keys any of them sees, so a Λ block of `b` queries reads `sink + recent + b`
    /// keys where each query needs `sink + recent`: larger blocks launch fewer kernels
    /// but waste more. Measured on an H200 (SmolLM2, recent 1,024; EVALUATION.md), a
    /// step at 8K tokens takes 2.81 s with 512, 2.89 s with 256 and 3.76 s with 2,048.
    pub fn block(&self, t: usize) -> usize {
        self.block_override.unwrap_or_else(|| query_block(self.config.n_heads, t, self.device.is_cuda()))
    }

    fn rope_tables(&self, t: usize) -> Result<(Tensor, Tensor)> {
        let mut cache = self.rope_cache.borrow_mut();
        if cache.as_ref().is_none_or(|(cos, _)| cos.dim(0).is_ok_and(|n| n < t)) {
            *cache = Some(self.build_rope_tables(t)?);
        }
        let (cos, sin) = cache.as_ref().expect("filled above");
        Ok((cos.narrow(0, 0, t)?, sin.narrow(0, 0, t)?))
    }

    fn build_rope_tables(&self, t: usize) -> Result<(Tensor, Tensor)> {
        let inv = self.rope.inv_freq();
        let half = inv.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in 0..t {
            for f in inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, 1, half), &self.device)?,
            Tensor::from_vec(sin, (t, 1, half), &self.device)?,
        ))
    }

    /// RoPE on `[t, heads, hd]` with `[t, 1, hd/2]` tables, in the checkpoint's pair layout.
    fn apply_rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (t, heads, hd) = x.dims3()?;
        let half = hd / 2;
        if self.rope.is_half_split() {
            let a = x.narrow(2, 0, half)?;
            let b = x.narrow(2, half, half)?;
            let ra = (a.broadcast_mul(cos)? - b.broadcast_mul(sin)?)?;
            let rb = (a.broadcast_mul(sin)? + b.broadcast_mul(cos)?)?;
            Ok(Tensor::cat(&[ra, rb], 2)?)
        } else {
            let pairs = x.reshape((t, heads, half, 2))?;
            let a = pairs.narrow(3, 0, 1)?.squeeze(3)?;
            let b = pairs.narrow(3, 1, 1)?.squeeze(3)?;
            let ra = (a.broadcast_mul(cos)? - b.broadcast_mul(sin)?)?;
            let rb = (a.broadcast_mul(sin)? + b.broadcast_mul(cos)?)?;
            Ok(Tensor::stack(&[ra, rb], 3)?.reshape((t, heads, hd))?)
        }
    }
}

/// [`DenseModel::block`]'s choice for `n_heads` query heads over `t` tokens.
pub fn query_block(n_heads: usize, t: usize, gpu: bool) -> usize {
    const CPU_BLOCK: usize = 256;
    if !gpu {
        return CPU_BLOCK;
    }
    let per_query = n_heads.max(1) * t.max(1) * std::mem::size_of::<f32>();
    let fits = (1usize << 30) / per_query;
    (fits / CPU_BLOCK * CPU_BLOCK).clamp(CPU_BLOCK, 2 * CPU_BLOCK)
}

/// RMSNorm, `x / sqrt(mean(x^2) + eps) * w`: from differentiable primitives where a
/// gradient can flow through `x` or `w`, else candle's fused kernel (the teacher's and the
/// no-gradient student passes: one kernel instead of five).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    if !x.track_op() && !w.track_op() {
        return Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)?);
    }
    rms_norm_primitives(x, w, eps)
}

fn rms_norm_primitives(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let ms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?;
    Ok(x.broadcast_div(&ms.sqrt()?)?.broadcast_mul(w)?)
}

/// Softmax over the last dimension: differentiable primitives where a gradient can flow,
/// else candle's fused kernel (one pass over the scores instead of five).
pub fn softmax_last_dim(scores: &Tensor) -> Result<Tensor> {
    if !scores.track_op() {
        return Ok(candle_nn::ops::softmax_last_dim(&scores.contiguous()?)?);
    }
    let max = scores.max_keepdim(D::Minus1)?.detach();
    let p = scores.broadcast_sub(&max)?.exp()?;
    Ok(p.broadcast_div(&p.sum_keepdim(D::Minus1)?)?)
}

/// The additive masks of attention blocks, keyed by (block start, block end, span).
/// A mask depends only on its key, so one sequence's passes over all layers share them:
/// built once (on the device, [`span_mask`]) instead of once per layer and pass.
#[derive(Debug, Default)]
pub struct MaskCache {
    masks: RefCell<HashMap<(usize, usize, Span), Tensor>>,
}

impl MaskCache {
    fn get(&self, s: usize, e: usize, span: Span, keys: &[usize], device: &Device) -> Result<Tensor> {
        if let Some(m) = self.masks.borrow().get(&(s, e, span)) {
            return Ok(m.clone());
        }
        let mask = span_mask(s, e, span, keys, device)?;
        self.masks.borrow_mut().insert((s, e, span), mask.clone());
        Ok(mask)
    }
}

/// The additive mask of queries `s..e` over `keys`: 0 where [`Span::sees`], -1e30 elsewhere,
/// `[e - s, keys]`. Built on the device from the positions (exact as `f32` below 2^24):
/// an 8K sample's blocks were 50 million host-built values a step, uploaded.
pub(crate) fn span_mask(s: usize, e: usize, span: Span, keys: &[usize], device: &Device) -> Result<Tensor> {
    let (b, k) = (e - s, keys.len());
    let i = Tensor::arange(s as u32, e as u32, device)?.to_dtype(candle_core::DType::F32)?.reshape((b, 1))?;
    let j = Tensor::from_vec(keys.iter().map(|&j| j as f32).collect::<Vec<f32>>(), (1, k), device)?;
    let causal = j.broadcast_le(&i)?; // u8, [b, k]
    let seen = match span {
        Span::Causal => causal,
        Span::Lambda { sink, recent } => {
            let in_sink = j.lt(sink as f64)?.broadcast_as((b, k))?;
            let near = i.broadcast_sub(&j)?.lt(recent as f64)?;
            causal.minimum(&in_sink.maximum(&near)?)?
        }
    };
    let open = Tensor::zeros((b, k), candle_core::DType::F32, device)?;
    let shut = Tensor::full(-1e30f32, (b, k), device)?;
    Ok(seen.where_cond(&open, &shut)?)
}

/// Attention of every query over the keys `span` lets it see, processed in query
/// blocks of `block`: `[n_kv, group, t, hd]`.
pub fn attention(qkv: &Qkv, span: Span, block: usize) -> Result<Tensor> {
    attention_with(qkv, span, block, &MaskCache::default())
}

/// [`attention`] with masks taken from (and added to) `masks`.
pub fn attention_with(qkv: &Qkv, span: Span, block: usize, masks: &MaskCache) -> Result<Tensor> {
    let (nkv, group, t, hd) = qkv.q.dims4()?;
    let device = qkv.q.device();
    let scale = 1.0 / (hd as f64).sqrt();
    let mut outs = Vec::with_capacity(t.div_ceil(block));
    for s in (0..t).step_by(block) {
        let e = (s + block).min(t);
        let b = e - s;
        // Keys the block can see: [0, e) for causal; sinks plus a window for Λ.
        let ranges: Vec<(usize, usize)> = match span {
            Span::Causal => vec![(0, e)],
            Span::Lambda { sink, recent } => {
                let sink_end = sink.min(e);
                let window = (s + 1).saturating_sub(recent).max(sink_end);
                if window >= e { vec![(0, sink_end)] } else if window <= sink_end { vec![(0, e)] } else { vec![(0, sink_end), (window, e)] }
            }
        };
        let keys: Vec<usize> = ranges.iter().flat_map(|&(a, z)| a..z).collect();
        let pick = |x: &Tensor| -> Result<Tensor> {
            let parts: Vec<Tensor> = ranges.iter().map(|&(a, z)| x.narrow(1, a, z - a)).collect::<candle_core::Result<_>>()?;
            Ok(if parts.len() == 1 { parts[0].clone() } else { Tensor::cat(&parts, 1)? })
        };
        let (kb, vb) = (pick(&qkv.k)?, pick(&qkv.v)?);
        let mask = masks.get(s, e, span, &keys, device)?;
        let qb = qkv.q.narrow(2, s, b)?.contiguous()?.reshape((nkv, group * b, hd))?;
        let scores = (qb.matmul(&kb.t()?)? * scale)?.reshape((nkv, group, b, keys.len()))?.broadcast_add(&mask)?;
        let p = softmax_last_dim(&scores)?;
        let o = p.reshape((nkv, group * b, keys.len()))?.matmul(&vb)?.reshape((nkv, group, b, hd))?;
        outs.push(o);
    }
    Ok(if outs.len() == 1 { outs.remove(0) } else { Tensor::cat(&outs, 2)? })
}

/// Standard normal by Box–Muller (the `rand_distr` crate is not worth a dependency here).
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
    let u2: f32 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}


#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn random(shape: (usize, usize, usize), seed: u64) -> Tensor {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = shape.0 * shape.1 * shape.2;
        let data: Vec<f32> = (0..n).map(|_| normal(&mut rng) * 3.0).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()).expect("diff")
    }

    #[test]
    fn device_built_masks_are_the_spans_definition() {
        for span in [Span::Causal, Span::Lambda { sink: 3, recent: 5 }, Span::Lambda { sink: 0, recent: 1 }, Span::Lambda { sink: 40, recent: 2 }] {
            for (s, e) in [(0usize, 7usize), (10, 19), (30, 64)] {
                let keys: Vec<usize> = match span {
                    Span::Causal => (0..e).collect(),
                    _ => (0..3.min(e)).chain(s.saturating_sub(6).max(3)..e).collect(),
                };
                let got = span_mask(s, e, span, &keys, &Device::Cpu).and_then(|m| Ok(m.flatten_all()?.to_vec1::<f32>()?)).expect("mask");
                let want: Vec<f32> = (s..e).flat_map(|i| keys.iter().map(move |&j| if span.sees(i, j) { 0.0 } else { -1e30 })).collect();
                assert_eq!(got, want, "{span:?} {s}..{e}");
            }
        }
    }

    #[test]
    fn fused_kernels_of_the_no_gradient_passes_match_the_differentiable_ones() {
        let x = random((3, 17, 40), 1);
        let w = random((1, 1, 40), 2).reshape(40).and_then(|w| (w * 0.1)? + 1.0).expect("w");
        let tracked = Var::from_tensor(&x).expect("var");
        assert!(!x.track_op() && tracked.as_tensor().track_op());
        // Scores with masked (-1e30) entries, as attention makes them.
        let mask = Tensor::from_vec((0..40).map(|j| if j % 7 == 3 { -1e30f32 } else { 0.0 }).collect::<Vec<_>>(), 40, &Device::Cpu).expect("mask");
        let fused = softmax_last_dim(&x.broadcast_add(&mask).expect("add")).expect("fused");
        let plain = softmax_last_dim(&tracked.as_tensor().broadcast_add(&mask).expect("add")).expect("plain");
        assert!(max_diff(&fused, &plain) < 1e-6, "softmax: {}", max_diff(&fused, &plain));
        let sums = fused.sum(D::Minus1).expect("sum").flatten_all().expect("flat").to_vec1::<f32>().expect("vec");
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        let fused = rms_norm(&x, &w, 1e-5).expect("fused");
        let plain = rms_norm(tracked.as_tensor(), &w, 1e-5).expect("plain");
        assert!(max_diff(&fused, &plain) < 1e-5, "rms_norm: {}", max_diff(&fused, &plain));
    }
}
