//! Running a model over one sequence: chunked prefill, decode, and teacher-forced scoring.

use crate::error::{EngineError, Result};
use crate::method::ResolvedMethod;
use crate::sampler::{argmax, Sampler, SamplingParams};
use crate::text::TextStream;
use crate::backend::{kv_plan, Backend, Logits, Sequence};
use crate::engine::Engine;
use duo_kv::KvBytes;
use serde::Serialize;
use std::time::Instant;

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The caller asked to stop.
    Cancelled,
}

/// The result of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// Tokens of the prompt.
    pub prompt_token_ids: Vec<u32>,
    /// Tokens generated (a stop string's tokens included).
    pub completion_token_ids: Vec<u32>,
    /// Generated text (stop string cut).
    pub text: String,
    /// Why it stopped.
    pub finish_reason: FinishReason,
    /// Prefill seconds.
    pub prefill_seconds: f64,
    /// Decode seconds.
    pub decode_seconds: f64,
    /// Peak KV bytes, split by head kind.
    #[serde(skip)]
    pub peak_kv: KvBytes,
}

impl Generation {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_token_ids.len() as f64 / self.prefill_seconds.max(1e-9)
    }

    /// Generated tokens per second of decode (the first token comes from prefill).
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.completion_token_ids.len().saturating_sub(1) as f64 / self.decode_seconds.max(1e-9)
    }
}

/// What [`complete`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Tokens generated (a stop string's tokens included).
    pub tokens: Vec<u32>,
    /// Generated text (stop string cut).
    pub text: String,
    /// Why it stopped.
    pub finish: FinishReason,
}

/// The sampling loop every backend shares: samples from `logits` (the next position's
/// after `prompt`), streams stable text to
/// `on_text` (which returns `false` to cancel), stops at end-of-sequence, a stop string or
/// `max_tokens`, and otherwise asks `next_logits` for the logits after the token just chosen;
/// at the end hands `on_text` whatever text was held back. `E` is the caller's error type
/// (the backend's errors and this crate's must both convert into it).
#[allow(clippy::too_many_arguments)]
pub fn complete<E: From<EngineError>>(
    tokenizer: &duo_model::TextTokenizer,
    eos: &[u32],
    params: &SamplingParams,
    prompt: &[u32],
    constraint: Option<crate::constraint::Constraint>,
    mut logits: Vec<f32>,
    mut next_logits: impl FnMut(u32) -> std::result::Result<Vec<f32>, E>,
    mut on_text: impl FnMut(&str) -> bool,
) -> std::result::Result<Completion, E> {
    let mut sampler = Sampler::new(params.clone())?.with_prompt(prompt).with_constraint(constraint);
    let mut stream = TextStream::new(params.stop.clone());
    let finish = loop {
        let next = sampler.sample(&logits)?;
        let accepted = stream.accept(tokenizer, next, eos, params.max_tokens)?;
        if accepted.delta.as_deref().is_some_and(|d| !d.is_empty() && !on_text(d)) {
            break FinishReason::Cancelled;
        }
        if let Some(reason) = accepted.finish {
            break reason;
        }
        logits = next_logits(next)?;
    };
    let rest = stream.finish(tokenizer)?;
    if finish != FinishReason::Cancelled && !rest.is_empty() {
        on_text(&rest);
    }
    Ok(Completion { tokens: stream.tokens().to_vec(), text: stream.text().to_string(), finish })
}

/// One scored continuation token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ScoredToken {
    /// Token id.
    pub id: u32,
    /// Natural-log probability under the model.
    pub logprob: f64,
    /// 1 + number of tokens with a strictly higher logit.
    pub rank: usize,
    /// Whether it is the model's top-1 prediction.
    pub top1: bool,
}

/// Teacher-forced scores of a continuation.
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    /// One entry per scored token.
    pub tokens: Vec<ScoredToken>,
    /// Fraction of tokens that were the top-1 prediction.
    pub top1_accuracy: f64,
    /// Mean log-probability.
    pub mean_logprob: f64,
    /// `exp(-mean_logprob)`.
    pub perplexity: f64,
    /// Peak KV bytes while scoring.
    #[serde(skip)]
    pub peak_kv: KvBytes,
}

impl Scores {
    fn from_tokens(tokens: Vec<ScoredToken>, peak_kv: KvBytes) -> Self {
        let n = tokens.len().max(1) as f64;
        let mean_logprob = tokens.iter().map(|t| t.logprob).sum::<f64>() / n;
        let top1_accuracy = tokens.iter().filter(|t| t.top1).count() as f64 / n;
        Self { tokens, top1_accuracy, mean_logprob, perplexity: (-mean_logprob).exp(), peak_kv }
    }
}

/// Scores token `id` against one row of logits.
pub fn score_token(logits: &[f32], id: u32) -> ScoredToken {
    let target = logits[id as usize];
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&l| (l as f64 - m).exp()).sum();
    let rank = 1 + logits.iter().filter(|&&l| l > target).count();
    ScoredToken { id, logprob: target as f64 - m - z.ln(), rank, top1: rank == 1 && argmax(logits) == id }
}

/// Runs a model with one attention method, one sequence at a time, on the engine's backend.
pub struct Runner<'m> {
    /// The model on its backend.
    pub engine: &'m Engine,
    /// The attention method.
    pub method: ResolvedMethod,
}

impl<'m> Runner<'m> {
    /// A runner.
    pub fn new(engine: &'m Engine, method: ResolvedMethod) -> Self {
        Self { engine, method }
    }

    fn backend(&self) -> &'m dyn Backend {
        self.engine.backend()
    }

    fn check_fits(&self, prompt: usize, new: usize) -> Result<()> {
        check_fits(self.engine.config().context_length, prompt, new)
    }

    /// An empty sequence with room for `tokens` tokens, after checking that its cache fits
    /// the backend's free memory.
    pub fn new_sequence(&self, tokens: usize) -> Result<Box<dyn Sequence>> {
        let b = self.backend();
        check_kv_memory(kv_plan(b, &self.method).total_bytes(tokens), b.available_memory(), tokens)?;
        b.new_sequence(&self.method, tokens)
    }

    /// Prefills `tokens` in chunks of the method's size into `seq`, returning the last
    /// position's logits; `progress` gets each chunk's length.
    pub fn prefill(&self, tokens: &[u32], seq: &mut dyn Sequence, mut progress: impl FnMut(usize)) -> Result<Vec<f32>> {
        let chunks: Vec<&[u32]> = tokens.chunks(self.method.chunk.max(1)).collect();
        let mut last = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let which = if i + 1 == chunks.len() { Logits::Last } else { Logits::None };
            last = self.backend().forward(seq, c, which)?;
            progress(c.len());
        }
        Ok(last)
    }

    /// Runs `tokens` after what `seq` holds and returns the last position's logits.
    pub fn extend(&self, seq: &mut dyn Sequence, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_fits(seq.tokens().max(1), tokens.len())?;
        self.backend().forward(seq, tokens, Logits::Last)
    }

    /// Generates from `prompt`; `on_text` receives each new piece of text as it becomes
    /// stable and returns `false` to cancel.
    pub fn generate(&self, prompt: &[u32], params: &SamplingParams, on_text: impl FnMut(&str) -> bool) -> Result<Generation> {
        params.validate()?;
        params.check_vocab(self.engine.config().vocab_size)?;
        self.check_fits(prompt.len(), params.max_tokens)?;
        let tok = &self.engine.tokenizer;
        let eos = &self.engine.config().eos_token_ids;
        let mut seq = self.new_sequence(prompt.len() + params.max_tokens)?;
        let t0 = Instant::now();
        let logits = self.prefill(prompt, seq.as_mut(), |_| {})?;
        let prefill_seconds = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let backend = self.backend();
        let constraint = params.structured.as_ref().map(|what| self.engine.constraint(what)).transpose()?;
        let done = complete(tok, eos, params, prompt, constraint, logits, |next| backend.forward(seq.as_mut(), &[next], Logits::Last), on_text)?;
        Ok(Generation {
            prompt_token_ids: prompt.to_vec(),
            completion_token_ids: done.tokens,
            text: done.text,
            finish_reason: done.finish,
            prefill_seconds,
            decode_seconds: t1.elapsed().as_secs_f64(),
            peak_kv: seq.peak_bytes(),
        })
    }

    /// Teacher-forced scores of `continuation` after `prompt`.
    pub fn score(&self, prompt: &[u32], continuation: &[u32]) -> Result<Scores> {
        self.check_fits(prompt.len(), continuation.len())?;
        let mut seq = self.new_sequence(prompt.len() + continuation.len())?;
        let logits = self.prefill(prompt, seq.as_mut(), |_| {})?;
        let tokens = self.score_after(seq.as_mut(), &logits, continuation)?;
        Ok(Scores::from_tokens(tokens, seq.peak_bytes()))
    }

    /// Teacher-forced scores of `continuation` given a sequence already holding the prompt
    /// and the logits of its last position; the sequence advances over the continuation
    /// (all but its last token).
    pub fn score_after(&self, seq: &mut dyn Sequence, logits: &[f32], continuation: &[u32]) -> Result<Vec<ScoredToken>> {
        self.check_fits(seq.tokens().max(1), continuation.len())?;
        let mut out = Vec::with_capacity(continuation.len());
        if let Some(&first) = continuation.first() {
            out.push(score_token(logits, first));
        }
        let vocab = self.engine.config().vocab_size;
        // Feed all but the last continuation token; each position predicts the next.
        let fed = &continuation[..continuation.len().saturating_sub(1)];
        let mut done = 0;
        for c in fed.chunks(self.method.chunk.min(512)) {
            let all = self.backend().forward(seq, c, Logits::All)?;
            for (r, row) in all.chunks(vocab).enumerate() {
                out.push(score_token(row, continuation[done + r + 1]));
            }
            done += c.len();
        }
        Ok(out)
    }

    /// Greedy continuation of a sequence whose last position produced `logits`: up to
    /// `max_tokens` tokens, stopping at end-of-sequence.
    pub fn greedy_after(&self, seq: &mut dyn Sequence, logits: &[f32], max_tokens: usize) -> Result<Vec<u32>> {
        self.check_fits(seq.tokens().max(1), max_tokens)?;
        let eos = &self.engine.config().eos_token_ids;
        let mut out = Vec::with_capacity(max_tokens);
        let mut next = argmax(logits);
        while out.len() < max_tokens && !eos.contains(&next) {
            out.push(next);
            if out.len() < max_tokens {
                next = self.backend().greedy_step(seq, next)?;
            }
        }
        Ok(out)
    }

    /// Perplexity of a whole text, in independent windows of at most `window` tokens
    /// (the first token of each window is context only).
    pub fn perplexity(&self, tokens: &[u32], window: usize) -> Result<Scores> {
        let window = window.min(self.engine.config().context_length).max(2);
        let mut all = Vec::new();
        let mut peak = KvBytes::default();
        for w in tokens.chunks(window) {
            if w.len() < 2 {
                continue;
            }
            let s = self.score(&w[..1], &w[1..])?;
            peak.retrieval = peak.retrieval.max(s.peak_kv.retrieval);
            peak.streaming = peak.streaming.max(s.peak_kv.streaming);
            all.extend(s.tokens);
        }
        Ok(Scores::from_tokens(all, peak))
    }
}

/// Errors unless a non-empty prompt plus `new` tokens fit a context of `context` tokens.
pub(crate) fn check_fits(context: usize, prompt: usize, new: usize) -> Result<()> {
    if prompt == 0 {
        return Err(EngineError::InvalidParameter { name: "prompt", reason: "the prompt is empty".into() });
    }
    if prompt + new > context {
        return Err(EngineError::ContextLength { prompt, max_tokens: new, context });
    }
    Ok(())
}

/// Errors when a cache plan needs more than the memory available (unknown: no check).
pub fn check_kv_memory(needed: usize, available: Option<usize>, tokens: usize) -> Result<()> {
    match available {
        Some(avail) if needed > avail => Err(EngineError::KvMemory {
            tokens,
            needed_mib: needed as f64 / (1 << 20) as f64,
            available_mib: avail as f64 / (1 << 20) as f64,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoring_a_constructed_row() {
        let logits = [0.0f32, 2.0, 1.0, 2.0];
        let s = score_token(&logits, 2);
        assert_eq!(s.rank, 3);
        assert!(!s.top1);
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        assert!((s.logprob - (1.0 - z.ln())).abs() < 1e-9);
        let best = score_token(&logits, 1);
        assert!(best.top1 && best.rank == 1);
        // A tie at the top: only the argmax (the first) counts as top-1.
        assert!(!score_token(&logits, 3).top1);
    }

    #[test]
    fn kv_memory_check_names_both_sizes() {
        assert!(check_kv_memory(10 << 20, Some(20 << 20), 100).is_ok());
        assert!(check_kv_memory(10 << 20, None, 100).is_ok());
        let e = check_kv_memory(30 << 20, Some(20 << 20), 4096).unwrap_err().to_string();
        assert!(e.contains("4096 tokens") && e.contains("30.0 MiB") && e.contains("20.0 MiB"), "{e}");
    }
}
