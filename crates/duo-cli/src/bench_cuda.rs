//! `duo bench --device cuda`: the same comparison on one GPU, with the model running on duo's
//! CUDA backend (bf16 weights, bf16 KV cache, tensor-core prefill attention, the decode step
//! as one CUDA graph).
//!
//! Each method gets its own sequence (caches sized for the context plus the decode steps).
//! Contexts up to `--max-prefill` are prefilled for real in chunks of `--chunk`; longer ones
//! have their caches filled with seeded random keys and values, and only decode is timed
//! (decode reads the same bytes whatever the cache says). Beside each decode time: the
//! bandwidth floor, the bytes a step must read (weights + KV held) over the card's measured
//! copy bandwidth.

use crate::bench::{method_args, BenchArgs};
use anyhow::{Context, Result};
use duo_cuda::model::{CacheLayout, GpuConfig, GpuSequence, GpuWeights};
use duo_cuda::Gpu;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Instant;

struct Row {
    method: String,
    retrieval_heads: usize,
    tokens: usize,
    prefill_s: Option<f64>,
    decode_ms: f64,
    kv_bytes: usize,
    gpu_bytes: usize,
    floor_ms: f64,
    graph_steps: usize,
}

/// Runs the GPU benchmark.
pub fn run(a: &BenchArgs) -> Result<()> {
    let shape = a.method.random_weights.as_deref().context("--device cuda runs models of real shape with random weights: pass --random-weights")?;
    if a.method.prefill != "lambda" {
        anyhow::bail!("--device cuda prefills streaming heads with the Λ mask only (--prefill lambda)");
    }
    if a.lengths.is_empty() || a.lengths.contains(&0) {
        anyhow::bail!("--lengths must list context lengths of at least 1 token");
    }
    if a.decode_tokens < 3 {
        anyhow::bail!("--decode-tokens must be at least 3 with --device cuda (2 untimed steps: launch by launch, then graph capture)");
    }
    let config = duo_model::random::shape(shape)?;
    let gc = GpuConfig::from_model(&config);
    let max_len = a.lengths.iter().copied().max().unwrap_or(0);
    if max_len + a.decode_tokens > config.context_length {
        // Random weights say nothing anyway; speed and memory past the trained length are
        // what "up to what fits" asks for.
        eprintln!("note: {max_len} tokens exceed {shape}'s trained context of {}; measuring speed and memory only", config.context_length);
    }
    let gpu = Arc::new(Gpu::new(0)?);
    let card = gpu.name();
    let bandwidth = gpu.copy_bandwidth()?;
    eprintln!("duo bench: {card}, copy bandwidth {:.0} GB/s; building {shape} with seeded random bf16 weights ...", bandwidth / 1e9);
    let weights = Arc::new(GpuWeights::random(&gpu, gc.clone(), a.method.seed)?);
    // The bandwidth floor of a decode step: every weight and every cached key and value read once.
    let floor_ms = |kv_bytes: usize| (gc.weight_bytes() + kv_bytes) as f64 / bandwidth * 1000.0;
    let (idle, total) = gpu.memory_used()?;
    eprintln!("weights {:.2} GiB; device memory in use {:.2} of {:.2} GiB", gc.weight_bytes() as f64 / GIB, idle as f64 / GIB, total as f64 / GIB);
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.method.seed);
    let prompt: Vec<u32> = (0..max_len.min(a.max_prefill)).map(|_| rng.gen_range(100..config.vocab_size as u32)).collect();
    let mut rows = Vec::new();
    for name in &a.methods {
        let args = method_args(&a.method, name)?;
        let method = args.spec()?.resolve(&config)?;
        let retrieval: Vec<Vec<bool>> = (0..config.n_layers).map(|l| method.pattern.layer(l).to_vec()).collect();
        // Warm-up on a short sequence: compiles the kernels and lets cuBLAS pick its algorithms.
        {
            let warm = CacheLayout { retrieval: retrieval.clone(), sink: method.window.sink, recent: method.window.recent, chunk: 64, max_tokens: 256 };
            let mut seq = GpuSequence::new(gpu.clone(), weights.clone(), warm)?;
            seq.prefill(&prompt[..64.min(prompt.len())], |_| {})?;
            let t = seq.decode(None)?;
            seq.decode(Some(t))?;
        }
        for &n in &a.lengths {
            let real = n <= a.max_prefill;
            let layout = CacheLayout {
                retrieval: retrieval.clone(),
                sink: method.window.sink,
                recent: method.window.recent,
                chunk: if real { method.chunk.min(n.max(1)) } else { 1 },
                max_tokens: n + a.decode_tokens + 1,
            };
            let mut seq = match GpuSequence::new(gpu.clone(), weights.clone(), layout.clone()) {
                Ok(mut s) => {
                    s.use_graph = !a.no_graph;
                    s
                }
                Err(e) => {
                    eprintln!("{name:<8} {n:>8} tokens: does not fit ({e})");
                    continue;
                }
            };
            let prefill_s = if real {
                let t0 = Instant::now();
                seq.prefill(&prompt[..n], |_| {})?;
                Some(t0.elapsed().as_secs_f64())
            } else {
                seq.fill_synthetic(n, 1000, a.method.seed)?;
                None
            };
            // Two untimed steps: the first runs launch by launch, the second captures the graph.
            let mut next = seq.decode(None)?;
            next = seq.decode(Some(next))?;
            let timed = a.decode_tokens - 2; // at least 1: checked above
            let t1 = Instant::now();
            for _ in 0..timed {
                next = seq.decode(Some(next))?;
            }
            let decode_ms = t1.elapsed().as_secs_f64() * 1000.0 / timed as f64;
            let kv_bytes = layout.used_bytes(gc.head_dim, seq.tokens());
            let (used, _) = gpu.memory_used()?;
            let floor_ms = floor_ms(kv_bytes);
            let row = Row { method: name.clone(), retrieval_heads: method.pattern.retrieval_count(), tokens: n, prefill_s, decode_ms, kv_bytes, gpu_bytes: used, floor_ms, graph_steps: seq.graph_steps };
            eprintln!(
                "{:<8} {:>8} tokens: prefill {}, decode {:>7.2} ms/token (floor {:.2}, {:.2}x), KV {:>6.2} GiB, GPU {:>6.2} GiB",
                name,
                n,
                prefill_s.map_or("synthetic".into(), |s| format!("{s:>7.2} s")),
                decode_ms,
                floor_ms,
                decode_ms / floor_ms,
                kv_bytes as f64 / GIB,
                used as f64 / GIB
            );
            rows.push(row);
        }
    }
    let mut names = a.methods.clone();
    if let Some(path) = &a.baseline {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let rows_json: Vec<serde_json::Value> = serde_json::from_str(&text).with_context(|| format!("{} is not a JSON list of baseline rows", path.display()))?;
        for r in rows_json {
            let tokens = r["context"].as_u64().context("a baseline row without `context`")? as usize;
            let engine = r["engine"].as_str().unwrap_or("baseline").to_string();
            if let Some(e) = r["error"].as_str() {
                eprintln!("{engine} {tokens:>8} tokens: {e}");
                continue;
            }
            let kv_bytes = tokens * gc.n_layers * gc.n_kv_heads * gc.head_dim * 2 * 2;
            rows.push(Row {
                method: "pytorch".into(),
                retrieval_heads: gc.n_layers * gc.n_kv_heads,
                tokens,
                prefill_s: r["prefill_s"].as_f64(),
                decode_ms: r["decode_ms_per_token"].as_f64().context("a baseline row without `decode_ms_per_token`")?,
                kv_bytes,
                gpu_bytes: (r["device_used_gib"].as_f64().unwrap_or(0.0) * GIB) as usize,
                floor_ms: floor_ms(kv_bytes),
                graph_steps: 0,
            });
        }
        names.push("pytorch".into());
    }
    let mut table = String::from("| method | retrieval KV heads | context | prefill s | decode ms/token | floor ms | over floor | KV GiB | GPU GiB in use |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in &rows {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2}x | {:.2} | {:.2} |\n",
            r.method,
            r.retrieval_heads,
            r.tokens,
            r.prefill_s.map_or("(synthetic KV)".into(), |s| format!("{s:.2}")),
            r.decode_ms,
            r.floor_ms,
            r.decode_ms / r.floor_ms,
            r.kv_bytes as f64 / GIB,
            r.gpu_bytes as f64 / GIB
        ));
    }
    print!("{table}");
    let mut csv = String::from("method,retrieval_kv_heads,context,prefill_s,decode_ms_per_token,floor_ms,kv_bytes,gpu_bytes_in_use,graph_steps\n");
    for r in &rows {
        csv.push_str(&format!(
            "{},{},{},{},{:.4},{:.4},{},{},{}\n",
            r.method,
            r.retrieval_heads,
            r.tokens,
            r.prefill_s.map_or(String::new(), |s| format!("{s:.4}")),
            r.decode_ms,
            r.floor_ms,
            r.kv_bytes,
            r.gpu_bytes,
            r.graph_steps
        ));
    }
    if let Some(p) = &a.csv {
        std::fs::write(p, &csv).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("bench.csv"), &csv)?;
        std::fs::write(dir.join("bench.md"), format!("{shape} (random bf16 weights); {card}; copy bandwidth {:.0} GB/s\n\n{table}", bandwidth / 1e9))?;
        let curve = |f: &dyn Fn(&Row) -> Option<f64>| -> Vec<crate::plot::Series> {
            names
                .iter()
                .map(|m| crate::plot::Series { name: m.clone(), points: rows.iter().filter(|r| &r.method == m).filter_map(|r| Some((r.tokens as f64, f(r)?))).collect() })
                .collect()
        };
        crate::plot::line_chart(&dir.join("prefill.png"), "PREFILL TIME (GPU)", "context tokens", "seconds", &curve(&|r| r.prefill_s))?;
        crate::plot::line_chart(&dir.join("decode.png"), "DECODE TIME PER TOKEN (GPU)", "context tokens", "ms per token", &curve(&|r| Some(r.decode_ms)))?;
        crate::plot::line_chart(&dir.join("memory.png"), "GPU MEMORY IN USE", "context tokens", "GiB", &curve(&|r| Some(r.gpu_bytes as f64 / GIB)))?;
        eprintln!("wrote {}", dir.display());
    }
    Ok(())
}

const GIB: f64 = (1u64 << 30) as f64;
