//! The paged engine loop (the one the GPU serves with) on the CPU, through a small block
//! pool written here over the CPU backend: requests admitted by free blocks, the youngest
//! preempted when the pool runs out mid-generation, and recomputed with exactly the tokens
//! they give alone; every block comes back when the requests end.

use duo_core::pattern::Layout;
use duo_engine::{BatchConfig, BatchEngine, Device, Engine, EngineError, Event, EventSink, KvPool, Method, MethodSpec, PoolStep, Request, ResolvedMethod, Runner, SamplingParams, Sequence};
use duo_kv::KvBytes;
use duo_model::{Logits, ModelSource};
use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// A CPU sequence that holds `held` blocks of its pool; dropping it gives them back.
struct Blocked {
    inner: Box<dyn Sequence>,
    held: usize,
    free: Arc<AtomicUsize>,
}

impl Drop for Blocked {
    fn drop(&mut self) {
        self.free.fetch_add(self.held, Ordering::SeqCst);
    }
}

impl Sequence for Blocked {
    fn tokens(&self) -> usize {
        self.inner.tokens()
    }
    fn bytes(&self) -> KvBytes {
        self.inner.bytes()
    }
    fn peak_bytes(&self) -> KvBytes {
        self.inner.peak_bytes()
    }
    fn fork(&self) -> duo_engine::Result<Box<dyn Sequence>> {
        Err(EngineError::Backend("no forks in this test pool".into()))
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Blocks of `block` tokens, one more block per sequence for its streaming heads.
struct CpuBlockPool {
    engine: Arc<Engine>,
    method: ResolvedMethod,
    free: Arc<AtomicUsize>,
    total: usize,
    block: usize,
    /// Decode widths stepped so far: as a GPU pool's graphs, a width's first step is not
    /// steady (`PoolStep::steady`), later ones are.
    widths: std::sync::Mutex<std::collections::HashSet<usize>>,
    /// The widest steady decode-only step.
    max_steady: AtomicUsize,
    /// Steady decode-only steps of each width.
    steady_steps: std::sync::Mutex<std::collections::HashMap<usize, u64>>,
    /// Kinds of the steps in order: (decode rows, with a prefill chunk).
    kinds: std::sync::Mutex<Vec<(usize, bool)>>,
}

fn blocked(s: &mut dyn Sequence) -> &mut Blocked {
    s.as_any_mut().downcast_mut::<Blocked>().expect("a sequence of this pool")
}

impl CpuBlockPool {
    fn grow(&self, s: &mut Blocked, more: usize) -> duo_engine::Result<()> {
        let need = self.blocks_for(s.tokens() + more).saturating_sub(s.held);
        let free = self.free.load(Ordering::SeqCst);
        if need > free {
            return Err(EngineError::Backend(format!("pool full: {need} > {free}")));
        }
        self.free.fetch_sub(need, Ordering::SeqCst);
        s.held += need;
        Ok(())
    }
}

impl KvPool for CpuBlockPool {
    fn new_sequence(&self) -> duo_engine::Result<Box<dyn Sequence>> {
        let inner = self.engine.backend().new_sequence(&self.method, 1024)?;
        Ok(Box::new(Blocked { inner, held: 0, free: self.free.clone() }))
    }
    fn blocks_for(&self, tokens: usize) -> usize {
        1 + tokens.div_ceil(self.block)
    }
    fn blocks_needed(&self, seq: &mut dyn Sequence, more: usize, _decode: bool) -> duo_engine::Result<usize> {
        let s = blocked(seq);
        Ok(self.blocks_for(s.tokens() + more).saturating_sub(s.held))
    }
    fn free_blocks(&self) -> usize {
        self.free.load(Ordering::SeqCst)
    }
    fn total_blocks(&self) -> usize {
        self.total
    }
    fn block_bytes(&self) -> usize {
        1024
    }
    fn block_tokens(&self) -> usize {
        self.block
    }
    fn max_rows(&self) -> usize {
        256
    }
    fn max_seqs(&self) -> usize {
        8
    }
    fn max_chunk(&self) -> usize {
        self.method.chunk
    }
    fn step(&self, decode: &mut [(&mut dyn Sequence, u32)], prefill: Option<(&mut dyn Sequence, &[u32], bool)>) -> duo_engine::Result<PoolStep> {
        let need: usize = decode.iter_mut().map(|(s, _)| self.blocks_needed(&mut **s, 1, true).unwrap_or(0)).sum();
        if need > self.free_blocks() {
            return Err(EngineError::Backend("pool full".into()));
        }
        let backend = self.engine.backend();
        let width = decode.len();
        let decode_only = prefill.is_none();
        self.kinds.lock().expect("an unpoisoned lock").push((width, !decode_only));
        let steady = !decode_only || !self.widths.lock().expect("an unpoisoned lock").insert(width);
        if steady && decode_only {
            self.max_steady.fetch_max(width, Ordering::SeqCst);
            *self.steady_steps.lock().expect("an unpoisoned lock").entry(width).or_default() += 1;
        }
        let mut out = PoolStep { steady, ..PoolStep::default() };
        if !decode.is_empty() {
            let tokens: Vec<u32> = decode.iter().map(|(_, t)| *t).collect();
            let mut inner: Vec<&mut dyn Sequence> = Vec::new();
            for (s, _) in decode.iter_mut() {
                let b = blocked(&mut **s);
                self.grow(b, 1)?;
                inner.push(b.inner.as_mut());
            }
            out.decode = backend.decode_batch(&tokens, &mut inner)?;
        }
        if let Some((s, tokens, last)) = prefill {
            let b = blocked(s);
            self.grow(b, tokens.len())?;
            out.prefill = backend.forward(b.inner.as_mut(), tokens, if last { Logits::Last } else { Logits::None })?;
        }
        Ok(out)
    }
}

struct ChannelSink {
    tx: mpsc::Sender<(usize, Event)>,
    index: usize,
}

impl EventSink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.tx.send((self.index, event)).is_ok()
    }
    fn is_closed(&self) -> bool {
        false
    }
}

#[test]
fn preempted_requests_resume_with_the_tokens_they_give_alone() {
    let model = Arc::new(Engine::load(&ModelSource::Default, Device::Cpu).expect("default model"));
    let spec = MethodSpec { method: Method::Random, sparsity: Some(0.5), layout: Layout::Head, sink: Some(8), recent: Some(24), chunk: 32, ..Default::default() };
    let method = spec.resolve(model.config()).expect("method");
    let text = "The harbour town woke slowly. Fishermen mended nets while gulls argued over the morning catch. ";
    let base = model.tokenizer.encode(&text.repeat(10), true).expect("encode");
    // Short prompts that all fit at admission, then long generations that do not fit together.
    let cases: Vec<(Vec<u32>, SamplingParams)> = (0..6)
        .map(|i| {
            let temperature = if i % 2 == 1 { 0.9 } else { 0.0 };
            (base[..20 + 9 * i].to_vec(), SamplingParams { max_tokens: 70, temperature, seed: 40 + i as u64, ignore_eos: true, ..Default::default() })
        })
        .collect();
    let alone: Vec<Vec<u32>> = cases
        .iter()
        .map(|(p, params)| Runner::new(&model, method.clone()).generate(p, params, |_| true).expect("alone").completion_token_ids)
        .collect();

    let total = 36;
    let free = Arc::new(AtomicUsize::new(total));
    let pool = Arc::new(CpuBlockPool { engine: model.clone(), method: method.clone(), free: free.clone(), total, block: 16, widths: Default::default(), max_steady: AtomicUsize::new(0), steady_steps: Default::default(), kinds: Default::default() });
    let engine = BatchEngine::start_with_pool(model.clone(), method, BatchConfig { kv_budget: 0, max_waiting: 16, max_running: 8 }, Some(pool.clone()));
    assert_eq!(engine.kv_bytes_for(100), (1 + 7) * 1024, "bytes are the blocks held");
    let err = engine.check(600, &SamplingParams { max_tokens: 10, ..Default::default() }, None).unwrap_err().to_string();
    assert!(err.contains("budget"), "a request larger than the whole pool is refused: {err}");
    let (tx, rx) = mpsc::channel();
    for (index, (prompt, params)) in cases.iter().enumerate() {
        engine.submit(Request { prompt: prompt.clone(), params: params.clone(), top_logprobs: None, sink: Box::new(ChannelSink { tx: tx.clone(), index }) }).expect("submit");
    }
    drop(tx);
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); cases.len()];
    let mut done = 0;
    while let Ok((i, event)) = rx.recv_timeout(Duration::from_secs(300)) {
        match event {
            Event::Token { id, .. } => got[i].push(id),
            Event::Done { completion_tokens, .. } => {
                assert_eq!(completion_tokens, got[i].len(), "request {i}: replayed tokens are not reported twice");
                done += 1;
                if done == cases.len() {
                    break;
                }
            }
            Event::Failed(e) => panic!("request {i} failed: {e}"),
        }
    }
    assert_eq!(done, cases.len());
    for (i, want) in alone.iter().enumerate() {
        assert_eq!(&got[i], want, "request {i}: tokens differ from running alone");
    }
    let s = engine.stats();
    assert!(s.preemptions.load(Ordering::SeqCst) > 0, "6 x (1 + 8) blocks do not fit 36: someone was preempted");
    assert!(s.peak_running.load(Ordering::SeqCst) >= 3, "several ran at once");
    let widest = s.widest_step.lock().unwrap().0;
    let full = *s.full_width.lock().unwrap();
    assert!(full.steps >= 1 && full.rows_per_step == widest && widest >= 2, "the full batch's decode steps are tallied: {full:?}, widest {widest}");
    assert_eq!(widest, pool.max_steady.load(Ordering::SeqCst), "the widest step is the widest steady one (a width's first step is not)");
    assert_eq!(full.steps, pool.steady_steps.lock().unwrap()[&widest], "the full-batch tally counts that width's steady steps, not its first");
    // Prompts of one chunk arriving while others decode ran alone (steps with a prefill and no
    // decode rows).
    let alone = s.prefill_alone_steps.load(Ordering::SeqCst);
    let kinds = pool.kinds.lock().unwrap().clone();
    assert!(alone >= 1 && alone as usize <= kinds.iter().filter(|k| **k == (0, true)).count(), "{alone} alone steps in {kinds:?}");
    assert!(full.tokens_per_second().is_some_and(|t| t > 0.0));
    // The phases of time to first token: each request admitted and its prompt counted once
    // (a resumed sequence's recompute is not a second prompt), each prompt at least one
    // step with a prefill chunk.
    assert_eq!(s.admitted.load(Ordering::SeqCst), cases.len() as u64);
    assert_eq!(s.prompts_prefilled.load(Ordering::SeqCst), cases.len() as u64);
    assert!(s.prefill_steps.load(Ordering::SeqCst) >= cases.len() as u64, "a prefill step per prompt");
    assert!(s.prefill_micros.load(Ordering::SeqCst) > 0 && s.prefill_step_micros.load(Ordering::SeqCst) > 0);
    let t0 = Instant::now();
    while free.load(Ordering::SeqCst) < total && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(free.load(Ordering::SeqCst), total, "every block came back");
}

#[test]
fn a_request_that_fills_the_whole_idle_pool_runs() {
    let model = Arc::new(Engine::load(&ModelSource::Default, Device::Cpu).expect("default model"));
    let method = MethodSpec { chunk: 64, ..Default::default() }.resolve(model.config()).expect("method");
    // 100 blocks of 2 tokens (one for the streaming heads): 197 tokens take all 100, more
    // than the 1% watermark leaves while anything else runs.
    let free = Arc::new(AtomicUsize::new(100));
    let pool = Arc::new(CpuBlockPool { engine: model.clone(), method: method.clone(), free: free.clone(), total: 100, block: 2, widths: Default::default(), max_steady: AtomicUsize::new(0), steady_steps: Default::default(), kinds: Default::default() });
    let engine = BatchEngine::start_with_pool(model.clone(), method, BatchConfig { kv_budget: 0, max_waiting: 4, max_running: 4 }, Some(pool));
    let params = SamplingParams { max_tokens: 1, ..Default::default() };
    assert!(engine.check(198, &params, None).is_err(), "199 tokens need 1 + 100 blocks");
    let (tx, rx) = mpsc::channel();
    engine.submit(Request { prompt: vec![42; 196], params, top_logprobs: None, sink: Box::new(ChannelSink { tx, index: 0 }) }).expect("fits the pool");
    let finished = (0..4).any(|_| matches!(rx.recv_timeout(Duration::from_secs(60)), Ok((_, Event::Done { .. }))));
    assert!(finished, "admitted and finished");
}
