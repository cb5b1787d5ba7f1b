//! `duo generate --device cuda`: a checkpoint on duo's CUDA backend. The weights are
//! dequantised once to bf16 on the GPU; sampling, stop strings and text decoding are the
//! CPU engine's loop (`duo_engine::complete`), applied to the logits of each step.

use anyhow::{bail, Context, Result};
use duo_cuda::model::{CacheLayout, GpuConfig, GpuSequence, GpuWeights, HostLayer, HostWeights};
use duo_cuda::Gpu;
use duo_engine::{Generation, ResolvedMethod, SamplingParams};
use duo_model::LoadedModel;
use std::sync::Arc;
use std::time::Instant;

/// The model's weights as the GPU takes them (projections stacked).
pub fn host_weights(model: &duo_model::Model) -> Result<HostWeights> {
    let d = model.dense_weights().context("dequantising the weights for the GPU")?;
    Ok(HostWeights {
        embed: d.embed,
        layers: d
            .blocks
            .into_iter()
            .map(|b| HostLayer { attn_norm: b.attn_norm, qkv: [b.q, b.k, b.v].concat(), o: b.o, ffn_norm: b.ffn_norm, gate_up: [b.gate, b.up].concat(), down: b.down })
            .collect(),
        norm: d.norm,
        lm_head: d.lm_head,
    })
}

/// The cache layout of a resolved method for sequences of up to `max_tokens`.
pub fn layout(method: &ResolvedMethod, layers: usize, max_tokens: usize) -> Result<CacheLayout> {
    if method.prefill != duo_kv::PrefillMode::Lambda {
        bail!("--device cuda prefills streaming heads with the Λ mask only (--prefill lambda)");
    }
    Ok(CacheLayout {
        retrieval: (0..layers).map(|l| method.pattern.layer(l).to_vec()).collect(),
        sink: method.window.sink,
        recent: method.window.recent,
        chunk: method.chunk,
        max_tokens,
    })
}

/// Generates on the GPU: the same sampling loop as the CPU engine (`duo_engine::complete`),
/// fed by the GPU's logits; `on_text` gets each stable piece of text.
pub fn generate(gpu: Arc<Gpu>, params: &SamplingParams, ids: &[u32], model: &LoadedModel, method: &ResolvedMethod, on_text: impl FnMut(&str) -> bool) -> Result<Generation> {
    let c = model.model.config();
    params.validate()?;
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    if ids.len() + params.max_tokens > c.context_length {
        bail!("{} prompt tokens + {} max_tokens exceed the model's context of {} tokens", ids.len(), params.max_tokens, c.context_length);
    }
    let layout = layout(method, c.n_layers, ids.len() + params.max_tokens + 1)?;
    let weights = Arc::new(GpuWeights::from_host(&gpu, GpuConfig::from_model(c), &host_weights(&model.model)?)?);
    let mut seq = GpuSequence::new(gpu, weights, layout)?;
    let t0 = Instant::now();
    seq.prefill(ids, |_| {})?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let first = seq.logits()?;
    let done = duo_engine::complete(
        &model.tokenizer,
        &c.eos_token_ids,
        params,
        first,
        |next| -> Result<Vec<f32>> {
            seq.decode_step(Some(next))?;
            Ok(seq.logits()?)
        },
        on_text,
    )?;
    let decode_seconds = t1.elapsed().as_secs_f64();
    let (retrieval, streaming) = seq.layout().used_bytes_by_kind(c.head_dim, seq.tokens());
    Ok(Generation {
        prompt_token_ids: ids.to_vec(),
        completion_token_ids: done.tokens,
        text: done.text,
        finish_reason: done.finish,
        prefill_seconds,
        decode_seconds,
        peak_kv: duo_kv::KvBytes { retrieval, streaming },
    })
}
