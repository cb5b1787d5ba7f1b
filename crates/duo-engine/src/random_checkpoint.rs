//! `duo random-checkpoint`: a loadable Hugging Face folder (safetensors, bf16, sharded, with
//! `config.json` and a word-level `tokenizer.json`) of a real shape with seeded random
//! weights, so that the ordinary loader is exercised at 7-8B scale where no real checkpoint
//! can be had.
//!
//! The values come from the one generator of random weights (`duo_core::random_weights`),
//! rounded to bf16: a folder written with seed `s` holds exactly the weights
//! `--random-weights SHAPE --seed s` builds on the GPU (norms 1, the LM head untied; the CPU
//! builds the same values as Q4_1), so a benchmark through the loader and one through
//! `--random-weights` run the same model. Files are written tensor by tensor (the
//! host holds one tensor at a time) in shards of at most [`SHARD_BYTES`].

use crate::error::{EngineError, Result};
use duo_core::config::ModelConfig;
use duo_core::random_weights::{Projection, RandomTensor};
use duo_model::checkpoint::{hf_name, names};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Largest shard (bytes of tensor data) before a new file starts.
pub const SHARD_BYTES: usize = 4 << 30;

/// Where each tensor's values come from.
#[derive(Debug, Clone)]
enum Source {
    /// Rows `rows` of a generated tensor.
    Rows(RandomTensor, std::ops::Range<usize>),
    /// A norm weight of ones, `n` values.
    Ones(usize),
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    shape: [usize; 2],
    rank: usize,
    source: Source,
}

impl Entry {
    fn bytes(&self) -> usize {
        2 * self.shape[0] * self.shape[1]
    }
}

/// The tensors of the checkpoint in file order, with their Hugging Face names (the
/// canonical names mapped by the loader's own table).
fn entries(c: &ModelConfig) -> Vec<Entry> {
    let h = c.hidden_size;
    let matrix = |name: &str, t: RandomTensor, rows: std::ops::Range<usize>| Entry { shape: [rows.len(), t.shape(c).1], rank: 2, name: hf_name(name), source: Source::Rows(t, rows) };
    let ones = |name: &str| Entry { name: hf_name(name), shape: [h, 1], rank: 1, source: Source::Ones(h) };
    let mut out = vec![matrix(names::EMBED, RandomTensor::Embed, 0..c.vocab_size)];
    for l in 0..c.n_layers {
        out.push(ones(&names::block(l, names::ATTN_NORM)));
        for p in Projection::ALL {
            if p == Projection::Gate {
                out.push(ones(&names::block(l, names::FFN_NORM)));
            }
            let (t, rows) = p.source(l, c);
            out.push(matrix(&names::block(l, names::projection(p)), t, rows));
        }
    }
    out.push(ones(names::OUTPUT_NORM));
    out.push(matrix(names::LM_HEAD, RandomTensor::LmHead, 0..c.vocab_size));
    out
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    /// The shard files.
    pub files: Vec<PathBuf>,
    /// Bytes of tensor data.
    pub bytes: usize,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |e| EngineError::Backend(format!("writing {}: {e}", path.display()))
}

/// Writes the checkpoint of `config`'s shape (Llama architecture) with `seed` into `dir`;
/// `progress` gets (bytes written, bytes in all).
pub fn write(config: &ModelConfig, seed: u64, dir: &Path, mut progress: impl FnMut(usize, usize)) -> Result<Written> {
    if config.architecture != duo_core::Architecture::Llama {
        return Err(EngineError::InvalidParameter { name: "shape", reason: "random checkpoints are of the Llama architecture".into() });
    }
    let all = entries(config);
    let total: usize = all.iter().map(Entry::bytes).sum();
    let mut shards: Vec<Vec<Entry>> = vec![Vec::new()];
    let mut in_shard = 0;
    for e in all {
        if in_shard > 0 && in_shard + e.bytes() > SHARD_BYTES {
            shards.push(Vec::new());
            in_shard = 0;
        }
        in_shard += e.bytes();
        if let Some(s) = shards.last_mut() {
            s.push(e);
        }
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut files = Vec::new();
    let mut done = 0;
    for (i, shard) in shards.iter().enumerate() {
        let name = if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", i + 1) };
        let path = dir.join(&name);
        // Header: every tensor's type, shape and byte range, then the data in that order.
        let mut header = serde_json::Map::new();
        let mut at = 0;
        for e in shard {
            let shape: Vec<usize> = e.shape[..e.rank].to_vec();
            header.insert(e.name.clone(), serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [at, at + e.bytes()]}));
            weight_map.insert(e.name.clone(), serde_json::json!(name));
            at += e.bytes();
        }
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt", "generator": format!("duo random-checkpoint, seed {seed}")}));
        let mut text = serde_json::Value::Object(header).to_string();
        while !text.len().is_multiple_of(8) {
            text.push(' ');
        }
        let mut file = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(&path).map_err(io(&path))?);
        file.write_all(&(text.len() as u64).to_le_bytes()).map_err(io(&path))?;
        file.write_all(text.as_bytes()).map_err(io(&path))?;
        for e in shard {
            let values = match &e.source {
                Source::Rows(t, rows) => t.rows(config, seed, rows.clone()).into_iter().map(|v| half::bf16::from_f32(v).to_bits()).collect(),
                Source::Ones(n) => vec![half::bf16::ONE.to_bits(); *n],
            };
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            file.write_all(&bytes).map_err(io(&path))?;
            done += bytes.len();
            progress(done, total);
        }
        file.flush().map_err(io(&path))?;
        files.push(path);
    }
    if n > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let p = dir.join("model.safetensors.index.json");
        std::fs::write(&p, index.to_string()).map_err(io(&p))?;
    }
    let c = config;
    let hf = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.context_length, "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2,
        "duo_random_seed": seed,
    });
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&hf).unwrap_or_default()).map_err(io(&p))?;
    // A word-level vocabulary of the model's size: `<unk>`, `<s>`, `</s>`, then `w3`, `w4`, ...
    let vocab: serde_json::Map<String, serde_json::Value> = (0..c.vocab_size)
        .map(|i| (match i { 0 => "<unk>".to_string(), 1 => "<s>".into(), 2 => "</s>".into(), _ => format!("w{i}") }, serde_json::json!(i)))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    let p = dir.join("tokenizer.json");
    std::fs::write(&p, tok.to_string()).map_err(io(&p))?;
    let p = dir.join("tokenizer_config.json");
    std::fs::write(&p, r#"{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}"#).map_err(io(&p))?;
    Ok(Written { files, bytes: total })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Logits;
    use crate::{Device, Engine, MethodSpec};

    /// A small config file shape: 2 layers, GQA, head_dim 64 (what the CUDA reference takes).
    fn tiny() -> ModelConfig {
        let mut c = duo_model::random::shape("llama-3-8b").expect("preset");
        c.n_layers = 2;
        c.hidden_size = 128;
        c.n_heads = 2;
        c.n_kv_heads = 1;
        c.head_dim = 64;
        c.intermediate_size = 96;
        c.vocab_size = 300;
        c.context_length = 512;
        c.rope_theta = 10_000.0;
        c
    }

    #[test]
    fn a_written_checkpoint_loads_and_runs_the_gpu_generators_model() {
        let c = tiny();
        let dir = std::env::temp_dir().join(format!("duo-random-ck-{}", std::process::id()));
        let w = write(&c, 7, &dir, |_, _| {}).expect("write");
        assert_eq!(w.files.len(), 1);
        let engine = Engine::load(&duo_model::ModelSource::Path(dir.clone()), Device::Cpu).expect("the ordinary loader reads it");
        let got = engine.config();
        assert_eq!((got.n_layers, got.hidden_size, got.n_heads, got.n_kv_heads, got.vocab_size, got.tie_embeddings), (2, 128, 2, 1, 300, false));
        // The CPU engine on the loaded folder against the CUDA backend's CPU reference of
        // `--random-weights` with the same seed: the same model, so the same logits up to bf16
        // rounding of the GPU's intermediates.
        let tokens: Vec<u32> = (0..40).map(|i| (i * 37 % 300) as u32).collect();
        let method = MethodSpec::default().resolve(got).expect("full");
        let mut seq = engine.backend().new_sequence(&method, 40).expect("sequence");
        let ours = engine.backend().forward(seq.as_mut(), &tokens, Logits::Last).expect("forward");
        let layout = duo_cuda::paged::PagedLayout { retrieval: vec![vec![true]; 2], sink: 4, recent: 64, block_tokens: 16, max_chunk: 64, max_tokens: 64, kv: duo_cuda::decode_attention::KvType::Bf16, kv_streaming: duo_cuda::decode_attention::KvType::Bf16 };
        let gc = duo_cuda::model::GpuConfig::from_model(got);
        let want = duo_cuda::model::reference_logits(&gc, &layout, 7, &tokens, 39).expect("reference");
        let top = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = ours.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max) / top;
        assert!(err < 3e-2, "relative logit error {err}");
        assert_eq!(crate::sampler::argmax(&ours), crate::sampler::argmax(&want));
        // A different seed is a different model.
        let other = duo_cuda::model::reference_logits(&gc, &layout, 8, &tokens, 39).expect("reference");
        assert!(other.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-3));
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn shards_split_at_the_limit_and_names_follow_hugging_face() {
        let e = entries(&tiny());
        assert_eq!(e.len(), 1 + 2 * 9 + 2);
        assert_eq!(e[2].name, "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(e[3].shape, [64, 128], "k_proj: one KV head of 64");
        let total: usize = e.iter().map(Entry::bytes).sum();
        // Embedding + LM head 2 x 300 x 128, per layer q 128 + k 64 + v 64 + o 128 rows of 128,
        // gate + up 2 x 96 x 128, down 128 x 96, and three norms of ones.
        assert_eq!(total, 2 * (2 * 300 * 128 + 2 * ((128 + 64 + 64 + 128) * 128 + 2 * 96 * 128 + 128 * 96 + 2 * 128) + 128));
    }
}

#[cfg(test)]
mod one_generator {
    use super::*;
    use crate::backend::{self, Logits};
    use crate::{Device, Engine, MethodSpec};

    /// `--random-weights` on the CPU (Q4_1 of the generator's values) and a written checkpoint
    /// of the same seed loaded by the ordinary loader (bf16 of the same values) are the same
    /// model up to Q4_1 rounding; another seed is another model.
    #[test]
    fn cpu_random_weights_are_the_checkpoints_weights() {
        let mut c = duo_model::random::shape("llama-3-8b").expect("preset");
        (c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size, c.context_length, c.rope_theta) = (2, 128, 2, 1, 64, 96, 300, 512, 10_000.0);
        let dir = std::env::temp_dir().join(format!("duo-one-generator-{}", std::process::id()));
        write(&c, 5, &dir, |_, _| {}).expect("write");
        let loaded = Engine::load(&duo_model::ModelSource::Path(dir.clone()), Device::Cpu).expect("load");
        let tokens: Vec<u32> = (0..30).map(|i| (i * 53 % 300) as u32).collect();
        let run = |b: &dyn backend::Backend| {
            let m = MethodSpec::default().resolve(b.config()).expect("full");
            let mut s = b.new_sequence(&m, 30).expect("sequence");
            b.forward(s.as_mut(), &tokens, Logits::Last).expect("forward")
        };
        let want = run(loaded.backend());
        let rel = |a: &[f32]| {
            let n: f32 = a.iter().zip(&want).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt();
            n / want.iter().map(|y| y * y).sum::<f32>().sqrt()
        };
        let same = rel(&run(backend::random(Device::Cpu, c.clone(), 5).expect("random").as_ref()));
        let other = rel(&run(backend::random(Device::Cpu, c.clone(), 6).expect("random").as_ref()));
        assert!(same < 0.15, "same seed: relative difference {same} (Q4_1 rounding only)");
        assert!(other > 0.5, "another seed is another model: {other}");
        std::fs::remove_dir_all(dir).ok();
    }
}
