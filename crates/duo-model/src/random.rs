//! Models of real shape with seeded random weights (`--random-weights SHAPE`), so speed
//! and memory can be measured at scales whose weights are not on the machine.
//!
//! Shapes: `llama-3-8b` (GQA, 32 query / 8 KV heads; the 1048K-context variant the
//! DuoAttention paper benchmarks), `llama-2-7b` (MHA, 32 heads; the 32K-context variant of
//! the paper), `smollm2-135m`, or a Hugging Face `config.json`. Weights are Q4_1 blocks
//! (the default model's type: the CPU matmul kernels run exactly as on real checkpoints),
//! drawn from a seeded generator with a spread like trained weights (std ~0.02); norms are 1.
//! Such a model says nothing about accuracy: commands that report accuracy refuse it.

use crate::error::{ModelError, Result};
use duo_core::config::{ModelConfig, RopeStyle};
use duo_core::Architecture;
use half::f16;
use rayon::prelude::*;
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

/// Bytes of a `[rows, cols]` Q4_1 matrix of random weights. Rows are generated in
/// parallel, each from its own stream of `seed`, so the result does not depend on the
/// thread count.
pub fn q4_1_matrix(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    const BLOCK_BYTES: usize = 20;
    let row_bytes = cols / 32 * BLOCK_BYTES;
    let mut data = vec![0u8; rows * row_bytes];
    // Uniform over 16 levels d*q + m, q in 0..16: std = d * sqrt((16^2 - 1) / 12) ~ 0.02.
    let d = 0.02f32 / (255.0f32 / 12.0).sqrt();
    let (dh, mh) = (f16::from_f32(d).to_le_bytes(), f16::from_f32(-7.5 * d).to_le_bytes());
    data.par_chunks_mut(row_bytes).enumerate().for_each(|(r, row)| {
        let mut state = seed ^ (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for block in row.chunks_exact_mut(BLOCK_BYTES) {
            block[..2].copy_from_slice(&dh);
            block[2..4].copy_from_slice(&mh);
            for pair in block[4..].chunks_exact_mut(8) {
                pair.copy_from_slice(&splitmix(&mut state).to_le_bytes());
            }
        }
    });
    data
}

/// SplitMix64: small, fast, and good enough for weights whose values do not matter.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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

    #[test]
    fn random_matrices_are_seeded_and_have_the_intended_spread() {
        let a = q4_1_matrix(8, 64, 1);
        assert_eq!(a.len(), 8 * 2 * 20);
        assert_eq!(a, q4_1_matrix(8, 64, 1));
        assert_ne!(a, q4_1_matrix(8, 64, 2));
        let m = duo_kernels::quant::QuantMatrix::new(duo_kernels::quant::QuantKind::Q4_1, 64, 256, q4_1_matrix(64, 256, 3)).unwrap();
        let w: Vec<f32> = (0..64).flat_map(|r| m.dequantize_row(r)).collect();
        let mean = w.iter().sum::<f32>() / w.len() as f32;
        let std = (w.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / w.len() as f32).sqrt();
        assert!(mean.abs() < 0.003 && (0.017..0.023).contains(&std), "mean {mean}, std {std}");
    }
}
