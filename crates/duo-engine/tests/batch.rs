//! Continuous batching on the real default model: requests of different lengths run
//! together give exactly the tokens each gives alone, and a request whose listener goes
//! away frees its KV cache.

use duo_core::pattern::Layout;
use duo_engine::{BatchConfig, BatchEngine, Device, Engine, Event, EventSink, FinishReason, Method, MethodSpec, Request, Runner, SamplingParams};
use duo_model::ModelSource;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Forwards events to a channel; after `close_after` tokens it reports itself closed.
struct ChannelSink {
    tx: mpsc::Sender<(usize, Event)>,
    index: usize,
    tokens: usize,
    close_after: Option<usize>,
}

impl EventSink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        if matches!(event, Event::Token { .. }) {
            self.tokens += 1;
        }
        self.tx.send((self.index, event)).is_ok() && !self.is_closed()
    }
    fn is_closed(&self) -> bool {
        self.close_after.is_some_and(|n| self.tokens >= n)
    }
}

#[test]
fn batched_requests_match_running_alone_and_free_their_kv() {
    let model = Arc::new(Engine::load(&ModelSource::Default, Device::Cpu).expect("default model"));
    // Small windows and chunks, so streaming heads wrap and prefills interleave with decode.
    let spec = MethodSpec { method: Method::Random, sparsity: Some(0.5), layout: Layout::Head, sink: Some(8), recent: Some(24), chunk: 48, ..Default::default() };
    let method = spec.resolve(model.config()).expect("method");
    let text = "The quick brown fox jumps over the lazy dog. Once upon a time in a small village by the sea, there lived an old fisherman who told stories every evening. ";
    let base = model.tokenizer.encode(&text.repeat(8), true).expect("encode");
    let cases: Vec<(Vec<u32>, SamplingParams)> = (0..7)
        .map(|i| {
            let prompt = base[..12 + i * 37].to_vec();
            let temperature = if i % 3 == 2 { 0.8 } else { 0.0 };
            (prompt, SamplingParams { max_tokens: 6 + 3 * i, temperature, seed: i as u64, ..Default::default() })
        })
        .collect();
    let alone: Vec<Vec<u32>> = cases
        .iter()
        .map(|(p, params)| Runner::new(&model, method.clone()).generate(p, params, |_| true).expect("alone").completion_token_ids)
        .collect();

    let engine = BatchEngine::start(model.clone(), method.clone(), BatchConfig { kv_budget: 1 << 30, max_waiting: 64, max_running: 16 });
    let (tx, rx) = mpsc::channel();
    // One extra request that stops listening after 3 tokens.
    let quitter = cases.len();
    for (index, (prompt, params)) in cases.iter().enumerate().chain([(quitter, &(base[..200].to_vec(), SamplingParams { max_tokens: 40, ..Default::default() }))]) {
        let close_after = (index == quitter).then_some(3);
        let sink = Box::new(ChannelSink { tx: tx.clone(), index, tokens: 0, close_after });
        engine.submit(Request { prompt: prompt.clone(), params: params.clone(), top_logprobs: None, sink }).expect("submit");
    }
    drop(tx);
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); cases.len() + 1];
    let mut done = vec![false; cases.len() + 1];
    while let Ok((i, event)) = rx.recv_timeout(Duration::from_secs(120)) {
        match event {
            Event::Token { id, .. } => {
                assert!(!done[i], "token after Done for request {i}");
                got[i].push(id)
            }
            Event::Done { finish_reason, completion_tokens, .. } => {
                assert_eq!(completion_tokens, got[i].len());
                assert!(finish_reason == FinishReason::Length || finish_reason == FinishReason::Stop);
                done[i] = true;
            }
            Event::Failed(e) => panic!("request {i} failed: {e}"),
        }
        if done[..cases.len()].iter().all(|&d| d) {
            break;
        }
    }
    for (i, want) in alone.iter().enumerate() {
        assert_eq!(&got[i], want, "request {i}: batched tokens differ from running alone");
    }
    assert_eq!(got[quitter].len(), 3, "the quitting request gets no token after it stopped listening");
    assert!(!done[quitter]);
    assert!(engine.stats().decode_steps.load(Ordering::SeqCst) < alone.iter().map(|a| a.len() as u64).sum::<u64>(), "decode steps were batched");
    let t0 = Instant::now();
    while engine.stats().running.load(Ordering::SeqCst) > 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = engine.stats();
    assert_eq!(s.running.load(Ordering::SeqCst), 0);
    assert_eq!(s.kv_retrieval.load(Ordering::SeqCst) + s.kv_streaming.load(Ordering::SeqCst), 0, "all KV freed");
    assert_eq!(s.kv_reserved.load(Ordering::SeqCst), 0);
}

#[test]
fn admission_respects_the_budget_and_the_queue_bound() {
    let model = Arc::new(Engine::load(&ModelSource::Default, Device::Cpu).expect("default model"));
    let method = MethodSpec::default().resolve(model.config()).expect("method");
    let need = method.plan.total_bytes(100);
    let engine = BatchEngine::start(model.clone(), method, BatchConfig { kv_budget: need, max_waiting: 2, max_running: 8 });
    let params = SamplingParams { max_tokens: 50, ..Default::default() };
    let err = engine.check(60, &params, None).unwrap_err().to_string();
    assert!(err.contains("budget"), "{err}");
    let err = engine.check(8150, &params, None).unwrap_err().to_string();
    assert!(err.contains("8150") && err.contains("8192"), "{err}");
    assert!(engine.check(0, &params, None).is_err());
    assert_eq!(engine.max_new_tokens_within_budget(60), 40, "full attention: bytes grow one token at a time");
    assert_eq!(engine.max_new_tokens_within_budget(101), 0);
    assert!(engine.check(10, &SamplingParams { top_p: 0.0, ..params.clone() }, None).unwrap_err().to_string().contains("top_p"));
    // Each request needs the whole budget, so they run one at a time and the rest wait.
    let (tx, rx) = mpsc::channel();
    let mut accepted = 0;
    let mut refused = 0;
    for index in 0..6 {
        let sink = Box::new(ChannelSink { tx: tx.clone(), index, tokens: 0, close_after: None });
        match engine.submit(Request { prompt: vec![1; 50], params: params.clone(), top_logprobs: Some(2), sink }) {
            Ok(()) => accepted += 1,
            Err(e) => {
                assert!(e.to_string().contains("waiting"), "{e}");
                refused += 1
            }
        }
    }
    drop(tx);
    // At least `max_waiting` are taken (more if the engine admits one meanwhile).
    assert!(accepted >= 2 && refused >= 1, "accepted {accepted}, refused {refused}");
    let mut finished = 0;
    let mut max_running = 0;
    while let Ok((_, event)) = rx.recv_timeout(Duration::from_secs(120)) {
        max_running = max_running.max(engine.stats().running.load(Ordering::SeqCst));
        if let Event::Token { logprob, .. } = &event {
            let lp = logprob.as_ref().expect("logprobs asked for");
            assert_eq!(lp.top.len(), 2);
            assert!(lp.logprob <= 0.0 && lp.top[0].1 >= lp.top[1].1);
        }
        if matches!(event, Event::Done { .. }) {
            finished += 1;
            if finished == accepted {
                break;
            }
        }
    }
    assert_eq!(finished, accepted);
    assert_eq!(max_running, 1, "the budget admits one request at a time");
}

#[test]
fn an_f16_cache_fits_twice_the_tokens_in_the_same_budget() {
    let model = Arc::new(Engine::load(&ModelSource::Default, Device::Cpu).expect("default model"));
    let f32_method = MethodSpec::default().resolve(model.config()).expect("method");
    let f16_method = MethodSpec { kv_dtype: Some(duo_engine::KvDtype::F16), ..Default::default() }.resolve(model.config()).expect("method");
    let budget = f32_method.plan.total_bytes(100);
    assert_eq!(f16_method.plan.total_bytes(200), budget, "half the bytes per token");
    let config = BatchConfig { kv_budget: budget, max_waiting: 2, max_running: 8 };
    let (a, b) = (BatchEngine::start(model.clone(), f32_method, config), BatchEngine::start(model.clone(), f16_method, config));
    assert_eq!(a.max_new_tokens_within_budget(60), 40);
    assert_eq!(b.max_new_tokens_within_budget(60), 140);
    let params = SamplingParams { max_tokens: 50, ..Default::default() };
    assert!(a.check(150, &params, None).unwrap_err().to_string().contains("budget"));
    assert!(b.check(150, &params, None).is_ok(), "200 tokens of f16 fit where 100 of f32 do");
}

#[test]
fn streamed_text_equals_decoding_all_tokens_at_once() {
    use duo_engine::TextStream;
    use rand::{Rng, SeedableRng};
    let model = Engine::load(&ModelSource::Default, Device::Cpu).expect("default model");
    let tok = &model.tokenizer;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut cases = vec![tok.encode("Ünïcödé — 東京タワー 🚀🚀 emoji, plain words and numbers 12345.\n\nNext paragraph.", false).expect("encode")];
    // Random ids, byte tokens included: partial and invalid UTF-8 sequences.
    cases.extend((0..30).map(|_| (0..50).map(|_| rng.gen_range(0..tok.vocab_size() as u32)).collect::<Vec<u32>>()));
    for ids in &cases {
        let mut stream = TextStream::new(Vec::new());
        let mut out = String::new();
        for &id in ids {
            out += &stream.push(tok, id).expect("push").delta;
        }
        out += &stream.finish(tok).expect("finish");
        let whole = tok.decode(ids).expect("decode");
        assert_eq!(out, whole, "{ids:?}");
        assert_eq!(stream.text(), whole);
    }
    // A stop string ends the text where it starts, also when it spans tokens.
    let ids = tok.encode("alpha beta gamma STOP delta epsilon", false).expect("encode");
    let mut stream = TextStream::new(vec!["a STO".into()]);
    let mut out = String::new();
    for &id in &ids {
        let step = stream.push(tok, id).expect("push");
        out += &step.delta;
        if step.stopped {
            break;
        }
    }
    out += &stream.finish(tok).expect("finish");
    assert_eq!(out, "alpha beta gamm");
}
