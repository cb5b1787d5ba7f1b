//! Checkpoints: a GGUF file or a Hugging Face model folder, behind one interface that
//! yields the resolved [`ModelConfig`], tensors by their GGUF names, the tokenizer and
//! the chat template.
//!
//! GGUF tensor names (`blk.N.attn_q.weight`, ...) are the canonical names; Hugging Face
//! names are mapped onto them, so the model code reads one vocabulary.

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, MetaValue};
use crate::tokenizer::TextTokenizer;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::Module;
use duo_kernels::quant::{QuantKind, QuantMatrix};
use candle_core::{DType, Device, Tensor};
use duo_core::config::{Architecture, ModelConfig, RopeStyle};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The canonical (GGUF) tensor names of the Llama family, the one place they are spelled;
/// Hugging Face names are mapped onto them ([`hf_name`]).
pub mod names {
    /// Token embeddings `[vocab, hidden]`.
    pub const EMBED: &str = "token_embd.weight";
    /// Final RMSNorm `[hidden]`.
    pub const OUTPUT_NORM: &str = "output_norm.weight";
    /// LM head `[vocab, hidden]` (absent when tied to the embeddings).
    pub const LM_HEAD: &str = "output.weight";
    /// RoPE frequency factors (Llama 3.1 in GGUF files).
    pub const ROPE_FREQS: &str = "rope_freqs.weight";
    /// Block parts, for [`block`].
    pub const ATTN_NORM: &str = "attn_norm";
    /// Query projection.
    pub const Q: &str = "attn_q";
    /// Key projection.
    pub const K: &str = "attn_k";
    /// Value projection.
    pub const V: &str = "attn_v";
    /// Output projection.
    pub const O: &str = "attn_output";
    /// RMSNorm before the MLP.
    pub const FFN_NORM: &str = "ffn_norm";
    /// MLP gate projection.
    pub const GATE: &str = "ffn_gate";
    /// MLP up projection.
    pub const UP: &str = "ffn_up";
    /// MLP down projection.
    pub const DOWN: &str = "ffn_down";

    /// The block part that holds a projection.
    pub fn projection(p: duo_core::random_weights::Projection) -> &'static str {
        use duo_core::random_weights::Projection as P;
        match p {
            P::Q => Q,
            P::K => K,
            P::V => V,
            P::O => O,
            P::Gate => GATE,
            P::Up => UP,
            P::Down => DOWN,
        }
    }

    /// The weight of `part` in block `layer` (`blk.3.attn_q.weight`).
    pub fn block(layer: usize, part: &str) -> String {
        format!("blk.{layer}.{part}.weight")
    }

    /// The bias of `part` in block `layer` (Qwen2's q/k/v).
    pub fn block_bias(layer: usize, part: &str) -> String {
        format!("blk.{layer}.{part}.bias")
    }
}

/// A loaded checkpoint.
#[derive(Debug)]
pub enum Checkpoint {
    /// A single GGUF file.
    Gguf(GgufFile),
    /// A Hugging Face folder with safetensors weights.
    HfFolder(HfFolder),
}

impl Checkpoint {
    /// Opens a GGUF file or a Hugging Face model folder.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Ok(Checkpoint::HfFolder(HfFolder::open(path)?))
        } else if path.exists() {
            Ok(Checkpoint::Gguf(GgufFile::open(path)?))
        } else {
            Err(ModelError::Io { path: path.into(), source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder") })
        }
    }

    /// The resolved, validated configuration.
    pub fn config(&self) -> Result<ModelConfig> {
        let c = match self {
            Checkpoint::Gguf(g) => gguf_config(g)?,
            Checkpoint::HfFolder(h) => h.config()?,
        };
        c.validate()?;
        Ok(c)
    }

    /// A weight matrix of `shape` (`[out, in]`), ready for matmuls.
    pub fn matrix(&self, name: &str, shape: &[usize]) -> Result<Arc<QTensor>> {
        match self {
            Checkpoint::Gguf(g) => Ok(Arc::new(g.qtensor(name, shape)?)),
            Checkpoint::HfFolder(h) => {
                let t = h.tensor(name, shape)?;
                Ok(Arc::new(QTensor::quantize(&t, GgmlDType::F32)?))
            }
        }
    }

    /// A vector or matrix in `f32`.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        match self {
            Checkpoint::Gguf(g) => g.f32_tensor(name, shape),
            Checkpoint::HfFolder(h) => Ok(h.tensor(name, shape)?.flatten_all()?.to_vec1::<f32>()?),
        }
    }

    /// A matrix or vector as bf16 bits (what the GPU keeps): bf16 safetensors are copied as
    /// they are, other types converted (round to nearest even) or dequantised, one tensor at
    /// a time.
    pub fn bf16(&self, name: &str, shape: &[usize]) -> Result<Vec<u16>> {
        match self {
            Checkpoint::Gguf(g) => {
                let t = g.qtensor(name, shape)?.dequantize(&Device::Cpu)?.flatten_all()?;
                Ok(t.to_vec1::<f32>()?.into_iter().map(|v| half::bf16::from_f32(v).to_bits()).collect())
            }
            Checkpoint::HfFolder(h) => h.bf16(name, shape),
        }
    }

    /// A GGUF tensor's type and raw bytes (checked against `shape`), for backends that
    /// dequantise on their own device; `None` for Hugging Face folders.
    pub fn gguf_blocks(&self, name: &str, shape: &[usize]) -> Result<Option<(GgmlDType, &[u8])>> {
        match self {
            Checkpoint::Gguf(g) => {
                let (info, bytes) = g.tensor_bytes(name)?;
                if info.shape != shape {
                    return Err(ModelError::TensorShape { name: name.into(), got: info.shape.clone(), expected: shape.to_vec() });
                }
                Ok(Some((info.dtype, bytes)))
            }
            Checkpoint::HfFolder(_) => Ok(None),
        }
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        match self {
            Checkpoint::Gguf(g) => TextTokenizer::from_gguf(g),
            Checkpoint::HfFolder(h) => TextTokenizer::from_hf_folder(&h.dir),
        }
    }

    /// The chat template shipped with the model, if any.
    pub fn chat_template(&self) -> Result<Option<String>> {
        match self {
            Checkpoint::Gguf(g) => Ok(g.meta("tokenizer.chat_template").and_then(MetaValue::as_str).map(str::to_owned)),
            Checkpoint::HfFolder(h) => h.chat_template(),
        }
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        match self {
            Checkpoint::Gguf(g) => g.path(),
            Checkpoint::HfFolder(h) => &h.dir,
        }
    }
}

/// A weight matrix ready for `y = x W^T`: Q4_1 and Q8_0 run duo's own kernels (which
/// quantise activations and sum block products as llama.cpp does); every other type runs
/// candle's quantised or dense matmul.
pub enum Weight {
    /// duo's kernel.
    Native(QuantMatrix),
    /// candle's matmul.
    Candle(QMatMul),
}

impl Weight {
    /// `x`: `[t, in]` -> `[t, out]`.
    pub fn forward(&self, x: &[f32], t: usize) -> Result<Vec<f32>> {
        match self {
            Weight::Native(m) => Ok(m.matmul(x, t)),
            Weight::Candle(w) => {
                let xt = Tensor::from_slice(x, (t, x.len() / t), &Device::Cpu)?;
                Ok(w.forward(&xt)?.flatten_all()?.to_vec1::<f32>()?)
            }
        }
    }
}

impl Checkpoint {
    /// A weight matrix of `shape` (`[out, in]`) for matmuls.
    pub fn weight(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        if let Checkpoint::Gguf(g) = self {
            let (info, bytes) = g.tensor_bytes(name)?;
            let kind = match info.dtype {
                GgmlDType::Q4_1 => Some(QuantKind::Q4_1),
                GgmlDType::Q8_0 => Some(QuantKind::Q8_0),
                _ => None,
            };
            if let Some(kind) = kind {
                if info.shape != shape {
                    return Err(ModelError::TensorShape { name: name.into(), got: info.shape.clone(), expected: shape.to_vec() });
                }
                let m = QuantMatrix::new(kind, shape[0], shape[1], bytes.to_vec())
                    .map_err(|e| ModelError::Malformed { path: g.path().into(), reason: format!("tensor `{name}`: {e}") })?;
                return Ok(Weight::Native(m));
            }
        }
        Ok(Weight::Candle(QMatMul::from_arc(self.matrix(name, shape)?)?))
    }
}

fn gguf_config(g: &GgufFile) -> Result<ModelConfig> {
    let arch_name = g.meta_str("general.architecture")?;
    let architecture = match arch_name {
        "llama" | "mistral" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => return Err(ModelError::Unsupported(format!("architecture `{other}` (supported: llama, mistral, qwen2)"))),
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let hidden = g.meta_u64(&key("embedding_length"))? as usize;
    let n_heads = g.meta_u64(&key("attention.head_count"))? as usize;
    let n_kv = g.meta(&key("attention.head_count_kv")).and_then(MetaValue::as_u64).map_or(n_heads, |v| v as usize);
    let head_dim = g
        .meta(&key("attention.key_length"))
        .and_then(MetaValue::as_u64)
        .map(|v| v as usize)
        .unwrap_or(hidden.checked_div(n_heads).unwrap_or(0));
    let vocab = g.tensors.get(names::EMBED).map(|t| t.shape[0]).ok_or(ModelError::MissingTensor { name: names::EMBED.into() })?;
    let rope_freq_factors = if g.tensors.contains_key(names::ROPE_FREQS) {
        Some(g.f32_tensor(names::ROPE_FREQS, &[head_dim / 2])?)
    } else {
        None
    };
    if let Some(t) = g.meta(&key("rope.scaling.type")).and_then(MetaValue::as_str) {
        if t != "none" {
            return Err(ModelError::Unsupported(format!("RoPE scaling `{t}`")));
        }
    }
    let eos = g.meta("tokenizer.ggml.eos_token_id").and_then(MetaValue::as_u64).map(|v| v as u32);
    let mut eos_token_ids: Vec<u32> = eos.into_iter().collect();
    if let Some(e) = g.meta("tokenizer.ggml.eot_token_id").and_then(MetaValue::as_u64) {
        eos_token_ids.push(e as u32);
    }
    Ok(ModelConfig {
        architecture,
        n_layers: g.meta_u64(&key("block_count"))? as usize,
        hidden_size: hidden,
        n_heads,
        n_kv_heads: n_kv,
        head_dim,
        intermediate_size: g.meta_u64(&key("feed_forward_length"))? as usize,
        vocab_size: vocab,
        context_length: g.meta_u64(&key("context_length"))? as usize,
        rope_theta: g.meta(&key("rope.freq_base")).and_then(MetaValue::as_f64).unwrap_or(10000.0) as f32,
        rope_style: if architecture == Architecture::Qwen2 { RopeStyle::HalfSplit } else { RopeStyle::Interleaved },
        rope_freq_factors,
        rms_norm_eps: g.meta(&key("attention.layer_norm_rms_epsilon")).and_then(MetaValue::as_f64).unwrap_or(1e-5) as f32,
        tie_embeddings: !g.tensors.contains_key(names::LM_HEAD),
        bos_token_id: g.meta("tokenizer.ggml.bos_token_id").and_then(MetaValue::as_u64).map(|v| v as u32),
        eos_token_ids,
    })
}

/// Maps a GGUF tensor name to its Hugging Face name.
pub fn hf_name(name: &str) -> String {
    let base = name.trim_end_matches(".weight").trim_end_matches(".bias");
    let suffix = &name[base.len()..];
    let mapped = match base {
        "token_embd" => "model.embed_tokens".to_string(),
        "output_norm" => "model.norm".to_string(),
        "output" => "lm_head".to_string(),
        _ => {
            let rest = base.strip_prefix("blk.").unwrap_or(base);
            let (layer, part) = rest.split_once('.').unwrap_or((rest, ""));
            let p = match part {
                "attn_norm" => "input_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_norm" => "post_attention_layernorm",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                other => other,
            };
            format!("model.layers.{layer}.{p}")
        }
    };
    format!("{mapped}{suffix}")
}

/// A Hugging Face model folder: `config.json`, `*.safetensors` (one file or an index),
/// `tokenizer.json`, `tokenizer_config.json`.
#[derive(Debug)]
pub struct HfFolder {
    dir: PathBuf,
    config_json: serde_json::Value,
    /// Tensor name -> file holding it.
    index: BTreeMap<String, PathBuf>,
    files: std::sync::Mutex<BTreeMap<PathBuf, Arc<memmap2::Mmap>>>,
}

/// Maps a weight file into memory (read-only): tensors are read from the page cache one at a
/// time, never copied whole onto the heap.
#[allow(unsafe_code)]
pub(crate) fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
    // SAFETY: the map is read-only and lives as long as the checkpoint; duo never writes
    // model files, and a file changed by another program while loaded is outside its contract
    // (as for every engine that maps weights).
    unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ModelError::Io { path: path.into(), source })
}

impl HfFolder {
    fn open(dir: &Path) -> Result<Self> {
        let read_json = |p: PathBuf| -> Result<serde_json::Value> {
            let text = std::fs::read_to_string(&p).map_err(|source| ModelError::Io { path: p.clone(), source })?;
            serde_json::from_str(&text).map_err(|e| ModelError::Malformed { path: p, reason: e.to_string() })
        };
        let config_json = read_json(dir.join("config.json"))?;
        let mut index = BTreeMap::new();
        let idx_path = dir.join("model.safetensors.index.json");
        if idx_path.exists() {
            let idx = read_json(idx_path.clone())?;
            let map = idx.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Malformed { path: idx_path.clone(), reason: "no `weight_map` object".into() })?;
            for (name, file) in map {
                let f = file.as_str().filter(|f| !f.contains('/') && !f.contains("..")).ok_or_else(|| ModelError::Malformed { path: idx_path.clone(), reason: format!("bad file name for `{name}`") })?;
                index.insert(name.clone(), dir.join(f));
            }
        } else {
            let single = dir.join("model.safetensors");
            let bytes = map_file(&single)?;
            let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Malformed { path: single.clone(), reason: e.to_string() })?;
            for name in st.names() {
                index.insert(name.to_string(), single.clone());
            }
        }
        Ok(Self { dir: dir.to_path_buf(), config_json, index, files: Default::default() })
    }

    fn file(&self, path: &Path) -> Result<Arc<memmap2::Mmap>> {
        let mut files = self.files.lock().map_err(|_| ModelError::Unsupported("poisoned file cache".into()))?;
        if let Some(b) = files.get(path) {
            return Ok(b.clone());
        }
        let bytes = Arc::new(map_file(path)?);
        files.insert(path.to_path_buf(), bytes.clone());
        Ok(bytes)
    }

    /// Calls `f` with the raw little-endian bytes and type of a tensor, checked against `shape`.
    fn with_tensor<T>(&self, gguf_name: &str, shape: &[usize], f: impl FnOnce(&[u8], DType) -> Result<T>) -> Result<T> {
        let name = hf_name(gguf_name);
        let path = self.index.get(&name).ok_or(ModelError::MissingTensor { name: name.clone() })?;
        let bytes = self.file(path)?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Malformed { path: path.clone(), reason: e.to_string() })?;
        let view = st.tensor(&name).map_err(|e| ModelError::Malformed { path: path.clone(), reason: e.to_string() })?;
        if view.shape() != shape {
            return Err(ModelError::TensorShape { name, got: view.shape().to_vec(), expected: shape.to_vec() });
        }
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            d => return Err(ModelError::Unsupported(format!("tensor `{name}` has dtype {d:?}"))),
        };
        f(view.data(), dtype)
    }

    fn tensor(&self, gguf_name: &str, shape: &[usize]) -> Result<Tensor> {
        self.with_tensor(gguf_name, shape, |data, dtype| Ok(Tensor::from_raw_buffer(data, dtype, shape, &Device::Cpu)?.to_dtype(DType::F32)?))
    }

    fn bf16(&self, gguf_name: &str, shape: &[usize]) -> Result<Vec<u16>> {
        self.with_tensor(gguf_name, shape, |data, dtype| {
            let words = |n: usize| data.chunks_exact(n);
            Ok(match dtype {
                DType::BF16 => words(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect(),
                DType::F16 => words(2).map(|b| half::bf16::from_f32(half::f16::from_le_bytes([b[0], b[1]]).to_f32()).to_bits()).collect(),
                _ => words(4).map(|b| half::bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_bits()).collect(),
            })
        })
    }

    fn chat_template(&self) -> Result<Option<String>> {
        let p = self.dir.join("tokenizer_config.json");
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|source| ModelError::Io { path: p.clone(), source })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Malformed { path: p, reason: e.to_string() })?;
        Ok(match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take the default one.
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_owned),
            _ => None,
        })
    }

    fn config(&self) -> Result<ModelConfig> {
        config_from_hf_json(&self.config_json, &self.dir.join("config.json"), self.index.contains_key("lm_head.weight"))
    }
}

/// A model configuration from a Hugging Face `config.json` (`path` is for messages;
/// `has_lm_head`: whether the checkpoint has its own LM head, else it is tied).
pub fn config_from_hf_json(c: &serde_json::Value, path: &Path, has_lm_head: bool) -> Result<ModelConfig> {
    let bad = |m: String| ModelError::Malformed { path: path.to_path_buf(), reason: m };
    let get_u = |k: &str| c.get(k).and_then(|v| v.as_u64()).map(|v| v as usize).ok_or_else(|| bad(format!("`{k}` is missing or not an integer")));
    let archs: Vec<&str> = c.get("architectures").and_then(|a| a.as_array()).map(|a| a.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default();
    let model_type = c.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    let architecture = match model_type {
        "llama" | "mistral" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => return Err(ModelError::Unsupported(format!("model_type `{other}` ({archs:?}); supported: llama, mistral, qwen2"))),
    };
    let hidden = get_u("hidden_size")?;
    let n_heads = get_u("num_attention_heads")?;
    let n_kv = c.get("num_key_value_heads").and_then(|v| v.as_u64()).map_or(n_heads, |v| v as usize);
    let head_dim = c.get("head_dim").and_then(|v| v.as_u64()).map(|v| v as usize).unwrap_or(hidden.checked_div(n_heads).unwrap_or(0));
    let theta = c.get("rope_theta").and_then(|v| v.as_f64()).unwrap_or(10000.0) as f32;
    let rope_freq_factors = match c.get("rope_scaling").filter(|v| !v.is_null()) {
        None => None,
        Some(s) => {
            let ty = s.get("rope_type").or_else(|| s.get("type")).and_then(|v| v.as_str()).unwrap_or("");
            if ty != "llama3" {
                return Err(ModelError::Unsupported(format!("rope_scaling type `{ty}` (only `llama3` is supported)")));
            }
            let f = |k: &str| s.get(k).and_then(|v| v.as_f64()).map(|v| v as f32).ok_or_else(|| bad(format!("rope_scaling.{k} missing")));
            Some(ModelConfig::llama3_freq_factors(head_dim, theta, f("factor")?, f("low_freq_factor")?, f("high_freq_factor")?, f("original_max_position_embeddings")?))
        }
    };
    let ids = |k: &str| -> Vec<u32> {
        match c.get(k) {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
            _ => vec![],
        }
    };
    Ok(ModelConfig {
        architecture,
        n_layers: get_u("num_hidden_layers")?,
        hidden_size: hidden,
        n_heads,
        n_kv_heads: n_kv,
        head_dim,
        intermediate_size: get_u("intermediate_size")?,
        vocab_size: get_u("vocab_size")?,
        context_length: get_u("max_position_embeddings")?,
        rope_theta: theta,
        rope_style: RopeStyle::HalfSplit,
        rope_freq_factors,
        rms_norm_eps: c.get("rms_norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-5) as f32,
        tie_embeddings: c.get("tie_word_embeddings").and_then(|v| v.as_bool()).unwrap_or(false) || !has_lm_head,
        bos_token_id: ids("bos_token_id").first().copied(),
        eos_token_ids: ids("eos_token_id"),
    })
}

#[cfg(test)]
mod tests {
    use super::hf_name;

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(hf_name("blk.3.attn_q.weight"), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(hf_name("blk.0.attn_k.bias"), "model.layers.0.self_attn.k_proj.bias");
        assert_eq!(hf_name("blk.12.ffn_down.weight"), "model.layers.12.mlp.down_proj.weight");
        assert_eq!(hf_name("token_embd.weight"), "model.embed_tokens.weight");
        assert_eq!(hf_name("output.weight"), "lm_head.weight");
        assert_eq!(hf_name("output_norm.weight"), "model.norm.weight");
    }
}
