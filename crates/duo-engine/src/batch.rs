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
use crate::backend::{kv_plan, KvPool, Logits, Sequence};
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

/// A tally of the decode-only steps that ran as many rows as the widest one so far. A wider
/// step starts it again, so once a load has filled the batch it holds that batch's steps
/// only: their rows over their time is the decode throughput with the batch full (a single
/// step's time, as in `widest_step`, varies by a few percent from step to step).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FullWidthSteps {
    /// Rows of each tallied step.
    pub rows_per_step: usize,
    /// Steps tallied.
    pub steps: u64,
    /// Their total time in microseconds.
    pub micros: u64,
}

impl FullWidthSteps {
    /// Counts a decode-only step of `rows` rows that took `micros`.
    pub fn record(&mut self, rows: usize, micros: u64) {
        if rows > self.rows_per_step {
            *self = FullWidthSteps { rows_per_step: rows, steps: 0, micros: 0 };
        }
        if rows == self.rows_per_step {
            self.steps += 1;
            self.micros += micros;
        }
    }

    /// Tokens per second of the tallied steps (`None` before any).
    pub fn tokens_per_second(&self) -> Option<f64> {
        (self.micros > 0).then(|| (self.rows_per_step as u64 * self.steps) as f64 * 1e6 / self.micros as f64)
    }
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
    /// Sequences preempted (their blocks freed, to be recomputed) because the KV pool ran out.
    pub preemptions: AtomicU64,
    /// KV blocks of the pool (0 without a pool).
    pub kv_blocks_total: AtomicUsize,
    /// KV blocks held by running sequences.
    pub kv_blocks_used: AtomicUsize,
    /// The most sequences that ran at once.
    pub peak_running: AtomicUsize,
    /// Steps that ran only decode rows (no prefill chunk), their rows and their time in
    /// microseconds: decode throughput is rows / time.
    pub decode_only_steps: AtomicU64,
    /// Rows of those steps.
    pub decode_only_rows: AtomicU64,
    /// Microseconds of those steps (the backend's step, sampling excluded).
    pub decode_only_micros: AtomicU64,
    /// The latest steady decode-only step with the most rows: its rows, microseconds and the KV
    /// bytes its sequences held (what it read), for its bandwidth floor.
    pub widest_step: std::sync::Mutex<(usize, u64, usize)>,
    /// Decode-only steps as wide as the widest so far (the batch full): the decode
    /// throughput with the batch full, averaged over every such step.
    /// (Steady steps only, as `widest_step`.)
    pub full_width: std::sync::Mutex<FullWidthSteps>,
    /// Bytes of weights a step reads and the device's measured copy bandwidth (bytes/s),
    /// where the backend knows them: the floor of a decode step.
    pub floor: std::sync::Mutex<Option<(usize, f64)>>,
    /// False once the engine thread has stopped (it panicked, or the engine was dropped).
    pub stopped: std::sync::atomic::AtomicBool,
    /// Requests admitted, and their microseconds from submission to admission, summed: a
    /// request's time to first token is this wait, then its prefill, then one sampling.
    pub admitted: AtomicU64,
    /// Summed microseconds of those waits.
    pub queue_micros: AtomicU64,
    /// Prompts prefilled (a preempted sequence's recompute not counted again).
    pub prompts_prefilled: AtomicU64,
    /// Summed microseconds from admission to the last prefill chunk's end.
    pub prefill_micros: AtomicU64,
    /// Steps that carried a prefill chunk (with or without decode rows).
    pub prefill_steps: AtomicU64,
    /// Summed microseconds of those steps.
    pub prefill_step_micros: AtomicU64,
    /// Steps that ran a whole prompt of one chunk alone, decode rows waiting one step.
    pub prefill_alone_steps: AtomicU64,
}

impl BatchStats {
    /// Counts a prompt whose last chunk just ended, admitted at `admitted`.
    fn prompt_done(&self, admitted: std::time::Instant) {
        self.prompts_prefilled.fetch_add(1, Ordering::Relaxed);
        self.prefill_micros.fetch_add(admitted.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// Counts a step with a prefill chunk that took `micros`.
    fn prefill_step(&self, micros: u64) {
        self.prefill_steps.fetch_add(1, Ordering::Relaxed);
        self.prefill_step_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

/// The handle to the engine thread. Dropping it stops the thread once the running
/// requests are done.
pub struct BatchEngine {
    tx: mpsc::Sender<Queued>,
    stats: Arc<BatchStats>,
    config: BatchConfig,
    engine: Arc<Engine>,
    plan: CachePlan,
    pool: Option<Arc<dyn KvPool>>,
}

impl BatchEngine {
    /// Starts the engine thread; each sequence reserves its KV bytes (the CPU).
    pub fn start(engine: Arc<Engine>, method: ResolvedMethod, config: BatchConfig) -> Self {
        Self::start_with_pool(engine, method, config, None)
    }

    /// Starts the engine thread over `pool` where given: sequences take blocks as they grow,
    /// admission is by free blocks, and when the pool runs out the youngest sequence is
    /// preempted (its blocks freed) and later recomputed. `config.kv_budget` is then the
    /// pool's bytes and `config.max_running` at most its sequences.
    pub fn start_with_pool(engine: Arc<Engine>, method: ResolvedMethod, mut config: BatchConfig, pool: Option<Arc<dyn KvPool>>) -> Self {
        config.max_running = config.max_running.max(1);
        if let Some(p) = &pool {
            config.kv_budget = p.total_blocks() * p.block_bytes();
            config.max_running = config.max_running.min(p.max_seqs());
        }
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(BatchStats::default());
        let plan = kv_plan(engine.backend(), &method);
        if let Some(p) = &pool {
            stats.kv_blocks_total.store(p.total_blocks(), Ordering::SeqCst);
            *stats.floor.lock().unwrap_or_else(|e| e.into_inner()) = engine.backend().decode_floor().ok().flatten();
        }
        let worker = Worker { engine: engine.clone(), method, plan: plan.clone(), config, stats: stats.clone(), pool: pool.clone(), last_alone: Default::default() };
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
                match worker.pool.clone() {
                    Some(pool) => worker.run_paged(rx, pool),
                    None => worker.run(rx),
                }
            })
            .expect("spawning the engine thread");
        Self { tx, stats, config, engine, plan, pool }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<BatchStats> {
        &self.stats
    }

    /// The limits.
    pub fn config(&self) -> BatchConfig {
        self.config
    }

    /// KV bytes a sequence of `tokens` tokens reserves (with a pool: the bytes of the blocks
    /// it holds at that length).
    pub fn kv_bytes_for(&self, tokens: usize) -> usize {
        match &self.pool {
            Some(p) => p.blocks_for(tokens) * p.block_bytes(),
            None => self.plan.total_bytes(tokens),
        }
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
        if self.tx.send(Queued { request, constraint, submitted: std::time::Instant::now() }).is_err() {
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
    submitted: std::time::Instant,
}

/// A running sequence.
struct Running {
    prompt: Vec<u32>,
    top_logprobs: Option<usize>,
    sink: Box<dyn EventSink>,
    sampler: Sampler,
    max_tokens: usize,
    /// The cache (`None` while preempted).
    kv: Option<Box<dyn Sequence>>,
    reserved: usize,
    /// Order of arrival: the youngest is preempted first and resumed last.
    arrival: u64,
    /// Tokens generated so far.
    generated: Vec<u32>,
    /// Generated tokens to feed again, unsampled, after a preemption (the recompute).
    forced: VecDeque<u32>,
    /// The token to append in the next step.
    pending: Option<u32>,
    /// Resumed after a preemption (its prompt is being recomputed, not counted again).
    resumed: bool,
    prefilled: usize,
    /// Logits of the next position, once the prompt is in.
    logits: Option<Vec<f32>>,
    text: TextStream,
    finished: bool,
    /// When it left the queue (its prefill time counts from here).
    admitted: std::time::Instant,
    /// The token drawn from `logits` ahead of `sample_one` (see `draw_all`).
    drawn: Option<Result<u32>>,
    /// Whether its prompt's prefill has been counted (once, even if a preemption made it
    /// prefill again).
    prompt_counted: bool,
}

struct Worker {
    engine: Arc<Engine>,
    method: ResolvedMethod,
    plan: CachePlan,
    config: BatchConfig,
    stats: Arc<BatchStats>,
    pool: Option<Arc<dyn KvPool>>,
    /// Whether the last paged step was a prompt's prefill alone (see `paged_step`).
    last_alone: std::sync::atomic::AtomicBool,
}

impl Worker {
    fn run(self, rx: mpsc::Receiver<Queued>) {
        let mut waiting: VecDeque<Queued> = VecDeque::new();
        let mut running: Vec<Running> = Vec::new();
        while self.intake(&rx, &mut waiting, &mut running) {
            self.admit(&mut waiting, &mut running);
            if let Some(s) = running.iter_mut().find(|s| s.logits.is_none()) {
                self.prefill_chunk(s);
            }
            self.decode_step(&mut running);
            running.retain(Running::live);
            self.publish(&running);
        }
    }

    /// Takes new requests (waiting for one when idle) and drops the ones whose listener went
    /// away, waiting or running (a running one's cache is freed there and then). False once
    /// the engine is idle and its handle dropped.
    fn intake(&self, rx: &mpsc::Receiver<Queued>, waiting: &mut VecDeque<Queued>, running: &mut Vec<Running>) -> bool {
        if running.is_empty() && waiting.is_empty() {
            match rx.recv() {
                Ok(r) => waiting.push_back(r),
                Err(_) => return false,
            }
        }
        while let Ok(r) = rx.try_recv() {
            waiting.push_back(r);
        }
        let before = waiting.len();
        waiting.retain(|q| !q.request.sink.is_closed());
        self.stats.waiting.fetch_sub(before - waiting.len(), Ordering::SeqCst);
        running.retain(Running::live);
        true
    }

    /// Turns an admitted request into a running sequence with the cache `make_kv` gives
    /// (`reserved` bytes counted against the budget, `arrival` its order); a request whose
    /// sampler or cache cannot be made fails, reported to its listener, instead.
    fn start(&self, q: Queued, make_kv: impl FnOnce() -> Result<Box<dyn Sequence>>, reserved: usize, arrival: u64) -> Option<Running> {
        let Queued { request: r, constraint, submitted } = q;
        self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
        let mut sink = r.sink;
        let made = Sampler::new(r.params.clone()).and_then(|s| Ok((s.with_prompt(&r.prompt).with_constraint(constraint), make_kv()?)));
        if made.is_ok() {
            self.stats.admitted.fetch_add(1, Ordering::Relaxed);
            self.stats.queue_micros.fetch_add(submitted.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        match made {
            Ok((sampler, kv)) => Some(Running::new(r.prompt, r.top_logprobs, sink, sampler, r.params.max_tokens, Some(kv), reserved, arrival, r.params.stop)),
            Err(e) => {
                sink.send(Event::Failed(e.to_string()));
                None
            }
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
            let Some(q) = waiting.pop_front() else { break };
            if let Some(s) = self.start(q, || self.engine.backend().new_sequence(&self.method, total), need, 0) {
                reserved += need;
                running.push(s);
            }
        }
        self.stats.kv_reserved.store(reserved, Ordering::SeqCst);
        self.stats.running.store(running.len(), Ordering::SeqCst);
    }

    /// Runs the next prefill chunk of a sequence (the same chunks as when it runs alone).
    fn prefill_chunk(&self, s: &mut Running) {
        let end = (s.prefilled + self.method.chunk).min(s.prompt.len());
        let last = end == s.prompt.len();
        let which = if last { Logits::Last } else { Logits::None };
        let Some(kv) = s.kv.as_mut() else { return };
        let started = std::time::Instant::now();
        match self.engine.backend().forward(kv.as_mut(), &s.prompt[s.prefilled..end], which) {
            Ok(logits) => {
                self.stats.prefill_step(started.elapsed().as_micros() as u64);
                self.stats.prompt_tokens.fetch_add((end - s.prefilled) as u64, Ordering::Relaxed);
                s.prefilled = end;
                if last {
                    s.logits = Some(logits);
                    s.prompt_done(&self.stats);
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
        draw_all(running.iter_mut());
        for (i, s) in running.iter_mut().enumerate() {
            if let Some(id) = self.sample_one(s, tok, eos) {
                next.push((i, id));
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
                if let Some(kv) = s.kv.as_mut() {
                    kvs.push(kv.as_mut());
                }
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

    /// Takes the sequence's waiting logits and picks its next token: a forced one (replaying
    /// a preempted sequence, not reported again) or a sampled one (reported). Returns the
    /// token to append, or `None` when there were no logits or the sequence finished.
    fn sample_one(&self, s: &mut Running, tok: &duo_model::TextTokenizer, eos: &[u32]) -> Option<u32> {
        let logits = s.logits.take()?;
        if let Some(id) = s.forced.pop_front() {
            return Some(id);
        }
        let id = match s.drawn.take().unwrap_or_else(|| s.sampler.sample(&logits)) {
            Ok(id) => id,
            Err(e) => {
                fail(s, e.to_string());
                return None;
            }
        };
        let eos = if s.sampler.params().ignore_eos { &[][..] } else { eos };
        let accepted = match s.text.accept(tok, id, eos, s.max_tokens) {
            Ok(a) => a,
            Err(e) => {
                fail(s, e.to_string());
                return None;
            }
        };
        s.generated.push(id);
        if let Some(text) = accepted.delta {
            let logprob = s.top_logprobs.map(|n| token_logprob(&logits, id, n));
            self.stats.generation_tokens.fetch_add(1, Ordering::Relaxed);
            if !s.sink.send(Event::Token { id, text, logprob }) {
                s.finished = true;
                return None;
            }
        }
        match accepted.finish {
            Some(reason) => {
                finish(s, tok, reason);
                None
            }
            None => Some(id),
        }
    }

    /// Bytes held by head kind, and (CPU) the running requests' reservations.
    fn publish(&self, running: &[Running]) {
        self.publish_held(running);
        self.stats.kv_reserved.store(running.iter().filter(|s| s.kv.is_some()).map(|s| s.reserved).sum(), Ordering::SeqCst);
        self.stats.running.store(running.len(), Ordering::SeqCst);
    }

    /// Bytes the running sequences hold now, by head kind.
    fn publish_held(&self, running: &[Running]) {
        let (mut r, mut s) = (0, 0);
        for kv in running.iter().filter_map(|seq| seq.kv.as_ref()) {
            let b = kv.bytes();
            r += b.retrieval;
            s += b.streaming;
        }
        self.stats.kv_retrieval.store(r, Ordering::SeqCst);
        self.stats.kv_streaming.store(s, Ordering::SeqCst);
    }
}

impl Running {
    #[allow(clippy::too_many_arguments)]
    fn new(prompt: Vec<u32>, top_logprobs: Option<usize>, sink: Box<dyn EventSink>, sampler: Sampler, max_tokens: usize, kv: Option<Box<dyn Sequence>>, reserved: usize, arrival: u64, stop: Vec<String>) -> Self {
        Self {
            prompt,
            top_logprobs,
            sink,
            sampler,
            max_tokens,
            kv,
            reserved,
            arrival,
            generated: Vec::new(),
            forced: VecDeque::new(),
            pending: None,
            resumed: false,
            prefilled: 0,
            logits: None,
            text: TextStream::new(stop),
            finished: false,
            admitted: std::time::Instant::now(),
            drawn: None,
            prompt_counted: false,
        }
    }

    fn live(&self) -> bool {
        !self.finished && !self.sink.is_closed()
    }

    /// Its prompt's last chunk just ended: counted once, not again after a preemption.
    fn prompt_done(&mut self, stats: &BatchStats) {
        if !self.prompt_counted {
            self.prompt_counted = true;
            stats.prompt_done(self.admitted);
        }
    }
}

/// The paged engine loop (a backend with a [`KvPool`]).
impl Worker {
    fn run_paged(self, rx: mpsc::Receiver<Queued>, pool: Arc<dyn KvPool>) {
        let mut waiting: VecDeque<Queued> = VecDeque::new();
        let mut running: Vec<Running> = Vec::new();
        let mut arrivals = 0u64;
        let tok = &self.engine.tokenizer;
        let eos = self.engine.config().eos_token_ids.clone();
        while self.intake(&rx, &mut waiting, &mut running) {
            self.admit_paged(&*pool, &mut waiting, &mut running, &mut arrivals);
            draw_all(running.iter_mut().filter(|s| s.kv.is_some() && s.pending.is_none()));
            for s in running.iter_mut().filter(|s| s.kv.is_some()) {
                if s.pending.is_none() {
                    s.pending = self.sample_one(s, tok, &eos);
                }
            }
            running.retain(Running::live);
            self.paged_step(&*pool, &mut running);
            running.retain(Running::live);
            self.publish_paged(&*pool, &running);
        }
    }

    /// Resumes preempted sequences (oldest first), then admits waiting requests, while the
    /// blocks of their prompt (and of what running prompts still need) fit the free blocks,
    /// less a 1% watermark, and a sequence slot is free.
    fn admit_paged(&self, pool: &dyn KvPool, waiting: &mut VecDeque<Queued>, running: &mut Vec<Running>, arrivals: &mut u64) {
        let mut active = running.iter().filter(|s| s.kv.is_some()).count();
        let mut committed = 0usize;
        for s in running.iter_mut() {
            let remaining = s.prompt.len() - s.prefilled;
            if let (Some(kv), true) = (s.kv.as_mut(), remaining > 0) {
                committed += pool.blocks_needed(kv.as_mut(), remaining + 1, false).unwrap_or(0);
            }
        }
        // A 1% watermark leaves running sequences room to grow; an idle pool takes any request
        // that fits it whole (the request was checked against the pool at submission).
        let watermark = if active == 0 { 0 } else { pool.total_blocks() / 100 };
        let mut free = pool.free_blocks().saturating_sub(committed + watermark);
        let limit = self.config.max_running.min(pool.max_seqs());
        // Preempted sequences first, oldest first.
        let mut order: Vec<usize> = (0..running.len()).filter(|&i| running[i].kv.is_none()).collect();
        order.sort_by_key(|&i| running[i].arrival);
        for i in order {
            // Room for its prompt and the tokens it replays, so the recompute is not cut short.
            let need = pool.blocks_for(running[i].prompt.len() + running[i].generated.len() + 1);
            if active >= limit || need > free {
                return;
            }
            match pool.new_sequence() {
                Ok(kv) => {
                    let s = &mut running[i];
                    s.kv = Some(kv);
                    s.prefilled = 0;
                    s.forced = s.generated.iter().copied().collect();
                    s.logits = None;
                    s.pending = None;
                    s.resumed = true;
                    free = free.saturating_sub(need);
                    active += 1;
                }
                Err(_) => return,
            }
        }
        while let Some(front) = waiting.front() {
            let need = pool.blocks_for(front.request.prompt.len() + 1);
            if active >= limit || need > free {
                break;
            }
            let Some(q) = waiting.pop_front() else { break };
            if let Some(s) = self.start(q, || pool.new_sequence(), 0, *arrivals + 1) {
                *arrivals += 1;
                free -= need;
                active += 1;
                running.push(s);
            }
        }
    }

    /// One step: the pending token of every running sequence, and the next prefill chunk of
    /// the oldest sequence still prefilling (the same chunks as alone). When the blocks the
    /// step needs are not free, the youngest sequence is preempted until they are.
    ///
    /// A prompt that fits in one chunk runs alone (the decode rows wait one step), unless the
    /// step before was one too: its first token then comes after its prefill and at most the
    /// step in flight when it arrived, instead of after a step that also carries every decode
    /// row's attention; the decode rows lose only the weights' shared read (their next token
    /// came after the mixed step anyway). Longer prompts share steps with the decode rows, so
    /// that decoding never waits more than one step in two.
    fn paged_step(&self, pool: &dyn KvPool, running: &mut [Running]) {
        let chunk_size = self.method.chunk.min(pool.max_chunk()).max(1);
        let after_alone = self.last_alone.load(Ordering::Relaxed);
        let (prefill, alone) = loop {
            let prefill = next_prefill(running, chunk_size, pool.max_rows());
            let prefill_at = prefill.map(|p| p.0);
            // A whole one-chunk prompt beside decoding rows runs alone (see above): then the
            // rows take no blocks this step.
            let alone = !after_alone
                && prefill.is_some_and(|(i, end)| running[i].prefilled == 0 && end == running[i].prompt.len())
                && running.iter().any(|s| s.kv.is_some() && s.pending.is_some());
            let mut need = 0usize;
            for (i, s) in running.iter_mut().enumerate() {
                let Some(kv) = s.kv.as_mut() else { continue };
                let more = match (s.pending, prefill) {
                    (Some(_), _) if alone => continue,
                    (Some(_), _) => 1,
                    (None, Some((at, end))) if at == i => end - s.prefilled,
                    _ => continue,
                };
                need += pool.blocks_needed(kv.as_mut(), more, s.pending.is_some()).unwrap_or(0);
            }
            if need <= pool.free_blocks() {
                break (prefill, alone);
            }
            // The youngest sequence whose preemption helps: one that holds blocks or takes
            // part in this step (a just-admitted one waiting for its turn frees nothing).
            let active: Vec<usize> = (0..running.len()).filter(|&i| running[i].kv.is_some()).collect();
            let helps = |i: usize| running[i].pending.is_some() || prefill_at == Some(i) || running[i].kv.as_ref().is_some_and(|kv| kv.tokens() > 0);
            let Some(&victim) = active.iter().filter(|&&i| helps(i)).max_by_key(|&&i| running[i].arrival) else { return };
            if active.len() == 1 {
                fail(&mut running[victim], format!("the KV pool ({} blocks) cannot hold this request", pool.total_blocks()));
                return;
            }
            let s = &mut running[victim];
            s.kv = None;
            s.pending = None;
            s.logits = None;
            self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        };
        self.last_alone.store(alone, Ordering::Relaxed);
        let mut rows: Vec<(&mut dyn Sequence, u32)> = Vec::new();
        let mut row_of: Vec<usize> = Vec::new();
        let mut chunk: Option<(&mut dyn Sequence, &[u32], bool)> = None;
        for (i, s) in running.iter_mut().enumerate() {
            let Running { kv: Some(kv), pending, prompt, prefilled, .. } = s else { continue };
            if let Some(t) = *pending {
                if alone {
                    continue;
                }
                rows.push((kv.as_mut(), t));
                row_of.push(i);
            } else if let Some((_, end)) = prefill.filter(|p| p.0 == i) {
                chunk = Some((kv.as_mut(), &prompt[*prefilled..end], end == prompt.len()));
            }
        }
        if rows.is_empty() && chunk.is_none() {
            return;
        }
        if !rows.is_empty() {
            self.stats.decode_steps.fetch_add(1, Ordering::Relaxed);
        }
        let decode_only = chunk.is_none();
        let kv_read: usize = rows.iter().map(|(s, _)| s.bytes().total()).sum();
        let n_rows = rows.len();
        let started = std::time::Instant::now();
        let result = pool.step(&mut rows, chunk);
        let micros = started.elapsed().as_micros() as u64;
        drop(rows);
        if !decode_only && result.is_ok() {
            self.stats.prefill_step(micros);
            if alone {
                self.stats.prefill_alone_steps.fetch_add(1, Ordering::Relaxed);
            }
        }
        if decode_only && result.is_ok() {
            self.stats.decode_only_steps.fetch_add(1, Ordering::Relaxed);
            self.stats.decode_only_rows.fetch_add(n_rows as u64, Ordering::Relaxed);
            self.stats.decode_only_micros.fetch_add(micros, Ordering::Relaxed);
        }
        // The widest step and the full-batch tally take steady steps only: the first steps of a
        // new shape (launch by launch, then a graph's capture) would stand for the width.
        if decode_only && result.as_ref().is_ok_and(|o| o.steady) {
            let mut w = self.stats.widest_step.lock().unwrap_or_else(|e| e.into_inner());
            if n_rows >= w.0 {
                *w = (n_rows, micros, kv_read);
            }
            self.stats.full_width.lock().unwrap_or_else(|e| e.into_inner()).record(n_rows, micros);
        }
        match result {
            Ok(out) => {
                let vocab = self.engine.config().vocab_size;
                for (r, &i) in row_of.iter().enumerate() {
                    running[i].pending = None;
                    running[i].logits = Some(out.decode[r * vocab..(r + 1) * vocab].to_vec());
                }
                if let Some((i, end)) = prefill {
                    let s = &mut running[i];
                    if !s.resumed {
                        self.stats.prompt_tokens.fetch_add((end - s.prefilled) as u64, Ordering::Relaxed);
                    }
                    s.prefilled = end;
                    if end == s.prompt.len() {
                        s.logits = Some(out.prefill);
                        s.prompt_done(&self.stats);
                    }
                }
            }
            Err(e) => {
                for i in row_of.into_iter().chain(prefill.map(|p| p.0)) {
                    fail(&mut running[i], e.to_string());
                }
            }
        }
    }

    /// The GPU pool's figures: sequences holding blocks, and the bytes of the blocks in use
    /// (nothing is reserved ahead there).
    fn publish_paged(&self, pool: &dyn KvPool, running: &[Running]) {
        self.publish_held(running);
        let active = running.iter().filter(|s| s.kv.is_some()).count();
        self.stats.running.store(active, Ordering::SeqCst);
        self.stats.peak_running.fetch_max(active, Ordering::SeqCst);
        let used = pool.total_blocks() - pool.free_blocks();
        self.stats.kv_blocks_used.store(used, Ordering::SeqCst);
        self.stats.kv_reserved.store(used * pool.block_bytes(), Ordering::SeqCst);
    }
}

/// The sequence whose next prefill chunk a step runs, and where that chunk ends: the first
/// still prefilling whose chunk (the same chunks as alone) fits beside every decode row;
/// one that does not fit waits for a step with room.
fn next_prefill(running: &[Running], chunk_size: usize, max_rows: usize) -> Option<(usize, usize)> {
    let decoding = running.iter().filter(|s| s.kv.is_some() && s.pending.is_some()).count();
    running
        .iter()
        .enumerate()
        .filter(|(_, s)| s.kv.is_some() && s.pending.is_none() && s.prefilled < s.prompt.len())
        .map(|(i, s)| (i, (s.prefilled + chunk_size).min(s.prompt.len())))
        .find(|&(i, end)| decoding + end - running[i].prefilled <= max_rows)
}

/// Draws the next token of every sequence in `rows` that has logits to sample (not a
/// replayed one), on rayon's threads: a draw over a 128K vocabulary takes a fraction of a
/// millisecond, and a step may have dozens of rows. Each sequence's own sampler draws in
/// the same order as one at a time, so the tokens are the same; `sample_one` reports them.
fn draw_all<'a>(rows: impl Iterator<Item = &'a mut Running>) {
    use rayon::prelude::*;
    let mut todo: Vec<&mut Running> = rows.filter(|s| s.drawn.is_none() && s.forced.is_empty() && s.logits.is_some() && s.live()).collect();
    if todo.len() < 2 {
        return;
    }
    todo.par_iter_mut().for_each(|s| {
        if let Some(logits) = &s.logits {
            s.drawn = Some(s.sampler.sample(logits));
        }
    });
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
    fn full_width_steps_restart_at_a_wider_step() {
        let mut f = FullWidthSteps::default();
        assert_eq!(f.tokens_per_second(), None);
        f.record(3, 1000);
        f.record(5, 2000);
        f.record(4, 9999); // narrower: not counted
        f.record(5, 3000);
        assert_eq!(f, FullWidthSteps { rows_per_step: 5, steps: 2, micros: 5000 });
        assert_eq!(f.tokens_per_second(), Some(2000.0), "10 rows in 5 ms");
        f.record(6, 1000);
        assert_eq!(f, FullWidthSteps { rows_per_step: 6, steps: 1, micros: 1000 });
    }

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
