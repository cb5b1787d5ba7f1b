//! Models of real shape with seeded random weights (`--random-weights SHAPE`), so speed
//! and memory can be measured at scales whose weights are not on the machine.
//!
//! Shapes: `llama-3-8b` (GQA, 32 query / 8 KV heads; the 1048K-context variant the
//! DuoAttention paper benchmarks), `llama-2-7b` (MHA, 32 heads; the 32K-context variant of
//! the paper), `smollm2-135m`, or a Hugging Face `config.json`. The weights are the values of
//! `duo_core::random_weights` (the one generator: the GPU backend and `duo random-checkpoint`
//! use it too), stored by the CPU model as Q4_1 blocks (`Model::random`); norms are 1.
//! Such a model says nothing about accuracy: commands that report accuracy refuse it.

use crate::error::{ModelError, Result};
use duo_core::config::{ModelConfig, RopeStyle};
use duo_core::Architecture;
use std::path::Path;

/// Names accepted besides a config file path.
pub const PRESETS: &[&str] = &["llama-3-8b", "llama-2-7b", "smollm2-135m"];

/// The configuration for a preset name or a `config.json` path.
pub fn shape(spec: &str) -> Result<ModelConfig> {
    let llama = |layers, hidden, heads, kv, ffn, vocab, context, theta: f32| ModelConfig {
        architecture: Architecture::Llama,
        n_layers: layers,
        hidden_size: hidden,
        n_heads: heads,
        n_kv_heads: kv,
        head_dim: hidden / heads,
        intermediate_size: ffn,
        vocab_size: vocab,
        context_length: context,
        rope_theta: theta,
        rope_style: RopeStyle::HalfSplit,
        rope_freq_factors: None,
        rms_norm_eps: 1e-5,
        tie_embeddings: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    };
    let config = match spec {
        // Llama-3-8B-Instruct-Gradient-1048k: Llama-3-8B with a 1M context (theta 3.58e9).
        "llama-3-8b" => llama(32, 4096, 32, 8, 14336, 128256, 1_048_576, 3.5807e9),
        // Llama-2-7B-32K-Instruct: Llama-2-7B with a 32K context.
        "llama-2-7b" => llama(32, 4096, 32, 32, 11008, 32000, 32768, 10000.0),
        "smollm2-135m" => ModelConfig { tie_embeddings: true, rope_style: RopeStyle::Interleaved, ..llama(30, 576, 9, 3, 1536, 49152, 8192, 100000.0) },
        path if path.ends_with(".json") => {
            let p = Path::new(path);
            let text = std::fs::read_to_string(p).map_err(|source| ModelError::Io { path: p.into(), source })?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Malformed { path: p.into(), reason: e.to_string() })?;
            let tied = v.get("tie_word_embeddings").and_then(|t| t.as_bool()).unwrap_or(false);
            crate::checkpoint::config_from_hf_json(&v, p, !tied)?
        }
        other => {
            return Err(ModelError::Unsupported(format!(
                "random-weights shape `{other}`: give one of {} or a config.json path",
                PRESETS.join(", ")
            )))
        }
    };
    config.validate()?;
    if config.hidden_size % 32 != 0 || config.intermediate_size % 32 != 0 || (config.n_heads * config.head_dim) % 32 != 0 {
        return Err(ModelError::Unsupported("random weights need widths that are multiples of 32 (Q4_1 blocks)".into()));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_published_shapes() {
        let l3 = shape("llama-3-8b").unwrap();
        assert_eq!((l3.n_layers, l3.n_heads, l3.n_kv_heads, l3.head_dim, l3.intermediate_size), (32, 32, 8, 128, 14336));
        let l2 = shape("llama-2-7b").unwrap();
        assert_eq!((l2.n_kv_heads, l2.vocab_size, l2.context_length), (32, 32000, 32768));
        assert!(shape("gpt-5").unwrap_err().to_string().contains("llama-3-8b"));
        assert!(shape("/no/such/config.json").is_err());
    }
}
