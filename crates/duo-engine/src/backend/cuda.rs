//! The CUDA backend: duo's own kernels (`duo_cuda`) over bf16 weights and a bf16 hybrid cache
//! on one GPU. The driver, NVRTC and cuBLAS are loaded at run time, so every build has this
//! backend; on a machine without a driver, opening it is a clear error.
//!
//! Checkpoints go straight to the GPU: tensor by tensor, converted to bf16 on the host (a
//! safetensors bf16 matrix is copied as it is; other types are converted or dequantised one
//! tensor at a time) and uploaded block by block, so the host never holds the whole model.

use super::{downcast, kv_plan, plan_bytes, Backend, Logits, Sequence};
use crate::error::{EngineError, Result};
use crate::method::ResolvedMethod;
use duo_core::cache_spec::CachePlan;
use duo_core::config::ModelConfig;
use duo_cuda::dequant::QuantType;
use duo_cuda::model::{CacheLayout, GlobalMatrix, GpuConfig, GpuSequence, GpuWeights, HostLayer, HostMatrix};
use duo_cuda::Gpu;
use duo_kv::{KvBytes, PrefillMode};
use duo_model::checkpoint::names;
use duo_model::Checkpoint;
use std::any::Any;
use std::sync::Arc;

/// A model on one GPU.
pub struct CudaBackend {
    gpu: Arc<Gpu>,
    weights: Arc<GpuWeights>,
    config: ModelConfig,
    ordinal: usize,
}

/// The GPU's dequantisation of a GGUF type, where it has one.
pub fn gpu_type(ty: candle_core::quantized::GgmlDType) -> Option<QuantType> {
    use candle_core::quantized::GgmlDType as G;
    Some(match ty {
        G::F32 => QuantType::F32,
        G::F16 => QuantType::F16,
        G::BF16 => QuantType::Bf16,
        G::Q8_0 => QuantType::Q8_0,
        G::Q4_0 => QuantType::Q4_0,
        G::Q4_1 => QuantType::Q4_1,
        G::Q4K => QuantType::Q4K,
        G::Q6K => QuantType::Q6K,
        _ => return None,
    })
}

fn supported(config: &ModelConfig) -> Result<()> {
    if config.architecture != duo_core::Architecture::Llama {
        return Err(EngineError::Backend(format!("the CUDA backend runs the Llama architecture (no projection biases); this model is {:?}", config.architecture)));
    }
    Ok(())
}

impl CudaBackend {
    /// Loads a checkpoint onto `gpu` (device `ordinal`).
    pub fn load(gpu: Arc<Gpu>, ordinal: usize, ck: &Checkpoint, config: ModelConfig) -> Result<Self> {
        supported(&config)?;
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let cuda_err = |e: duo_model::ModelError| duo_cuda::CudaError::Input(e.to_string());
        // GGUF blocks of the types the GPU dequantises go up as they are; everything else is
        // converted to bf16 on the host, one tensor at a time.
        let get = |name: &str, rows: usize, cols: usize| -> duo_cuda::Result<HostMatrix<'_>> {
            if let Some((ty, bytes)) = ck.gguf_blocks(name, &[rows, cols]).map_err(cuda_err)? {
                if let Some(q) = gpu_type(ty) {
                    return Ok(HostMatrix::Blocks(q, bytes));
                }
            }
            ck.bf16(name, &[rows, cols]).map(HostMatrix::Bf16).map_err(cuda_err)
        };
        let matrix = |which: GlobalMatrix| -> duo_cuda::Result<Option<HostMatrix<'_>>> {
            match which {
                GlobalMatrix::Embed => get(names::EMBED, c.vocab_size, h).map(Some),
                GlobalMatrix::LmHead if c.tie_embeddings => Ok(None),
                GlobalMatrix::LmHead => get(names::LM_HEAD, c.vocab_size, h).map(Some),
            }
        };
        let layer = |l: usize| -> duo_cuda::Result<HostLayer<'_>> {
            let m = |part: &str, out: usize, inp: usize| get(&names::block(l, part), out, inp);
            let vec = |part: &str| ck.f32(&names::block(l, part), &[h]).map_err(cuda_err);
            Ok(HostLayer {
                attn_norm: vec(names::ATTN_NORM)?,
                qkv: vec![m(names::Q, c.n_heads * hd, h)?, m(names::K, c.n_kv_heads * hd, h)?, m(names::V, c.n_kv_heads * hd, h)?],
                o: vec![m(names::O, h, c.n_heads * hd)?],
                ffn_norm: vec(names::FFN_NORM)?,
                gate_up: vec![m(names::GATE, c.intermediate_size, h)?, m(names::UP, c.intermediate_size, h)?],
                down: vec![m(names::DOWN, h, c.intermediate_size)?],
            })
        };
        let weights = GpuWeights::load(&gpu, GpuConfig::from_model(c), ck.f32(names::OUTPUT_NORM, &[h])?, matrix, layer)?;
        Ok(Self { gpu, weights: Arc::new(weights), config, ordinal })
    }

    /// Seeded random bf16 weights of `config`'s shape, generated on the GPU.
    pub fn random(gpu: Arc<Gpu>, ordinal: usize, config: ModelConfig, seed: u64) -> Result<Self> {
        supported(&config)?;
        let weights = GpuWeights::random(&gpu, GpuConfig::from_model(&config), seed)?;
        Ok(Self { gpu, weights: Arc::new(weights), config, ordinal })
    }

    /// The cache layout of `method` for sequences of up to `max_tokens` tokens.
    pub fn layout(&self, method: &ResolvedMethod, max_tokens: usize) -> Result<CacheLayout> {
        if method.prefill != PrefillMode::Lambda {
            return Err(EngineError::InvalidParameter { name: "prefill", reason: "the CUDA backend prefills streaming heads with the Λ mask only (--prefill lambda)".into() });
        }
        Ok(CacheLayout {
            retrieval: (0..self.config.n_layers).map(|l| method.pattern.layer(l).to_vec()).collect(),
            sink: method.window.sink,
            recent: method.window.recent,
            chunk: method.chunk.min(max_tokens).max(1),
            max_tokens,
        })
    }
}

/// A GPU sequence and the plan its bytes are counted by.
struct CudaSequence {
    seq: GpuSequence,
    plan: CachePlan,
}

impl Sequence for CudaSequence {
    fn tokens(&self) -> usize {
        self.seq.tokens()
    }
    fn bytes(&self) -> KvBytes {
        plan_bytes(&self.plan, self.seq.tokens())
    }
    fn peak_bytes(&self) -> KvBytes {
        // Streaming heads hold their window at most, retrieval heads grow: bytes never shrink.
        self.bytes()
    }
    fn fork(&self) -> Result<Box<dyn Sequence>> {
        Ok(Box::new(CudaSequence { seq: self.seq.fork()?, plan: self.plan.clone() }))
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl CudaSequence {
    /// Runs `tokens`: one token after a cached prefix is a decode step (the CUDA graph), more
    /// are prefill chunks.
    fn run(&mut self, tokens: &[u32]) -> Result<()> {
        if tokens.len() == 1 && self.seq.tokens() > 0 {
            self.seq.decode_step(tokens[0])?;
        } else {
            self.seq.prefill(tokens, |_| {})?;
        }
        Ok(())
    }
}

impl Backend for CudaBackend {
    fn describe(&self) -> String {
        format!("{} (cuda:{})", self.gpu.name(), self.ordinal)
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn kv_element_bytes(&self) -> usize {
        2
    }

    fn new_sequence(&self, method: &ResolvedMethod, max_tokens: usize) -> Result<Box<dyn Sequence>> {
        // One row more than asked: a decode step reads its own token's row.
        let layout = self.layout(method, max_tokens + 1)?;
        let seq = GpuSequence::new(self.gpu.clone(), self.weights.clone(), layout)?;
        Ok(Box::new(CudaSequence { seq, plan: kv_plan(self, method) }))
    }

    fn forward(&self, seq: &mut dyn Sequence, tokens: &[u32], logits: Logits) -> Result<Vec<f32>> {
        let s = downcast::<CudaSequence>(seq, "CUDA")?;
        if tokens.is_empty() {
            return Err(EngineError::InvalidParameter { name: "tokens", reason: "an empty chunk".into() });
        }
        match logits {
            Logits::None => {
                s.run(tokens)?;
                Ok(Vec::new())
            }
            Logits::Last => {
                s.run(tokens)?;
                Ok(s.seq.logits()?)
            }
            Logits::All => {
                let chunk = s.seq.layout().chunk;
                let mut out = Vec::with_capacity(tokens.len() * self.config.vocab_size);
                for c in tokens.chunks(chunk) {
                    s.run(c)?;
                    out.extend(s.seq.last_rows_logits(c.len())?);
                }
                Ok(out)
            }
        }
    }

    fn greedy_step(&self, seq: &mut dyn Sequence, token: u32) -> Result<u32> {
        let s = downcast::<CudaSequence>(seq, "CUDA")?;
        s.run(&[token])?;
        Ok(s.seq.next_token()?)
    }

    fn available_memory(&self) -> Option<usize> {
        self.gpu.memory_used().ok().map(|(used, total)| total - used)
    }

    fn memory_in_use(&self) -> Option<usize> {
        self.gpu.memory_used().ok().map(|(used, _)| used)
    }

    fn fill_synthetic(&self, seq: &mut dyn Sequence, tokens: usize, seed: u64) -> Result<()> {
        Ok(downcast::<CudaSequence>(seq, "CUDA")?.seq.fill_synthetic(tokens, seed)?)
    }

    fn decode_floor(&self) -> Result<Option<(usize, f64)>> {
        Ok(Some((self.weights.config.weight_bytes(), self.gpu.copy_bandwidth()?)))
    }
}
