//! `duo generate --device cuda`: a checkpoint on duo's CUDA backend. The weights are
//! dequantised once to bf16 on the GPU; sampling, stop strings and text decoding are the
//! CPU engine's (`Sampler`, `TextStream`), applied to the logits of each step.

use crate::args::GenerateArgs;
use anyhow::{bail, Context, Result};
use duo_cuda::model::{CacheLayout, GpuConfig, GpuSequence, GpuWeights, HostLayer, HostWeights};
use duo_cuda::Gpu;
use duo_engine::sampler::Sampler;
use duo_engine::text::TextStream;
use duo_engine::{ResolvedMethod, SamplingParams};
use duo_model::LoadedModel;
use std::io::Write;
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

/// Generates on the GPU and prints as `duo generate` does.
pub fn generate(gpu: Arc<Gpu>, a: &GenerateArgs, params: &SamplingParams, ids: &[u32], model: &LoadedModel, method: &ResolvedMethod) -> Result<()> {
    let c = model.model.config();
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    if ids.len() + params.max_tokens > c.context_length {
        bail!("{} prompt tokens + {} max_tokens exceed the model's context of {} tokens", ids.len(), params.max_tokens, c.context_length);
    }
    let layout = layout(method, c.n_layers, ids.len() + params.max_tokens + 1)?;
    let weights = Arc::new(GpuWeights::from_host(&gpu, GpuConfig::from_model(c), &host_weights(&model.model)?)?);
    let mut seq = GpuSequence::new(gpu.clone(), weights, layout)?;
    let t0 = Instant::now();
    seq.prefill(ids, |_| {})?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut sampler = Sampler::new(params.clone())?;
    let mut text = TextStream::new(params.stop.clone());
    let t1 = Instant::now();
    let mut finish = None;
    let mut out = std::io::stdout();
    while finish.is_none() {
        let token = sampler.sample(&seq.logits()?);
        let step = text.accept(&model.tokenizer, token, &c.eos_token_ids, params.max_tokens)?;
        if let (Some(delta), false) = (&step.delta, a.json) {
            let _ = out.write_all(delta.as_bytes());
            let _ = out.flush();
        }
        finish = step.finish;
        if finish.is_none() {
            seq.decode_step(Some(token))?;
        }
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let completion = text.tokens().to_vec();
    let final_text = text.finish(&model.tokenizer)?;
    let pattern = &method.pattern;
    if a.json {
        let out = serde_json::json!({
            "device": gpu.name(),
            "prompt_token_ids": ids,
            "completion_token_ids": completion,
            "text": final_text,
            "finish_reason": finish,
            "prefill_tokens_per_s": ids.len() as f64 / prefill_s,
            "decode_tokens_per_s": completion.len() as f64 / decode_s,
            "kv_cache_bytes": seq.layout().used_bytes(c.head_dim, seq.tokens()),
            "retrieval_kv_heads": pattern.retrieval_count(),
            "streaming_kv_heads": pattern.streaming_count(),
            "decode_steps_from_graph": seq.graph_steps,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!();
        eprintln!(
            "[{}: {} prompt tokens, {:.1} tok/s prefill; {} new tokens, {:.1} tok/s decode; KV {:.2} MiB bf16 ({} retrieval / {} streaming KV heads); finish: {:?}]",
            gpu.name(),
            ids.len(),
            ids.len() as f64 / prefill_s,
            completion.len(),
            completion.len() as f64 / decode_s,
            seq.layout().used_bytes(c.head_dim, seq.tokens()) as f64 / (1 << 20) as f64,
            pattern.retrieval_count(),
            pattern.streaming_count(),
            finish
        );
    }
    Ok(())
}
