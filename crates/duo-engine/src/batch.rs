//! Continuous batching: many sequences, one model, one engine thread.
//!
//! Requests arrive on a channel and wait in a FIFO queue until the KV memory they may need
//! (their cache plan at `prompt + max_tokens` tokens) fits the budget next to the running
//! ones; they then join the running batch between two decode steps. Each iteration of the
//! engine loop does at most one prefill chunk (of the oldest sequence still prefilling),
//! then one decode step for every sequence that has logits waiting, as a single
//! [`crate::Backend::decode_batch`] call. So a long prompt is prefilled in chunks
//! interleaved with the other sequences' decode steps, and the weights are read once per
//! step for the whole batch.
//!
//! Each sequence owns its hybrid KV cache; it is dropped, and its bytes returned, the moment
//! the sequence finishes or its receiver goes away (a client that disconnects). Results are
//! deterministic per request: a sequence's chunks, sampler and seed do not depend on what
//! else is running, and every kernel treats rows independently, so a request's tokens are
//! the same alone or in any batch.

use crate::error::{EngineError, Result};
use crate::method::ResolvedMethod;
use crate::sampler::{Sampler, SamplingParams};
use crate::session::FinishReason;
use crate::text::TextStream;
use crate::backend::{kv_plan, Logits, Sequence};
use crate::constraint::Constraint;
use crate::engine::Engine;
use duo_core::cache_spec::CachePlan;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

/// Where a request's events go. Implemented by the server over its async channels.
pub trait EventSink: Send {
    /// Delivers an event; returns `false` when nobody is listening any more.
    fn send(&mut self, event: Event) -> bool;
    /// True once nobody is listening (the request is then cancelled and its KV freed).
    fn is_closed(&self) -> bool;
}

/// One generation request.
pub struct Request {
    /// Prompt tokens (not empty).
    pub prompt: Vec<u32>,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// Log-probabilities: `None` for none, `Some(n)` for the chosen token and the `n` most
    /// likely alternatives.
    pub top_logprobs: Option<usize>,
    /// Where events go.
    pub sink: Box<dyn EventSink>,
}

/// The log-probability of a generated token and of the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// Natural-log probability of the chosen token (raw logits, before sampling filters).
    pub logprob: f32,
    /// The most likely tokens with their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

/// What the engine reports about a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token and the text that became stable with it (may be empty).
    Token {
        /// The token.
        id: u32,
        /// Newly stable text.
        text: String,
        /// Its log-probability, when asked for.
        logprob: Option<TokenLogprob>,
    },
    /// The request finished; nothing follows.
    Done {
        /// Why.
        finish_reason: FinishReason,
        /// Text held back until the end (a possible stop-string prefix), if any.
        text: String,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
    },
    /// The request failed; nothing follows.
    Failed(String),
}

/// Limits of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// KV bytes the running sequences may reserve together.
    pub kv_budget: usize,
    /// Requests that may wait for admission; more are refused with [`EngineError::QueueFull`].
    pub max_waiting: usize,
    /// Sequences that may run at once.
    pub max_running: usize,
}

/// Live counters, shared with whoever exports metrics.
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Sequences in the running batch.
    pub running: AtomicUsize,
    /// Requests waiting for admission (queued or in the channel).
    pub waiting: AtomicUsize,
    /// KV bytes reserved by running sequences (their plan at full length).
    pub kv_reserved: AtomicUsize,
    /// KV bytes held now by retrieval heads.
    pub kv_retrieval: AtomicUsize,
    /// KV bytes held now by streaming heads.
    pub kv_streaming: AtomicUsize,
    /// Prompt tokens prefilled, in total.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated, in total.
    pub generation_tokens: AtomicU64,
    /// Decode steps run (one per batch).
    pub decode_steps: AtomicU64,
    /// False once the engine thread has stopped (it panicked, or the engine was dropped).
    pub stopped: std::sync::atomic::AtomicBool,
}

/// The handle to the engine thread. Dropping it stops the thread once the running
/// requests are done.
pub struct BatchEngine {
    tx: mpsc::Sender<Queued>,
    stats: Arc<BatchStats>,
    config: BatchConfig,
    engine: Arc<Engine>,
    plan: CachePlan,
}

impl BatchEngine {
    /// Starts the engine thread.
    pub fn start(engine: Arc<Engine>, method: ResolvedMethod, mut config: BatchConfig) -> Self {
        config.max_running = config.max_running.max(1);
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(BatchStats::default());
        let plan = kv_plan(engine.backend(), &method);
        let worker = Worker { engine: engine.clone(), method, plan: plan.clone(), config, stats: stats.clone() };
        std::thread::Builder::new()
            .name("duo-engine".into())
            .spawn(move || {
                // Marks the engine stopped however the thread ends, panics included.
                struct Stopped(Arc<BatchStats>);
                impl Drop for Stopped {
                    fn drop(&mut self) {
                        self.0.stopped.store(true, Ordering::SeqCst);
                    }
                }
                let _guard = Stopped(worker.stats.clone());
                worker.run(rx)
            })
            .expect("spawning the engine thread");
        Self { tx, stats, config, engine, plan }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<BatchStats> {
        &self.stats
    }

    /// The limits.
    pub fn config(&self) -> BatchConfig {
        self.config
    }

    /// KV bytes a sequence of `tokens` tokens reserves.
    pub fn kv_bytes_for(&self, tokens: usize) -> usize {
        self.plan.total_bytes(tokens)
    }

    /// True while the engine thread runs.
    pub fn is_alive(&self) -> bool {
        !self.stats.stopped.load(Ordering::SeqCst)
    }

    /// The most new tokens a request with `prompt` tokens may ask for within the KV budget
    /// (0 if even the prompt does not fit).
    pub fn max_new_tokens_within_budget(&self, prompt: usize) -> usize {
        let fits = |n: usize| self.kv_bytes_for(prompt + n) <= self.config.kv_budget;
        let context = self.engine.config().context_length;
        if !fits(0) {
            return 0;
        }
        // Bytes grow with tokens: binary search for the last n that fits.
        let (mut lo, mut hi) = (0usize, context.saturating_sub(prompt));
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    /// True when the queue is full (checked before tokenising, to refuse early).
    pub fn queue_full(&self) -> bool {
        self.stats.waiting.load(Ordering::SeqCst) >= self.config.max_waiting
    }

    /// Checks that a request can ever run: a prompt, valid parameters, the context, and the
    /// KV budget.
    pub fn check(&self, prompt: usize, params: &SamplingParams, top_logprobs: Option<usize>) -> Result<()> {
        self.checked(prompt, params, top_logprobs).map(|_| ())
    }

    /// [`BatchEngine::check`], returning the request's compiled grammar (structured output),
    /// which travels with it to admission: a bad schema is refused before queueing, and the
    /// grammar is compiled once.
    fn checked(&self, prompt: usize, params: &SamplingParams, top_logprobs: Option<usize>) -> Result<Option<Constraint>> {
        params.validate()?;
        crate::session::check_fits(self.engine.config().context_length, prompt, params.max_tokens)?;
        params.check_vocab(self.engine.config().vocab_size)?;
        let constraint = params.structured.as_ref().map(|what| self.engine.constraint(what)).transpose()?;
        if top_logprobs.is_some_and(|n| n > self.engine.config().vocab_size) {
            return Err(EngineError::InvalidParameter { name: "top_logprobs", reason: "more than the vocabulary".into() });
        }
        let needed = self.kv_bytes_for(prompt + params.max_tokens);
        if needed > self.config.kv_budget {
            return Err(EngineError::KvBudget { needed, budget: self.config.kv_budget });
        }
        Ok(constraint)
    }

    /// Queues a request. Errors (and sends nothing) when it is invalid or the queue is full.
    pub fn submit(&self, request: Request) -> Result<()> {
        if !self.is_alive() {
            return Err(EngineError::Stopped);
        }
        let constraint = self.checked(request.prompt.len(), &request.params, request.top_logprobs)?;
        let waiting = self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.config.max_waiting {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::QueueFull { waiting });
        }
        if self.tx.send(Queued { request, constraint }).is_err() {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Stopped);
        }
        Ok(())
    }
}

/// A request on its way to admission, with its compiled grammar.
struct Queued {
    request: Request,
    constraint: Option<Constraint>,
}

/// A running sequence.
struct Running {
    prompt: Vec<u32>,
    top_logprobs: Option<usize>,
    sink: Box<dyn EventSink>,
    sampler: Sampler,
    max_tokens: usize,
    kv: Box<dyn Sequence>,
    reserved: usize,
    prefilled: usize,
    /// Logits of the next position, once the prompt is in.
    logits: Option<Vec<f32>>,
    text: TextStream,
    finished: bool,
}

struct Worker {
    engine: Arc<Engine>,
    method: ResolvedMethod,
    plan: CachePlan,
    config: BatchConfig,
    stats: Arc<BatchStats>,
}

impl Worker {
    fn run(self, rx: mpsc::Receiver<Queued>) {
        let mut waiting: VecDeque<Queued> = VecDeque::new();
        let mut running: Vec<Running> = Vec::new();
        loop {
            if running.is_empty() && waiting.is_empty() {
                match rx.recv() {
                    Ok(r) => waiting.push_back(r),
                    Err(_) => return,
                }
            }
            while let Ok(r) = rx.try_recv() {
                waiting.push_back(r);
            }
            let before = waiting.len();
            waiting.retain(|q| !q.request.sink.is_closed());
            self.stats.waiting.fetch_sub(before - waiting.len(), Ordering::SeqCst);
            running.retain(|s| !s.finished && !s.sink.is_closed());
            self.admit(&mut waiting, &mut running);
            if let Some(s) = running.iter_mut().find(|s| s.logits.is_none()) {
                self.prefill_chunk(s);
            }
            self.decode_step(&mut running);
            running.retain(|s| !s.finished && !s.sink.is_closed());
            self.publish(&running);
        }
    }

    /// Moves waiting requests into the batch, oldest first, while their KV fits.
    fn admit(&self, waiting: &mut VecDeque<Queued>, running: &mut Vec<Running>) {
        let mut reserved: usize = running.iter().map(|s| s.reserved).sum();
        while let Some(front) = waiting.front() {
            let total = front.request.prompt.len() + front.request.params.max_tokens;
            let need = self.plan.total_bytes(total);
            if running.len() >= self.config.max_running || reserved + need > self.config.kv_budget {
                break;
            }
            let Some(Queued { request: r, constraint }) = waiting.pop_front() else { break };
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            let mut sink = r.sink;
            let sampler = match Sampler::new(r.params.clone()) {
                Ok(s) => s.with_prompt(&r.prompt).with_constraint(constraint),
                Err(e) => {
                    sink.send(Event::Failed(e.to_string()));
                    continue;
                }
            };
            let kv = match self.engine.backend().new_sequence(&self.method, total) {
                Ok(kv) => kv,
                Err(e) => {
                    sink.send(Event::Failed(e.to_string()));
                    continue;
                }
            };
            reserved += need;
            running.push(Running {
                prompt: r.prompt,
                top_logprobs: r.top_logprobs,
                sink,
                sampler,
                max_tokens: r.params.max_tokens,
                kv,
                reserved: need,
                prefilled: 0,
                logits: None,
                text: TextStream::new(r.params.stop),
                finished: false,
            });
        }
        self.stats.kv_reserved.store(reserved, Ordering::SeqCst);
        self.stats.running.store(running.len(), Ordering::SeqCst);
    }

    /// Runs the next prefill chunk of a sequence (the same chunks as when it runs alone).
    fn prefill_chunk(&self, s: &mut Running) {
        let end = (s.prefilled + self.method.chunk).min(s.prompt.len());
        let last = end == s.prompt.len();
        let which = if last { Logits::Last } else { Logits::None };
        match self.engine.backend().forward(s.kv.as_mut(), &s.prompt[s.prefilled..end], which) {
            Ok(logits) => {
                self.stats.prompt_tokens.fetch_add((end - s.prefilled) as u64, Ordering::Relaxed);
                s.prefilled = end;
                if last {
                    s.logits = Some(logits);
                }
            }
            Err(e) => fail(s, e.to_string()),
        }
    }

    /// Samples a token for every sequence with logits, reports it, and runs the
    /// continuing ones through the model as one batch.
    fn decode_step(&self, running: &mut [Running]) {
        let eos = &self.engine.config().eos_token_ids;
        let tok = &self.engine.tokenizer;
        let mut next: Vec<(usize, u32)> = Vec::new();
        for (i, s) in running.iter_mut().enumerate() {
            let Some(logits) = s.logits.take() else { continue };
            let id = match s.sampler.sample(&logits) {
                Ok(id) => id,
                Err(e) => {
                    fail(s, e.to_string());
                    continue;
                }
            };
            let accepted = match s.text.accept(tok, id, eos, s.max_tokens) {
                Ok(a) => a,
                Err(e) => {
                    fail(s, e.to_string());
                    continue;
                }
            };
            if let Some(text) = accepted.delta {
                let logprob = s.top_logprobs.map(|n| token_logprob(&logits, id, n));
                self.stats.generation_tokens.fetch_add(1, Ordering::Relaxed);
                if !s.sink.send(Event::Token { id, text, logprob }) {
                    s.finished = true;
                    continue;
                }
            }
            match accepted.finish {
                Some(reason) => finish(s, tok, reason),
                None => next.push((i, id)),
            }
        }
        if next.is_empty() {
            return;
        }
        let tokens: Vec<u32> = next.iter().map(|&(_, id)| id).collect();
        let mut kvs: Vec<&mut dyn Sequence> = Vec::with_capacity(next.len());
        let mut chosen = next.iter().map(|&(i, _)| i).peekable();
        for (i, s) in running.iter_mut().enumerate() {
            if chosen.peek() == Some(&i) {
                chosen.next();
                kvs.push(s.kv.as_mut());
            }
        }
        self.stats.decode_steps.fetch_add(1, Ordering::Relaxed);
        match self.engine.backend().decode_batch(&tokens, &mut kvs) {
            Ok(logits) => {
                let vocab = logits.len() / tokens.len();
                for (row, &(i, _)) in next.iter().enumerate() {
                    running[i].logits = Some(logits[row * vocab..(row + 1) * vocab].to_vec());
                }
            }
            Err(e) => {
                for &(i, _) in &next {
                    fail(&mut running[i], e.to_string());
                }
            }
        }
    }

    fn publish(&self, running: &[Running]) {
        let (mut r, mut s, mut reserved) = (0, 0, 0);
        for seq in running {
            let b = seq.kv.bytes();
            r += b.retrieval;
            s += b.streaming;
            reserved += seq.reserved;
        }
        self.stats.kv_retrieval.store(r, Ordering::SeqCst);
        self.stats.kv_streaming.store(s, Ordering::SeqCst);
        self.stats.kv_reserved.store(reserved, Ordering::SeqCst);
        self.stats.running.store(running.len(), Ordering::SeqCst);
    }
}

fn finish(s: &mut Running, tokenizer: &duo_model::TextTokenizer, finish_reason: FinishReason) {
    let text = match s.text.finish(tokenizer) {
        Ok(text) => text,
        Err(e) => return fail(s, e.to_string()),
    };
    s.sink.send(Event::Done { finish_reason, text, prompt_tokens: s.prompt.len(), completion_tokens: s.text.tokens().len() });
    s.finished = true;
}

fn fail(s: &mut Running, message: String) {
    s.sink.send(Event::Failed(message));
    s.finished = true;
}

/// Log-probability of `id` and the `n` most likely tokens under raw `logits`.
pub fn token_logprob(logits: &[f32], id: u32, n: usize) -> TokenLogprob {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + logits.iter().map(|&l| (l as f64 - m).exp()).sum::<f64>().ln();
    let lp = |l: f32| (l as f64 - lse) as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = n.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        idx.truncate(k);
        idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        top = idx.into_iter().map(|i| (i, lp(logits[i as usize]))).collect();
    }
    TokenLogprob { logprob: lp(logits[id as usize]), top }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_of_a_constructed_row() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let t = token_logprob(&logits, 2, 3);
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        assert!((t.logprob as f64 - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(t.top.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert!(t.top[0].1 >= t.top[2].1);
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
    }
}
