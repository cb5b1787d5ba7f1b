//! The strict model configuration every other crate reads.
//!
//! Checkpoint loaders (GGUF metadata, Hugging Face `config.json`) each read their own
//! loose format and resolve it into this one struct, checked once by
//! [`ModelConfig::validate`], so the forward pass never has to guess.

use crate::error::{CoreError, Result};
use serde::{Deserialize, Serialize};

/// Model families the forward pass knows. Mistral, SmolLM and Llama 1/2/3/3.1 share
/// the Llama anatomy; Qwen2 adds biases on the q/k/v projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 1/2/3/3.1, Mistral, SmolLM.
    Llama,
    /// Qwen2 (biases on q, k and v).
    Qwen2,
}

/// How RoPE pairs up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeStyle {
    /// Dimension `2i` rotates with `2i+1` (GGUF Llama checkpoints, whose q/k rows were
    /// permuted by the converter).
    Interleaved,
    /// Dimension `i` rotates with `i + head_dim/2` (Hugging Face checkpoints, Qwen2 GGUF).
    HalfSplit,
}

/// A resolved, validated model configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Model family.
    pub architecture: Architecture,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Query heads per layer.
    pub n_heads: usize,
    /// Key/value heads per layer (GQA when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Inner width of the SwiGLU feed-forward block.
    pub intermediate_size: usize,
    /// Vocabulary size (rows of the embedding table).
    pub vocab_size: usize,
    /// Longest sequence the model was trained for.
    pub context_length: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RoPE pairing.
    pub rope_style: RopeStyle,
    /// Per-frequency divisors (Llama 3.1 `llama3` scaling), `head_dim / 2` values.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Whether the LM head reuses the embedding table.
    pub tie_embeddings: bool,
    /// Token id that starts a sequence, if the model uses one.
    pub bos_token_id: Option<u32>,
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Query heads that share one KV head.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Total KV heads over all layers.
    pub fn total_kv_heads(&self) -> usize {
        self.n_layers * self.n_kv_heads
    }

    /// Checks every invariant the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CoreError::InvalidConfig(m));
        if self.n_layers == 0 || self.hidden_size == 0 || self.n_heads == 0 || self.n_kv_heads == 0 {
            return bad(format!(
                "layers ({}), hidden size ({}), heads ({}) and KV heads ({}) must all be positive",
                self.n_layers, self.hidden_size, self.n_heads, self.n_kv_heads
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!("{} query heads are not a multiple of {} KV heads", self.n_heads, self.n_kv_heads));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dimension {} must be even and positive", self.head_dim));
        }
        if self.intermediate_size == 0 || self.vocab_size == 0 || self.context_length == 0 {
            return bad("feed-forward size, vocabulary size and context length must be positive".into());
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope theta {} must be positive", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!("RMSNorm epsilon {} must be positive", self.rms_norm_eps));
        }
        if let Some(f) = &self.rope_freq_factors {
            if f.len() != self.head_dim / 2 {
                return bad(format!("{} RoPE frequency factors, expected head_dim/2 = {}", f.len(), self.head_dim / 2));
            }
            if f.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
                return bad("RoPE frequency factors must be positive".into());
            }
        }
        Ok(())
    }

    /// Llama-3 style frequency divisors (`rope_scaling.rope_type = "llama3"`), as
    /// Hugging Face computes them: long wavelengths are divided by `factor`, short ones
    /// kept, and the band between interpolated smoothly.
    pub fn llama3_freq_factors(
        head_dim: usize,
        theta: f32,
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: f32,
    ) -> Vec<f32> {
        let low_wavelen = original_context / low_freq_factor;
        let high_wavelen = original_context / high_freq_factor;
        (0..head_dim / 2)
            .map(|i| {
                let freq = 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32);
                let wavelen = 2.0 * std::f32::consts::PI / freq;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    factor
                } else {
                    let smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    // new_freq = (1 - s) * freq / factor + s * freq, so the divisor is freq / new_freq.
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn smollm2() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            n_layers: 30,
            hidden_size: 576,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            intermediate_size: 1536,
            vocab_size: 49152,
            context_length: 8192,
            rope_theta: 100000.0,
            rope_style: RopeStyle::Interleaved,
            rope_freq_factors: None,
            rms_norm_eps: 1e-5,
            tie_embeddings: true,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }
    }

    #[test]
    fn validate_accepts_real_shape_and_rejects_bad_gqa() {
        let mut c = smollm2();
        c.validate().unwrap();
        assert_eq!(c.group_size(), 3);
        c.n_kv_heads = 4;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("9 query heads") && e.contains("4 KV heads"), "{e}");
    }

    #[test]
    fn llama3_factors_match_known_values() {
        // Llama-3.1-8B: factor 8, low 1, high 4, original 8192, theta 500000.
        let f = ModelConfig::llama3_freq_factors(128, 500000.0, 8.0, 1.0, 4.0, 8192.0);
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0); // highest frequency untouched
        assert!((f[63] - 8.0).abs() < 1e-6); // lowest frequency divided by the factor
        assert!(f.windows(2).all(|w| w[0] <= w[1] + 1e-6), "divisors grow with wavelength");
        assert!(f.iter().any(|&x| x > 1.0 && x < 8.0), "a smooth band exists");
    }
}
