//! The Llama-family forward pass (Llama 1/2/3/3.1, Mistral, SmolLM, Qwen2).
//!
//! Anatomy, as in the checkpoint: token embedding; per block RMSNorm -> q/k/v
//! projections (+ bias for Qwen2) -> RoPE -> attention -> output projection -> residual,
//! RMSNorm -> SwiGLU feed-forward -> residual; final RMSNorm; LM head (tied to the
//! embedding when the checkpoint has no `output.weight`).
//!
//! The model owns no KV memory: attention goes through the [`SequenceKv`] the caller
//! passes in, which decides per KV head between a full and a streaming cache.

use crate::checkpoint::{names, Checkpoint, Weight};
use crate::error::{ModelError, Result};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use duo_core::config::{ModelConfig, RopeStyle};
use duo_kernels::ops::{rms_norm, swiglu, Rope};
use duo_kv::SequenceKv;
use std::sync::Arc;

/// Chunks of at most this many tokens run as a decode step: with the pool's workers
/// spinning for the whole pass instead of woken per parallel section.
const TEAM_TOKENS: usize = 4;

/// A projection: `y = x W^T (+ b)`.
struct Linear {
    weight: Weight, // [out, in]
    bias: Option<Vec<f32>>, // [out]
    out_dim: usize,
}

impl Linear {
    fn load(ck: &Checkpoint, layer: usize, part: &str, out_dim: usize, in_dim: usize, with_bias: bool) -> Result<Self> {
        let weight = ck.weight(&names::block(layer, part), &[out_dim, in_dim])?;
        let bias = if with_bias { Some(ck.f32(&names::block_bias(layer, part), &[out_dim])?) } else { None };
        Ok(Self { weight, bias, out_dim })
    }

    /// `x`: `[t, in]` -> `[t, out]`.
    fn forward(&self, x: &[f32], t: usize) -> Result<Vec<f32>> {
        let mut y = self.weight.forward(x, t)?;
        if let Some(b) = &self.bias {
            add_bias(&mut y, b);
        }
        Ok(y)
    }
}

/// One transformer block.
/// Projections of the same input: one product over their stacked rows where duo's kernel
/// runs them all (the input quantised once, one parallel section instead of one per part:
/// a decode step on many cores is mostly such sections), else one product each. Every
/// output row is computed alone either way, so the outputs are the same bits.
enum Stacked {
    /// The parts' rows in one matrix, with each part's rows and bias.
    One(duo_kernels::quant::QuantMatrix, Vec<(usize, Option<Vec<f32>>)>),
    /// Parts whose weights cannot stack (different types or a candle matmul).
    Each(Vec<Linear>),
}

impl Stacked {
    fn new(parts: Vec<Linear>) -> Self {
        if parts.len() < 2 || !parts.iter().all(|p| matches!(p.weight, Weight::Native(_))) {
            return Stacked::Each(parts);
        }
        let (mut mats, mut shapes) = (Vec::new(), Vec::new());
        for p in parts {
            if let Weight::Native(m) = p.weight {
                mats.push(m);
                shapes.push((p.out_dim, p.bias));
            }
        }
        match duo_kernels::quant::QuantMatrix::stack(mats) {
            Ok(m) => Stacked::One(m, shapes),
            // Back to one product each.
            Err(mats) => Stacked::Each(mats.into_iter().zip(shapes).map(|(m, (out_dim, bias))| Linear { weight: Weight::Native(m), bias, out_dim }).collect()),
        }
    }

    /// `x`: `[t, in]` -> each part's `[t, out_i]`.
    fn forward(&self, x: &[f32], t: usize) -> Result<Vec<Vec<f32>>> {
        match self {
            Stacked::Each(parts) => parts.iter().map(|p| p.forward(x, t)).collect(),
            Stacked::One(m, shapes) => {
                let dims: Vec<usize> = shapes.iter().map(|s| s.0).collect();
                let mut parts = m.matmul_parts(x, t, &dims);
                for (part, (_, bias)) in parts.iter_mut().zip(shapes) {
                    if let Some(b) = bias {
                        add_bias(part, b);
                    }
                }
                Ok(parts)
            }
        }
    }
}

/// Adds `bias` to every row of `y` (rows of `bias.len()`).
fn add_bias(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

struct Block {
    attn_norm: Vec<f32>, // [hidden]
    qkv: Stacked,        // q [n_heads * head_dim], k and v [n_kv_heads * head_dim] of [hidden]
    o: Linear,           // [hidden, n_heads * head_dim]
    ffn_norm: Vec<f32>,  // [hidden]
    gate_up: Stacked,    // gate and up, [ffn] of [hidden] each
    down: Linear,        // [hidden, ffn]
}

/// Whether every product of the model is duo's own quantised kernel.
fn all_native(blocks: &[Block], lm_head: &Weight) -> bool {
    let native = |w: &Weight| matches!(w, Weight::Native(_));
    let stacked = |s: &Stacked| match s {
        Stacked::One(..) => true,
        Stacked::Each(parts) => parts.iter().all(|p| native(&p.weight)),
    };
    native(lm_head) && blocks.iter().all(|b| stacked(&b.qkv) && native(&b.o.weight) && stacked(&b.gate_up) && native(&b.down.weight))
}

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position's: `[vocab]`.
    Last,
    /// Every position's: `[t, vocab]`.
    All,
    /// None (a prefill chunk that is not the last).
    None,
}

/// A loaded model.
pub struct Model {
    config: ModelConfig,
    embed: Arc<QTensor>, // [vocab, hidden]
    blocks: Vec<Block>,
    norm: Vec<f32>,  // [hidden]
    lm_head: Weight, // [vocab, hidden]
    rope: Rope,
    /// Whether decode passes run as a spinning team (`duo_kernels::par`): only when every
    /// product is duo's own kernel. Candle's products (other GGUF types, float weights)
    /// split their work over candle's or rayon's threads, which spinning helpers would
    /// starve.
    decode_team: bool,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("config", &self.config).finish()
    }
}

impl Model {
    /// Loads every weight the configuration calls for, checking each shape.
    pub fn load(ck: &Checkpoint, config: ModelConfig) -> Result<Self> {
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let bias = c.architecture == duo_core::Architecture::Qwen2;
        let embed = ck.matrix(names::EMBED, &[c.vocab_size, h])?;
        let lm_head = ck.weight(if c.tie_embeddings { names::EMBED } else { names::LM_HEAD }, &[c.vocab_size, h])?;
        let mut blocks = Vec::new(); // not with_capacity: n_layers comes from the file
        for l in 0..c.n_layers {
            blocks.push(Block {
                attn_norm: ck.f32(&names::block(l, names::ATTN_NORM), &[h])?,
                qkv: Stacked::new(vec![
                    Linear::load(ck, l, names::Q, c.n_heads * hd, h, bias)?,
                    Linear::load(ck, l, names::K, c.n_kv_heads * hd, h, bias)?,
                    Linear::load(ck, l, names::V, c.n_kv_heads * hd, h, bias)?,
                ]),
                o: Linear::load(ck, l, names::O, h, c.n_heads * hd, false)?,
                ffn_norm: ck.f32(&names::block(l, names::FFN_NORM), &[h])?,
                gate_up: Stacked::new(vec![
                    Linear::load(ck, l, names::GATE, c.intermediate_size, h, false)?,
                    Linear::load(ck, l, names::UP, c.intermediate_size, h, false)?,
                ]),
                down: Linear::load(ck, l, names::DOWN, h, c.intermediate_size, false)?,
            });
        }
        let norm = ck.f32(names::OUTPUT_NORM, &[h])?;
        let rope = Rope::new(hd, c.rope_theta, c.rope_style == RopeStyle::HalfSplit, c.rope_freq_factors.as_deref());
        let decode_team = all_native(&blocks, &lm_head);
        Ok(Self { config, embed, blocks, norm, lm_head, rope, decode_team })
    }

    /// A model of `config`'s shape with seeded random weights and unit norms: the values of
    /// the one generator (`duo_core::random_weights`, the GPU's and `duo random-checkpoint`'s),
    /// rounded to bf16 and stored as Q4_1 (the default model's type, so the CPU kernels run as
    /// on real checkpoints). For speed and memory measurements only.
    pub fn random(config: ModelConfig, seed: u64) -> Result<Self> {
        use duo_core::random_weights::{Projection, RandomTensor};
        use duo_kernels::quant::{QuantKind, QuantMatrix};
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        // Rows `rows` of a generated tensor, quantised to Q4_1 bytes 1,024 rows at a time (Q4_1
        // blocks lie within rows, so the bytes are those of the whole matrix, without it ever
        // existing in f32).
        let q4_1 = |t: RandomTensor, rows: std::ops::Range<usize>| -> Result<(usize, usize, Vec<u8>)> {
            let cols = t.shape(c).1;
            let n = rows.len();
            let mut bytes = Vec::new();
            for start in rows.clone().step_by(1024) {
                let part = start..(start + 1024).min(rows.end);
                let len = part.len();
                let values: Vec<f32> = t.rows(c, seed, part).into_iter().map(|v| half::bf16::from_f32(v).to_f32()).collect();
                let q = QTensor::quantize(&Tensor::from_vec(values, (len, cols), &Device::Cpu)?, candle_core::quantized::GgmlDType::Q4_1)?;
                bytes.extend_from_slice(&q.data()?);
            }
            Ok((n, cols, bytes))
        };
        let linear = |(t, rows): (RandomTensor, std::ops::Range<usize>)| -> Result<Linear> {
            let (n, cols, bytes) = q4_1(t, rows)?;
            let m = QuantMatrix::new(QuantKind::Q4_1, n, cols, bytes).map_err(ModelError::Input)?;
            Ok(Linear { weight: Weight::Native(m), bias: None, out_dim: n })
        };
        let mut blocks = Vec::new();
        for l in 0..c.n_layers {
            let part = |p: Projection| linear(p.source(l, c));
            blocks.push(Block {
                attn_norm: vec![1.0; h],
                qkv: Stacked::new(vec![part(Projection::Q)?, part(Projection::K)?, part(Projection::V)?]),
                o: part(Projection::O)?,
                ffn_norm: vec![1.0; h],
                gate_up: Stacked::new(vec![part(Projection::Gate)?, part(Projection::Up)?]),
                down: part(Projection::Down)?,
            });
        }
        let lm_head = linear((RandomTensor::LmHead, 0..c.vocab_size))?.weight;
        let (_, _, embed_bytes) = q4_1(RandomTensor::Embed, 0..c.vocab_size)?;
        let embed = Arc::new(candle_core::quantized::ggml_file::qtensor_from_ggml(
            candle_core::quantized::GgmlDType::Q4_1,
            &embed_bytes,
            vec![c.vocab_size, h],
            &Device::Cpu,
        )?);
        let rope = Rope::new(hd, c.rope_theta, c.rope_style == RopeStyle::HalfSplit, c.rope_freq_factors.as_deref());
        let mut config = config;
        config.tie_embeddings = false;
        let decode_team = all_native(&blocks, &lm_head);
        Ok(Self { norm: vec![1.0; h], config, embed, blocks, lm_head, rope, decode_team })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Runs one chunk of `tokens` at positions `kv.tokens()..` through the model,
    /// appending to `kv`, and returns the requested logits.
    pub fn forward(&self, tokens: &[u32], kv: &mut SequenceKv, logits: Logits) -> Result<Vec<f32>> {
        let mut pass = || {
            let hidden = self.hidden_states(tokens, kv)?;
            self.logits(&hidden, tokens.len(), logits)
        };
        // A prefill chunk's sections are large enough for rayon's fork-joins.
        if tokens.len() <= TEAM_TOKENS {
            self.decode_pass(pass)
        } else {
            pass()
        }
    }

    /// Runs a decode pass: as a spinning team (`duo_kernels::par`: a decode step's sections
    /// are small) where every product is duo's own kernel, else as it is.
    fn decode_pass<R>(&self, pass: impl FnOnce() -> R) -> R {
        if self.decode_team {
            duo_kernels::par::with_team(pass)
        } else {
            pass()
        }
    }

    /// Like [`Model::forward`] but returns the final-norm hidden states `[t, hidden]`.
    pub fn hidden_states(&self, tokens: &[u32], kv: &mut SequenceKv) -> Result<Vec<f32>> {
        self.run_segments(tokens, &mut [kv])
    }

    /// One decode step for several sequences at once: `tokens[i]` goes to `kvs[i]` at
    /// that sequence's own position. The projections and the feed-forward run as one
    /// matrix product over all rows, so the weights are read once per step for the whole
    /// batch; attention runs per sequence over its own cache. Returns the logits
    /// `[n, vocab]`; row `i` is exactly what `forward(&[tokens[i]], kvs[i], Logits::Last)`
    /// gives alone (every kernel treats rows independently).
    pub fn decode_batch(&self, tokens: &[u32], kvs: &mut [&mut SequenceKv]) -> Result<Vec<f32>> {
        if tokens.len() != kvs.len() {
            return Err(ModelError::Input(format!("{} tokens for {} sequences", tokens.len(), kvs.len())));
        }
        self.decode_pass(|| {
            let hidden = self.run_segments(tokens, kvs)?;
            self.logits(&hidden, tokens.len(), Logits::All)
        })
    }

    /// The blocks over consecutive segments of `tokens`: segment `i` has one token per
    /// sequence when `seqs.len() == tokens.len()`, or all tokens when there is one sequence.
    fn run_segments(&self, tokens: &[u32], seqs: &mut [&mut SequenceKv]) -> Result<Vec<f32>> {
        let c = &self.config;
        let t = tokens.len();
        if t == 0 || seqs.is_empty() {
            return Err(ModelError::Input("empty chunk".into()));
        }
        if let Some(bad) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(ModelError::Input(format!("token id {bad} is outside the vocabulary of {}", c.vocab_size)));
        }
        // Rows `ranges[i]` belong to `seqs[i]`, starting at position `starts[i]`.
        let per = if seqs.len() == 1 { t } else { 1 };
        let ranges: Vec<std::ops::Range<usize>> = (0..seqs.len()).map(|i| i * per..(i + 1) * per).collect();
        let starts: Vec<usize> = seqs.iter().map(|kv| kv.tokens()).collect();
        for (start, r) in starts.iter().zip(&ranges) {
            if start + r.len() > c.context_length {
                return Err(ModelError::Input(format!(
                    "{} tokens exceed the model's context length of {}",
                    start + r.len(),
                    c.context_length
                )));
            }
        }
        let (qd, kd) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let ids = Tensor::from_slice(tokens, (t,), &Device::Cpu)?;
        let mut x = self.embed.embedding(&ids)?.flatten_all()?.to_vec1::<f32>()?; // [t, hidden]
        for (l, b) in self.blocks.iter().enumerate() {
            let mut hn = x.clone();
            rms_norm(&mut hn, &b.attn_norm, c.rms_norm_eps);
            // [t, n_heads * hd], [t, n_kv * hd], [t, n_kv * hd]
            let [mut q, mut k, v]: [Vec<f32>; 3] = b.qkv.forward(&hn, t)?.try_into().map_err(|_| ModelError::Input("q, k and v: three projections".into()))?;
            let mut attn = Vec::with_capacity(t * qd); // [t, n_heads * hd]
            for ((kv, r), &start) in seqs.iter_mut().zip(&ranges).zip(&starts) {
                let (qs, ks) = (&mut q[r.start * qd..r.end * qd], &mut k[r.start * kd..r.end * kd]);
                self.rope.apply(qs, c.n_heads, start);
                self.rope.apply(ks, c.n_kv_heads, start);
                let mode = kv.mode();
                attn.extend(kv.layer_mut(l).attend(qs, ks, &v[r.start * kd..r.end * kd], start, c.n_heads, mode));
            }
            let o = b.o.forward(&attn, t)?;
            for (xi, oi) in x.iter_mut().zip(&o) {
                *xi += oi;
            }
            let mut hn = x.clone();
            rms_norm(&mut hn, &b.ffn_norm, c.rms_norm_eps);
            let [mut g, u]: [Vec<f32>; 2] = b.gate_up.forward(&hn, t)?.try_into().map_err(|_| ModelError::Input("gate and up: two projections".into()))?;
            swiglu(&mut g, &u);
            let d = b.down.forward(&g, t)?;
            for (xi, di) in x.iter_mut().zip(&d) {
                *xi += di;
            }
        }
        for (kv, r) in seqs.iter_mut().zip(&ranges) {
            kv.advance(r.len());
        }
        rms_norm(&mut x, &self.norm, c.rms_norm_eps);
        Ok(x)
    }

    /// LM head over final-norm hidden states.
    pub fn logits(&self, hidden: &[f32], t: usize, which: Logits) -> Result<Vec<f32>> {
        let h = self.config.hidden_size;
        let rows = match which {
            Logits::None => return Ok(Vec::new()),
            Logits::Last => &hidden[(t - 1) * h..],
            Logits::All => hidden,
        };
        self.lm_head.forward(rows, rows.len() / h)
    }
}
