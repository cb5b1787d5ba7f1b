//! What the identification tests share: a tiny Llama shape for random models.

use duo_core::{Architecture, ModelConfig, RopeStyle};

/// Three layers of 4 query / 2 KV heads of 8 dims, with the given RoPE layout.
pub fn tiny(style: RopeStyle) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        n_layers: 3,
        hidden_size: 32,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        intermediate_size: 48,
        vocab_size: 64,
        context_length: 256,
        rope_theta: 10000.0,
        rope_style: style,
        rope_freq_factors: None,
        rms_norm_eps: 1e-5,
        tie_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![0],
    }
}
