//! Time to sample one token from a Llama-3-sized vocabulary (128,256 logits), with the
//! filters people use, against sorting the whole vocabulary first (how the sampler first
//! worked), side by side in one run:
//! `cargo run --release -p duo-engine --example sampler_speed`.

use duo_engine::sampler::{reference_filtered_probs, Sampler, SamplingParams};
use std::time::Instant;

fn main() {
    let vocab = 128_256;
    // A peaked distribution like a trained model's: a few large logits over a noisy floor.
    let mut x = 7u64;
    let logits: Vec<f32> = (0..vocab)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let noise = (x % 10_000) as f32 / 1_000.0;
            if i % 4099 == 0 { 18.0 + noise } else { noise }
        })
        .collect();
    let runs = 50;
    println!("| parameters | full sort, ms per token | duo's sampler, ms per token | speed-up |");
    println!("|---|---|---|---|");
    for (name, params) in [
        ("temperature 1", SamplingParams { temperature: 1.0, ..Default::default() }),
        ("temperature 0.7, top_p 0.9", SamplingParams { temperature: 0.7, top_p: 0.9, ..Default::default() }),
        ("temperature 1, top_k 50", SamplingParams { temperature: 1.0, top_k: 50, ..Default::default() }),
        ("temperature 0.8, top_p 0.95, min_p 0.05", SamplingParams { temperature: 0.8, top_p: 0.95, min_p: 0.05, ..Default::default() }),
    ] {
        let t0 = Instant::now();
        let mut kept = 0;
        for _ in 0..runs {
            kept += reference_filtered_probs(&params, &logits).len();
        }
        let base = t0.elapsed().as_secs_f64() * 1e3 / runs as f64;
        let mut s = Sampler::new(params.clone()).expect("valid parameters");
        let t0 = Instant::now();
        let mut ids = 0u64;
        for _ in 0..runs {
            ids += s.sample(&logits).expect("sample") as u64;
        }
        let ours = t0.elapsed().as_secs_f64() * 1e3 / runs as f64;
        println!("| {name} | {base:.2} | {ours:.2} | {:.1}x |", base / ours);
        std::hint::black_box((kept, ids));
    }
}
