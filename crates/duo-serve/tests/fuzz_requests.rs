//! A bounded fuzzing run over request bodies, part of the test suite: seeded mutations of
//! valid chat and completion requests (every field the server reads) at the JSON level (a
//! field removed, or given a value of another type, a huge or negative number, a long or
//! control-character string, deep nesting) and at the byte level (flips, truncation).
//! Parsing must accept or refuse each with a 4xx error that names the problem; a panic is
//! counted and fails the test. The counts are printed.

use duo_serve::openai::{Endpoint, GenerationRequest, Limits};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::io::Write;
use std::time::{Duration, Instant};

const INPUTS: usize = 50_000;
const BUDGET: Duration = Duration::from_secs(60);

fn seeds() -> Vec<(Endpoint, Value)> {
    vec![
        (
            Endpoint::Chat,
            json!({"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                   "max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 3, "stop": ["\n", "END"], "n": 2,
                   "stream": true, "stream_options": {"include_usage": true}, "logprobs": true, "top_logprobs": 3,
                   "presence_penalty": 0.5, "frequency_penalty": 0.2, "repetition_penalty": 1.1, "logit_bias": {"42": 5}, "user": "u"}),
        ),
        (
            Endpoint::Completion,
            json!({"model": "m", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "logprobs": 2, "echo": false, "seed": 1,
                   "stop": "x", "n": 1, "stream": false, "suffix": "", "best_of": 1}),
        ),
        (Endpoint::Completion, json!({"prompt": [1, 2, 3, 4], "max_completion_tokens": 4})),
    ]
}

fn wild(rng: &mut StdRng, depth: usize) -> Value {
    match rng.gen_range(0..12) {
        0 => Value::Null,
        1 => json!(rng.gen::<bool>()),
        2 => json!(rng.gen::<i64>()),
        3 => json!(-1),
        4 => json!(u64::MAX),
        5 => json!(rng.gen::<f64>() * 1e300),
        6 => json!("\u{0000}\u{001b}<|im_start|>system\n\u{FFFF}"),
        7 => json!("x".repeat(rng.gen_range(0..5000))),
        8 if depth < 40 => json!([wild(rng, depth + 1)]),
        9 if depth < 40 => json!({"a": wild(rng, depth + 1)}),
        10 => json!(""),
        _ => json!(0.5),
    }
}

fn mutate(v: &Value, rng: &mut StdRng) -> Vec<u8> {
    let mut v = v.clone();
    let obj = v.as_object_mut().expect("object");
    let keys: Vec<String> = obj.keys().cloned().collect();
    for _ in 0..rng.gen_range(1..4) {
        let k = &keys[rng.gen_range(0..keys.len())];
        match rng.gen_range(0..6) {
            0 => {
                obj.remove(k);
            }
            1 => {
                obj.insert(k.clone(), wild(rng, 0));
            }
            2 => {
                if let Some(Value::Array(items)) = obj.get_mut(k) {
                    if let Some(first) = items.first_mut() {
                        if let Some(o) = first.as_object_mut() {
                            let inner: Vec<String> = o.keys().cloned().collect();
                            let ik = &inner[rng.gen_range(0..inner.len())];
                            o.insert(ik.clone(), wild(rng, 0));
                        } else {
                            *first = wild(rng, 0);
                        }
                    }
                }
            }
            3 => {
                obj.insert(format!("unknown_{}", rng.gen::<u16>()), wild(rng, 0));
            }
            4 => {
                // Deep nesting.
                let mut nested = json!(1);
                for _ in 0..rng.gen_range(1..200) {
                    nested = json!([nested]);
                }
                obj.insert(k.clone(), nested);
            }
            _ => {}
        }
    }
    let mut bytes = serde_json::to_vec(&v).expect("json");
    match rng.gen_range(0..5) {
        0 => {
            let at = rng.gen_range(0..bytes.len());
            bytes[at] = rng.gen();
        }
        1 => bytes.truncate(rng.gen_range(0..bytes.len())),
        _ => {}
    }
    bytes
}

#[test]
fn fuzzed_requests_are_accepted_or_refused_with_a_named_4xx() {
    let seeds = seeds();
    let limits = Limits::default();
    let mut rng = StdRng::seed_from_u64(7);
    let (mut ok, mut refused, mut panics, mut tried) = (0usize, 0usize, Vec::new(), 0usize);
    let started = Instant::now();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    while tried < INPUTS && started.elapsed() < BUDGET {
        let (endpoint, seed) = &seeds[tried % seeds.len()];
        let body = mutate(seed, &mut rng);
        tried += 1;
        match std::panic::catch_unwind(|| GenerationRequest::parse(*endpoint, &body, &limits, Some(1))) {
            Ok(Ok(r)) => {
                assert!(r.params.validate().is_ok(), "an accepted request has valid sampling parameters");
                ok += 1;
            }
            Ok(Err(e)) => {
                assert!(e.status.is_client_error(), "{e}");
                assert!(!e.to_string().is_empty());
                refused += 1;
            }
            Err(_) => panics.push(String::from_utf8_lossy(&body).chars().take(200).collect::<String>()),
        }
    }
    std::panic::set_hook(hook);
    let peak = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmHWM:")).map(|v| v.trim().to_string())).unwrap_or_default();
    let _ = writeln!(
        std::io::stderr(),
        "fuzzed requests: {tried} bodies in {:.1} s: {refused} refused with a named 4xx, {ok} accepted, {} panics; peak memory {peak}",
        started.elapsed().as_secs_f64(),
        panics.len()
    );
    assert!(panics.is_empty(), "bodies that panicked: {panics:?}");
    assert!(tried >= 10_000 && refused > 0 && ok > 0);
}
