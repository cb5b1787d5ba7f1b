//! `duo bench`: prefill throughput, decode time per token and KV bytes as the context
//! grows, for several attention methods, side by side in one process.
//!
//! The prompt is a deterministic token sequence (seeded), so every method sees the same
//! input; speed and memory do not depend on what the tokens say. With
//! `--random-weights SHAPE` the model is built with seeded random weights of a real shape
//! (e.g. Llama-3-8B), to measure scales whose checkpoints are not on the machine.

use crate::args::MethodArgs;
use anyhow::{Context, Result};
use clap::Args;
use duo_model::{LoadedModel, Logits, Model};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::time::Instant;

/// `duo bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Context lengths (prompt tokens), comma-separated.
    #[arg(long, default_value = "512,2048,8000", value_delimiter = ',')]
    pub lengths: Vec<usize>,
    /// Methods to compare, comma-separated: full, duo, layer (duo with --layout layer), streaming, random, random-layer.
    #[arg(long, default_value = "full,random,random-layer,streaming", value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Decode steps timed after each prefill.
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    /// Write the table as CSV here too.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Output folder: bench.csv, bench.md and curves (prefill.png, decode.png, kv.png, memory.png).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// cpu, or cuda (a binary built by scripts/build-cuda.sh, with --random-weights).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// With --device cuda: contexts longer than this get seeded random KV instead of a
    /// prefill, and only their decode is timed.
    #[arg(long, default_value_t = usize::MAX)]
    pub max_prefill: usize,
    /// With --device cuda: rows of scripts/torch_baseline.py (its --out JSON) to show beside
    /// duo's in the table and the curves.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// With --device cuda: run each decode step launch by launch instead of replaying a
    /// captured CUDA graph (to measure what the graph saves).
    #[arg(long)]
    pub no_graph: bool,
    #[command(flatten)]
    pub method: MethodArgs,
}

struct Row {
    method: String,
    tokens: usize,
    prefill_s: f64,
    decode_ms: f64,
    kv_retrieval: usize,
    kv_streaming: usize,
    retrieval_heads: usize,
    /// Resident memory of the whole process with this run's cache alive.
    rss: usize,
}

/// Resident set size of this process (Linux `VmRSS`), 0 where unknown.
fn resident_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse::<usize>().ok()).map_or(0, |kib| kib * 1024)
}

pub(crate) fn method_args(base: &MethodArgs, name: &str) -> Result<MethodArgs> {
    let mut m = base.clone();
    match name {
        "full" | "duo" | "streaming" | "random" => m.method = name.into(),
        "layer" => {
            m.method = "duo".into();
            m.layout = "layer".into();
        }
        "random-layer" => {
            m.method = "random".into();
            m.layout = "layer".into();
        }
        other => anyhow::bail!("unknown bench method `{other}`"),
    }
    Ok(m)
}

/// Runs the benchmark and prints a markdown table.
pub fn run(a: BenchArgs) -> Result<()> {
    match a.device.as_str() {
        "cpu" => {}
        "cuda" => return crate::bench_cuda::run(&a),
        other => anyhow::bail!("unknown --device `{other}` (expected cpu or cuda)"),
    }
    let mut base = a.method.clone();
    let mut layer_pattern = None;
    let (model, label, token_limit) = match &a.method.random_weights {
        Some(shape) => {
            let config = duo_model::random::shape(shape)?;
            eprintln!("duo bench: building {shape} with seeded random weights (seed {}) ...", a.method.seed);
            let vocab = config.vocab_size;
            (Model::random(config, a.method.seed)?, format!("{shape} (random weights)"), vocab)
        }
        None => {
            let source = a.method.model_source()?;
            if base.pattern.is_none() && matches!(source, duo_model::ModelSource::Default) {
                if let Some((head, layer)) = crate::eval::shipped_patterns() {
                    base.pattern = Some(head);
                    layer_pattern = Some(layer);
                }
            }
            let loaded = LoadedModel::load(&source).context("loading the model")?;
            let limit = loaded.tokenizer.vocab_size().min(loaded.model.config().vocab_size);
            (loaded.model, loaded.path.display().to_string(), limit)
        }
    };
    let c = model.config().clone();
    let max_len = a.lengths.iter().copied().max().unwrap_or(0);
    if max_len + a.decode_tokens > c.context_length {
        anyhow::bail!("{} prompt tokens + {} decode tokens exceed the context length of {}", max_len, a.decode_tokens, c.context_length);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.method.seed);
    let limit = token_limit as u32;
    let prompt: Vec<u32> = (0..max_len).map(|_| rng.gen_range(100.min(limit - 1)..limit)).collect();
    let threads = rayon::current_num_threads();
    eprintln!("duo bench: {label} ({} layers, {} KV heads/layer), {threads} threads", c.n_layers, c.n_kv_heads);
    let mut rows = Vec::new();
    for name in &a.methods {
        let mut args = method_args(&base, name)?;
        if name == "layer" || name == "random-layer" {
            if let Some(p) = &layer_pattern {
                args.pattern = Some(p.clone());
            }
        }
        let method = args.spec()?.resolve(&c)?;
        for &n in &a.lengths {
            let mut kv = method.new_cache();
            let t0 = Instant::now();
            let logits = model.prefill(&prompt[..n], &mut kv, method.chunk, |_| {})?;
            let prefill_s = t0.elapsed().as_secs_f64();
            let mut next = duo_engine::sampler::argmax(&logits);
            let t1 = Instant::now();
            for _ in 0..a.decode_tokens {
                let l = model.forward(&[next], &mut kv, Logits::Last)?;
                next = duo_engine::sampler::argmax(&l);
            }
            let decode_ms = t1.elapsed().as_secs_f64() * 1000.0 / a.decode_tokens.max(1) as f64;
            let b = kv.peak_bytes();
            let rss = resident_bytes();
            let row = Row { method: name.clone(), tokens: n, prefill_s, decode_ms, kv_retrieval: b.retrieval, kv_streaming: b.streaming, retrieval_heads: method.pattern.retrieval_count(), rss };
            eprintln!(
                "{:<13} {:>6} tokens: prefill {:>7.2} s ({:>7.1} tok/s), decode {:>7.2} ms/token, KV {:>8.2} MiB, process {:>8.1} MiB",
                name, n, prefill_s, n as f64 / prefill_s, decode_ms, (b.total()) as f64 / (1 << 20) as f64, rss as f64 / (1 << 20) as f64
            );
            rows.push(row);
        }
    }
    let mut table = String::from(
        "| method | retrieval KV heads | context | prefill s | prefill tok/s | decode ms/token | decode tok/s | KV MiB (retrieval + streaming) | process MiB |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.1} | {:.2} | {:.1} | {:.2} ({:.2} + {:.2}) | {:.1} |\n",
            r.method,
            r.retrieval_heads,
            r.tokens,
            r.prefill_s,
            r.tokens as f64 / r.prefill_s,
            r.decode_ms,
            1000.0 / r.decode_ms,
            (r.kv_retrieval + r.kv_streaming) as f64 / (1 << 20) as f64,
            r.kv_retrieval as f64 / (1 << 20) as f64,
            r.kv_streaming as f64 / (1 << 20) as f64,
            r.rss as f64 / (1 << 20) as f64
        ));
    }
    print!("{table}");
    let mut csv = String::from("method,retrieval_kv_heads,context,prefill_s,decode_ms_per_token,kv_bytes_retrieval,kv_bytes_streaming,process_bytes\n");
    for r in &rows {
        csv.push_str(&format!("{},{},{},{:.4},{:.4},{},{},{}\n", r.method, r.retrieval_heads, r.tokens, r.prefill_s, r.decode_ms, r.kv_retrieval, r.kv_streaming, r.rss));
    }
    if let Some(p) = &a.csv {
        std::fs::write(p, &csv).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("bench.csv"), &csv)?;
        let machine = crate::identify::machine(&candle_core::Device::Cpu);
        std::fs::write(dir.join("bench.md"), format!("{label}; {machine}\n\n{table}"))?;
        let curve = |f: &dyn Fn(&Row) -> f64| -> Vec<crate::plot::Series> {
            a.methods
                .iter()
                .map(|m| crate::plot::Series {
                    name: m.clone(),
                    points: rows.iter().filter(|r| &r.method == m).map(|r| (r.tokens as f64, f(r))).collect(),
                })
                .collect()
        };
        crate::plot::line_chart(&dir.join("prefill.png"), "PREFILL TIME", "context tokens", "seconds", &curve(&|r| r.prefill_s))?;
        crate::plot::line_chart(&dir.join("decode.png"), "DECODE TIME PER TOKEN", "context tokens", "ms per token", &curve(&|r| r.decode_ms))?;
        crate::plot::line_chart(&dir.join("kv.png"), "PEAK KV CACHE", "context tokens", "MiB", &curve(&|r| (r.kv_retrieval + r.kv_streaming) as f64 / 1048576.0))?;
        crate::plot::line_chart(&dir.join("memory.png"), "PROCESS MEMORY", "context tokens", "MiB", &curve(&|r| r.rss as f64 / 1048576.0))?;
        eprintln!("wrote {}", dir.display());
    }
    Ok(())
}
