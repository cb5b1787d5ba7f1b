//! `duo bench`: prefill time, decode time per token, KV bytes and memory in use as the
//! context grows, for several attention methods, side by side in one process, on any
//! backend (`--device cpu|cuda|cuda:N`): every row runs through the engine's backend seam.
//!
//! The prompt is a deterministic token sequence (seeded), so every method sees the same
//! input; speed and memory do not depend on what the tokens say. With
//! `--random-weights SHAPE` the model is built with seeded random weights of a real shape
//! (e.g. Llama-3-8B), to measure scales whose checkpoints are not on the machine. Contexts
//! longer than `--max-prefill` get seeded random keys and values instead of a prefill
//! (CPU and CUDA), and only their decode is timed; `--batch B` decodes B such sequences at once. Where the backend
//! measures its copy bandwidth (CUDA), each row shows the bandwidth floor of a decode step:
//! the weight bytes read per step plus the KV bytes held, over that bandwidth; where it
//! measures its matrix-product rate (CUDA), each prefill's compute floor: the FLOPs the
//! method needs ([`prefill_flops`]) over that rate.

use crate::args::MethodArgs;
use anyhow::{Context, Result};
use clap::Args;
use duo_engine::backend::{self, Backend, Device};
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
    /// Decode steps after each prefill; on the GPU the first two are untimed (launch by
    /// launch, then the CUDA graph's capture).
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    /// Write the table as CSV here too.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Output folder: bench.csv, bench.md and curves (prefill.png, decode.png, kv.png, memory.png).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Contexts longer than this get seeded random KV instead of a prefill, and only their
    /// decode is timed (CUDA).
    #[arg(long, default_value_t = usize::MAX)]
    pub max_prefill: usize,
    /// Rows of scripts/torch_baseline.py (its --out JSON) to show beside duo's in the table
    /// and the curves.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// The peers' attention kernels (scripts/attention_peers.py --out, measured in the same
    /// device call): duo's decode and prefill attention on the same Llama-3-8B layer shapes,
    /// timed here, and the ratios (CUDA; written to attention.md in --out too).
    #[arg(long)]
    pub attention_peers: Option<PathBuf>,
    /// Sequences decoding together: each length's rows then time one step of this many
    /// sequences, seeded random KV for each (CUDA: in a serving pool, the server's batched
    /// path; CPU: the backend's batched decode), and the decode column is milliseconds per
    /// step of all of them.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[command(flatten)]
    pub method: MethodArgs,
}

struct Row {
    method: String,
    retrieval_heads: usize,
    tokens: usize,
    prefill_s: Option<f64>,
    decode_ms: f64,
    kv: duo_kv::KvBytes,
    /// Process memory (CPU) or device memory in use (GPU) with this run's cache alive.
    memory: usize,
    floor_ms: Option<f64>,
    /// The prefill's compute floor in seconds: FLOPs over the product rate measured in a
    /// burst (the card's highest clock) and sustained for seconds (at its power limit).
    prefill_floor_s: Option<f64>,
    prefill_sustained_floor_s: Option<f64>,
}

/// FLOPs of a prefill of `n` tokens by a method with `pattern` and streaming `window`, counted
/// as the work the method needs: every projection and the MLP for each token (2 per
/// multiply-add), the output head for the last token, and attention at 4 x head_dim per
/// visible (query head, key) pair: causal for retrieval heads, the sink + recent window
/// (the Λ mask) for streaming heads.
pub(crate) fn prefill_flops(c: &duo_core::config::ModelConfig, pattern: &duo_core::pattern::HeadPattern, window: duo_core::cache_spec::Window, n: usize) -> f64 {
    let (h, q, kv) = (c.hidden_size as f64, (c.n_heads * c.head_dim) as f64, (c.n_kv_heads * c.head_dim) as f64);
    let per_token_layer = 2.0 * (h * (q + 2.0 * kv) + q * h + 3.0 * h * c.intermediate_size as f64);
    let products = per_token_layer * c.n_layers as f64 * n as f64 + 2.0 * h * c.vocab_size as f64;
    let causal = n as f64 * (n as f64 + 1.0) / 2.0;
    let (sink, recent) = (window.sink, window.recent);
    // Keys query q sees under the Λ mask: the sinks, then the recent ones past them.
    let lambda: f64 = (0..n).map(|q| (q + 1).min(sink) + (q + 1).saturating_sub(sink.max((q + 1).saturating_sub(recent)))).map(|k| k as f64).sum();
    let group = (c.n_heads / c.n_kv_heads) as f64;
    let pairs: f64 = (0..c.n_layers)
        .flat_map(|l| pattern.layer(l).iter().map(|&r| if r { causal } else { lambda }))
        .sum();
    products + 4.0 * c.head_dim as f64 * group * pairs
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

/// Untimed decode steps before timing on the GPU (the first runs launch by launch, the
/// second captures the CUDA graph).
fn warm_steps(device: Device) -> usize {
    if matches!(device, Device::Cuda(_)) { 2 } else { 0 }
}

/// Runs the benchmark and prints a markdown table.
pub fn run(a: BenchArgs) -> Result<()> {
    let device = a.method.device;
    if a.lengths.is_empty() || a.lengths.contains(&0) {
        anyhow::bail!("--lengths must list context lengths of at least 1 token");
    }
    if a.decode_tokens < warm_steps(device) + 1 {
        anyhow::bail!("--decode-tokens must be at least {} on {device} ({} untimed steps, then at least one timed)", warm_steps(device) + 1, warm_steps(device));
    }
    for name in &a.methods {
        method_args(&a.method, name)?.spec()?;
    }
    if a.batch == 0 {
        anyhow::bail!("--batch takes 1 sequence or more");
    }
    if a.batch > duo_cuda::pool::MAX_SEQS {
        anyhow::bail!("--batch takes at most {} sequences", duo_cuda::pool::MAX_SEQS);
    }
    let peers = match (&a.attention_peers, device) {
        (Some(path), Device::Cuda(_)) => Some(peer_rows(path)?),
        (Some(_), _) => anyhow::bail!("--attention-peers compares GPU kernels: use it with --device cuda"),
        (None, _) => None,
    };
    // Shapes and arguments are checked before any device is opened or model read.
    let random_config = a.method.random_weights.as_deref().map(duo_model::random::shape).transpose()?;
    let load = Load::start();
    let (backend, label, token_limit): (Box<dyn Backend>, String, usize) = match (&a.method.random_weights, random_config) {
        (Some(shape), Some(config)) => {
            let vocab = config.vocab_size;
            let parallel = a.method.parallel()?;
            let place = parallel.describe(device);
            // The placement (its pattern read and checked) before any GPU is opened.
            let placement = match parallel {
                crate::args::Parallel::One => None,
                _ => Some(a.method.placement(&config)?),
            };
            let building = format!("duo bench: building {shape} with seeded random weights (seed {}) on {place}", a.method.seed());
            let built = match (parallel.shards()?, placement) {
                (Some(shards), Some(placement)) => {
                    eprintln!("{building} ({} placement) ...", placement.strategy());
                    backend::random_split(shards, placement, config, a.method.seed())?
                }
                _ => {
                    eprintln!("{building} ...");
                    backend::random(device, config, a.method.seed())?
                }
            };
            (built, format!("{shape} (random weights)"), vocab)
        }
        _ => {
            let (e, _) = a.method.load()?;
            let limit = e.tokenizer.vocab_size().min(e.config().vocab_size);
            (e.backend, e.path.display().to_string(), limit)
        }
    };
    let load = load.finish();
    eprintln!("duo bench: loaded in {:.2} s; peak anonymous host memory during the load {:.0} MiB (RssAnon, file-backed pages of memory-mapped weights excluded)", load.0, load.1 as f64 / MIB);
    let b: &dyn Backend = backend.as_ref();
    let c = b.config().clone();
    let max_len = a.lengths.iter().copied().max().unwrap_or(0);
    if max_len + a.decode_tokens > c.context_length {
        if a.method.random_weights.is_none() {
            anyhow::bail!("{} prompt tokens + {} decode tokens exceed the context length of {}", max_len, a.decode_tokens, c.context_length);
        }
        // Random weights say nothing anyway; speed and memory past the trained length are
        // what "up to what fits" asks for.
        eprintln!("note: {max_len} tokens exceed the trained context of {}; measuring speed and memory only", c.context_length);
    }
    let floor = b.decode_floor()?;
    let machine = b.describe();
    if let Some((weights, bw)) = floor {
        eprintln!("duo bench: {label} on {machine}; copy bandwidth {:.0} GB/s; {:.2} GiB of weights read per decode step", bw / 1e9, weights as f64 / GIB);
    } else {
        eprintln!("duo bench: {label} ({} layers, {} KV heads/layer) on {machine}", c.n_layers, c.n_kv_heads);
    }
    let floor_ms = |kv: usize| floor.map(|(w, bw)| (w + kv) as f64 / bw * 1000.0);
    // The product rate only where a prefill is timed; where it cannot be measured (its 512 MiB
    // of operands do not fit beside another process, say) the rows go without the floor.
    let product_rate = if a.lengths.iter().any(|&n| n <= a.max_prefill) {
        b.product_rate().unwrap_or_else(|e| {
            eprintln!("note: the matrix-product rate could not be measured ({e:#}); prefill rows show no compute floor");
            None
        })
    } else {
        None
    };
    if let Some(rate) = product_rate {
        eprintln!(
            "duo bench: matrix products at {:.0} TFLOPS in a burst, {:.0} sustained for 2 s (a prefill's compute floor is its FLOPs over these)",
            rate.burst / 1e12,
            rate.sustained / 1e12
        );
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.method.seed());
    let limit = token_limit as u32;
    // At least the warm-up's 64 tokens, also when every length gets synthetic KV.
    let prompt: Vec<u32> = (0..max_len.min(a.max_prefill).max(64)).map(|_| rng.gen_range(100.min(limit - 1)..limit)).collect();
    let mut rows = Vec::new();
    for name in &a.methods {
        let method = method_args(&a.method, name)?.spec()?.resolve(&c)?;
        let plan = backend::kv_plan(b, &method);
        // Warm-up on a short sequence: compiles GPU kernels and lets cuBLAS pick its algorithms.
        if warm_steps(device) > 0 {
            let mut seq = b.new_sequence(&method, 256)?;
            let logits = b.forward(seq.as_mut(), &prompt[..64.min(prompt.len())], duo_engine::backend::Logits::Last)?;
            let t = b.greedy_step(seq.as_mut(), duo_engine::sampler::argmax(&logits))?;
            b.greedy_step(seq.as_mut(), t)?;
        }
        for &n in &a.lengths {
            if a.batch > 1 {
                match batched_row(b, &method, &plan, n, &a) {
                    Ok(mut row) => {
                        row.method = format!("{name} (batch {})", a.batch);
                        row.floor_ms = floor_ms(row.kv.total());
                        eprintln!(
                            "{:<13} {:>8} tokens x {}: decode {:>8.2} ms/step ({:.1} tok/s){}, KV {:>9.2} MiB",
                            name,
                            n,
                            a.batch,
                            row.decode_ms,
                            a.batch as f64 * 1000.0 / row.decode_ms,
                            row.floor_ms.map_or(String::new(), |f| format!(" (floor {f:.2}, {:.2}x)", row.decode_ms / f)),
                            row.kv.total() as f64 / MIB
                        );
                        rows.push(row);
                    }
                    Err(e) => eprintln!("{name:<13} {n:>8} tokens x {}: could not run ({e:#})", a.batch),
                }
                continue;
            }
            let mut seq = match b.new_sequence(&method, n + a.decode_tokens) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{name:<13} {n:>8} tokens: does not fit ({e})");
                    continue;
                }
            };
            let (prefill_s, mut next) = if n <= a.max_prefill {
                let t0 = Instant::now();
                let logits = b.forward(seq.as_mut(), &prompt[..n], duo_engine::backend::Logits::Last)?;
                (Some(t0.elapsed().as_secs_f64()), duo_engine::sampler::argmax(&logits))
            } else {
                b.fill_synthetic(seq.as_mut(), n, a.method.seed())?;
                (None, 1000.min(limit - 1))
            };
            for _ in 0..warm_steps(device) {
                next = b.greedy_step(seq.as_mut(), next)?;
            }
            let timed = a.decode_tokens - warm_steps(device);
            let t1 = Instant::now();
            for _ in 0..timed {
                next = b.greedy_step(seq.as_mut(), next)?;
            }
            let decode_ms = t1.elapsed().as_secs_f64() * 1000.0 / timed as f64;
            let kv = backend::plan_bytes(&plan, seq.tokens());
            let kv_bytes = kv.total();
            let flops = prefill_flops(&c, &method.pattern, method.window, n);
            let floor = |rate: fn(&backend::ProductRate) -> f64| prefill_s.and(product_rate.as_ref()).map(|r| flops / rate(r));
            let (prefill_floor_s, prefill_sustained_floor_s) = (floor(|r| r.burst), floor(|r| r.sustained));
            let row = Row {
                method: name.clone(),
                retrieval_heads: method.pattern.retrieval_count(),
                tokens: n,
                prefill_s,
                decode_ms,
                kv,
                memory: b.memory_in_use().unwrap_or(0),
                floor_ms: floor_ms(kv_bytes),
                prefill_floor_s,
                prefill_sustained_floor_s,
            };
            eprintln!(
                "{:<13} {:>8} tokens: prefill {}{}, decode {:>8.2} ms/token{}, KV {:>9.2} MiB, memory in use {:>9.1} MiB",
                name,
                n,
                prefill_s.map_or("synthetic KV".into(), |s| format!("{s:>8.2} s ({:>8.1} tok/s)", n as f64 / s)),
                match (prefill_s, prefill_floor_s, prefill_sustained_floor_s) {
                    (Some(s), Some(f), Some(g)) => format!(" (compute floor {f:.2} s in a burst, {:.2}x; {g:.2} s sustained, {:.2}x)", s / f, s / g),
                    _ => String::new(),
                },
                decode_ms,
                row.floor_ms.map_or(String::new(), |f| format!(" (floor {f:.2}, {:.2}x)", decode_ms / f)),
                kv_bytes as f64 / MIB,
                row.memory as f64 / MIB
            );
            rows.push(row);
        }
    }
    let mut names: Vec<String> = if a.batch > 1 { a.methods.iter().map(|m| format!("{m} (batch {})", a.batch)).collect() } else { a.methods.clone() };
    if let Some(path) = &a.baseline {
        rows.extend(baseline_rows(path, &c, b.kv_element_bytes(), &floor_ms, product_rate)?);
        names.push("pytorch".into());
    }
    write(&a, &rows, &names, &format!("{label}; {machine}; loaded in {:.2} s, peak anonymous host memory during the load {:.0} MiB", load.0, load.1 as f64 / MIB))?;
    if let (Some(peers), Device::Cuda(ordinal)) = (peers, device) {
        let table = attention_table(ordinal, &peers)?;
        println!("{table}");
        if let Some(dir) = &a.out {
            std::fs::write(dir.join("attention.md"), &table)?;
        }
    }
    Ok(())
}

/// One length's row of `--batch`: `a.batch` sequences of `n` seeded random tokens of KV,
/// then decode steps of all of them at once, logits back to the host and each row's argmax
/// taken there: on a paging backend (CUDA) in a serving pool sized as the server sizes it
/// (90% of the card) through the pool's step, the server's path; elsewhere (CPU) each
/// sequence in its own cache through the backend's batched decode. Milliseconds per step,
/// the KV of every row.
fn batched_row(b: &dyn Backend, method: &duo_engine::ResolvedMethod, plan: &duo_core::cache_spec::CachePlan, n: usize, a: &BenchArgs) -> Result<Row> {
    let options = backend::PoolOptions { max_num_seqs: a.batch, max_num_batched_tokens: a.batch.max(16), ..Default::default() };
    let pool = b.kv_pool(method, &options)?;
    // Without a pool (which sizes itself to the device) every sequence allocates its own
    // cache: refuse a batch whose caches would not fit the memory there is, before any is made.
    if let (None, Some(free)) = (&pool, b.available_memory()) {
        let need = backend::plan_bytes(plan, n + a.decode_tokens).total() * a.batch;
        if need > free {
            anyhow::bail!("{} caches of {} tokens need {:.2} GiB, {:.2} GiB are available", a.batch, n + a.decode_tokens, need as f64 / GIB, free as f64 / GIB);
        }
    }
    let mut seqs = Vec::with_capacity(a.batch);
    for i in 0..a.batch {
        let mut seq = match &pool {
            Some(pool) => pool.new_sequence()?,
            None => b.new_sequence(method, n + a.decode_tokens)?,
        };
        b.fill_synthetic(seq.as_mut(), n, a.method.seed() + i as u64)?;
        seqs.push(seq);
    }
    let vocab = b.config().vocab_size;
    let mut next = vec![1000.min(vocab as u32 - 1); a.batch];
    let pool = pool.as_deref();
    for _ in 0..warm_steps(a.method.device) {
        batched_step(b, pool, &mut seqs, &mut next, vocab)?;
    }
    let timed = a.decode_tokens - warm_steps(a.method.device);
    let t = Instant::now();
    for _ in 0..timed {
        batched_step(b, pool, &mut seqs, &mut next, vocab)?;
    }
    let decode_ms = t.elapsed().as_secs_f64() * 1000.0 / timed as f64;
    let one = backend::plan_bytes(plan, seqs[0].tokens());
    let kv = duo_kv::KvBytes { retrieval: one.retrieval * a.batch, streaming: one.streaming * a.batch };
    Ok(Row { method: String::new(), retrieval_heads: method.pattern.retrieval_count(), tokens: n, prefill_s: None, decode_ms, kv, memory: b.memory_in_use().unwrap_or(0), floor_ms: None, prefill_floor_s: None, prefill_sustained_floor_s: None })
}

/// One decode step of every sequence of `seqs` (token `next[i]` to sequence `i`), through
/// `pool`'s step where the sequences live in one, else the backend's batched decode; then
/// each row's greedy next token into `next`.
fn batched_step(b: &dyn Backend, pool: Option<&dyn backend::KvPool>, seqs: &mut [Box<dyn backend::Sequence>], next: &mut [u32], vocab: usize) -> Result<()> {
    let logits = match pool {
        Some(pool) => {
            let mut rows: Vec<(&mut dyn backend::Sequence, u32)> = seqs.iter_mut().zip(next.iter()).map(|(s, &t)| (s.as_mut() as &mut dyn backend::Sequence, t)).collect();
            pool.step(&mut rows, None)?.decode
        }
        None => {
            let mut rows: Vec<&mut dyn backend::Sequence> = seqs.iter_mut().map(|s| s.as_mut() as &mut dyn backend::Sequence).collect();
            b.decode_batch(next, &mut rows)?
        }
    };
    for (i, t) in next.iter_mut().enumerate() {
        *t = duo_engine::sampler::argmax(&logits[i * vocab..(i + 1) * vocab]);
    }
    Ok(())
}

/// One row of scripts/attention_peers.py: a peer kernel's time on one shape.
struct PeerRow {
    kernel: String,
    phase: String,
    layer: String,
    /// Decode: cached tokens; prefill: (chunk, first).
    shape: (usize, usize),
    ms: f64,
}

fn peer_rows(path: &std::path::Path) -> Result<Vec<PeerRow>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let rows = v["rows"].as_array().with_context(|| format!("{}: no `rows` list (is it scripts/attention_peers.py's output?)", path.display()))?;
    rows.iter()
        .map(|r| {
            let field = |k: &str| r[k].as_str().map(str::to_string).with_context(|| format!("{}: a row without `{k}`", path.display()));
            let num = |k: &str| r[k].as_u64().map(|n| n as usize).with_context(|| format!("{}: a row without `{k}`", path.display()));
            let phase = field("phase")?;
            let shape = match phase.as_str() {
                "decode" => (num("tokens")?, 0),
                "prefill" => (num("chunk")?, num("first")?),
                p => anyhow::bail!("{}: unknown phase `{p}`", path.display()),
            };
            // Shapes the timing can allocate on one GPU: at most 16M cached tokens and a
            // chunk of at most 1M queries.
            if shape.0 == 0 || shape.0 > 1 << 24 || shape.1 > 1 << 24 || (phase == "prefill" && shape.0 > 1 << 20) {
                anyhow::bail!("{}: a {phase} row's shape {shape:?} is outside 1..16M tokens (chunks up to 1M)", path.display());
            }
            let layer = field("layer")?;
            if layer != "full" && layer != "duo 0.5" {
                anyhow::bail!("{}: unknown layer `{layer}`", path.display());
            }
            Ok(PeerRow { kernel: field("kernel")?, phase, layer, shape, ms: r["ms"].as_f64().with_context(|| format!("{}: a row without `ms`", path.display()))? })
        })
        .collect()
}

/// duo's attention on each peer row's shape (the Llama-3-8B layer: 32 query / 8 KV heads of
/// 128, bf16; duo 0.5 = 4 retrieval and 4 streaming KV heads), each shape timed once, and
/// the table of both.
fn attention_table(ordinal: usize, peers: &[PeerRow]) -> Result<String> {
    use duo_cuda::decode_attention::{time_decode_attention, DecodeKernel, KvType};
    let gpu = duo_cuda::Gpu::new(ordinal)?;
    let kinds = |layer: &str| if layer == "full" { vec![true; 8] } else { vec![true, true, true, true, false, false, false, false] };
    let mut duo_ms: std::collections::HashMap<(String, String, (usize, usize)), f64> = Default::default();
    let mut table = String::from("| attention | layer | shape | peer | peer ms | duo ms | duo / peer time |\n|---|---|---|---|---|---|---|\n");
    for p in peers {
        let key = (p.phase.clone(), p.layer.clone(), p.shape);
        let ms = match duo_ms.get(&key) {
            Some(&ms) => ms,
            None => {
                let ms = if p.phase == "decode" {
                    time_decode_attention(&gpu, 32, 128, &kinds(&p.layer), p.shape.0, 1, 64, None, DecodeKernel::best(128, 4, KvType::Bf16, 2), KvType::Bf16, 50)?.0
                } else {
                    duo_cuda::time_prefill_attention(&gpu, &kinds(&p.layer), p.shape.0, p.shape.1, KvType::Bf16, 3)?.0
                };
                duo_ms.insert(key, ms);
                ms
            }
        };
        let shape = if p.phase == "decode" { format!("1 x {} tokens", p.shape.0) } else { format!("{} queries after {}", p.shape.0, p.shape.1) };
        table.push_str(&format!("| {} | {} | {shape} | {} | {:.3} | {ms:.3} | {:.2}x |\n", p.phase, p.layer, p.kernel, p.ms, ms / p.ms));
    }
    Ok(table)
}

/// Times a model load and samples the process's anonymous memory (`RssAnon`) meanwhile.
struct Load {
    started: Instant,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: std::thread::JoinHandle<usize>,
}

fn rss_anon() -> usize {
    duo_engine::backend::cpu::proc_bytes("/proc/self/status", "RssAnon").unwrap_or(0)
}

impl Load {
    fn start() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let sampler = std::thread::spawn(move || {
            let mut peak = rss_anon();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_anon());
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            peak.max(rss_anon())
        });
        Self { started: Instant::now(), stop, sampler }
    }

    /// Seconds and the peak anonymous bytes.
    fn finish(self) -> (f64, usize) {
        let secs = self.started.elapsed().as_secs_f64();
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (secs, self.sampler.join().unwrap_or(0))
    }
}

/// The rows of a PyTorch baseline JSON (scripts/torch_baseline.py).
fn baseline_rows(path: &std::path::Path, c: &duo_core::config::ModelConfig, element: usize, floor_ms: &dyn Fn(usize) -> Option<f64>, product_rate: Option<backend::ProductRate>) -> Result<Vec<Row>> {
    let full = duo_core::pattern::HeadPattern::all_retrieval(c.n_layers, c.n_kv_heads);
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let rows_json: Vec<serde_json::Value> = serde_json::from_str(&text).with_context(|| format!("{} is not a JSON list of baseline rows", path.display()))?;
    let mut rows = Vec::new();
    for r in rows_json {
        let tokens = r["context"].as_u64().context("a baseline row without `context`")? as usize;
        if let Some(e) = r["error"].as_str() {
            eprintln!("pytorch {tokens:>8} tokens: {e}");
            continue;
        }
        let kv_bytes = tokens * c.n_layers * c.n_kv_heads * c.head_dim * 2 * element;
        // Full attention's work, as duo's full row counts it.
        let flops = prefill_flops(c, &full, duo_core::cache_spec::Window { sink: 0, recent: 0 }, tokens);
        rows.push(Row {
            method: "pytorch".into(),
            retrieval_heads: c.n_layers * c.n_kv_heads,
            tokens,
            prefill_s: r["prefill_s"].as_f64(),
            decode_ms: r["decode_ms_per_token"].as_f64().context("a baseline row without `decode_ms_per_token`")?,
            kv: duo_kv::KvBytes { retrieval: kv_bytes, streaming: 0 },
            memory: (r["device_used_gib"].as_f64().unwrap_or(0.0) * GIB) as usize,
            floor_ms: floor_ms(kv_bytes),
            prefill_floor_s: product_rate.map(|rate| flops / rate.burst),
            prefill_sustained_floor_s: product_rate.map(|rate| flops / rate.sustained),
        });
    }
    Ok(rows)
}

/// The table (stdout and `--out`), the CSV and the curves.
fn write(a: &BenchArgs, rows: &[Row], names: &[String], title: &str) -> Result<()> {
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String, none: &str| v.map_or(none.to_string(), f);
    let mut table = String::from(
        "| method | retrieval KV heads | context | prefill s | prefill tok/s | decode ms/token (with --batch: ms/step) | floor ms | over floor | KV MiB (retrieval + streaming) | memory in use MiB | prefill floor s (burst / sustained) | prefill over floor (burst / sustained) |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.2} | {} | {} | {:.2} ({:.2} + {:.2}) | {:.1} | {} | {} |\n",
            r.method,
            r.retrieval_heads,
            r.tokens,
            opt(r.prefill_s, &|s| format!("{s:.2}"), "(synthetic KV)"),
            opt(r.prefill_s, &|s| format!("{:.1}", r.tokens as f64 / s), "-"),
            r.decode_ms,
            opt(r.floor_ms, &|f| format!("{f:.2}"), "-"),
            opt(r.floor_ms, &|f| format!("{:.2}x", r.decode_ms / f), "-"),
            r.kv.total() as f64 / MIB,
            r.kv.retrieval as f64 / MIB,
            r.kv.streaming as f64 / MIB,
            r.memory as f64 / MIB,
            match (r.prefill_floor_s, r.prefill_sustained_floor_s) {
                (Some(f), Some(g)) => format!("{f:.2} / {g:.2}"),
                _ => "-".into(),
            },
            match (r.prefill_s, r.prefill_floor_s, r.prefill_sustained_floor_s) {
                (Some(s), Some(f), Some(g)) => format!("{:.2}x / {:.2}x", s / f, s / g),
                _ => "-".into(),
            }
        ));
    }
    print!("{table}");
    let mut csv = String::from("method,retrieval_kv_heads,context,prefill_s,decode_ms_per_token,floor_ms,kv_bytes_retrieval,kv_bytes_streaming,memory_bytes,prefill_floor_s,prefill_sustained_floor_s\n");
    for r in rows {
        let f = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
        csv.push_str(&format!(
            "{},{},{},{},{:.4},{},{},{},{},{},{}\n",
            r.method,
            r.retrieval_heads,
            r.tokens,
            f(r.prefill_s),
            r.decode_ms,
            f(r.floor_ms),
            r.kv.retrieval,
            r.kv.streaming,
            r.memory,
            f(r.prefill_floor_s),
            f(r.prefill_sustained_floor_s)
        ));
    }
    if let Some(p) = &a.csv {
        std::fs::write(p, &csv).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("bench.csv"), &csv)?;
        std::fs::write(dir.join("bench.md"), format!("{title}\n\n{table}"))?;
        let curve = |f: &dyn Fn(&Row) -> Option<f64>| -> Vec<crate::plot::Series> {
            names.iter().map(|m| crate::plot::Series { name: m.clone(), points: rows.iter().filter(|r| &r.method == m).filter_map(|r| Some((r.tokens as f64, f(r)?))).collect() }).collect()
        };
        crate::plot::line_chart(&dir.join("prefill.png"), "PREFILL TIME", "context tokens", "seconds", &curve(&|r| r.prefill_s))?;
        crate::plot::line_chart(&dir.join("decode.png"), "DECODE TIME PER TOKEN", "context tokens", "ms per token", &curve(&|r| Some(r.decode_ms)))?;
        crate::plot::line_chart(&dir.join("kv.png"), "KV CACHE", "context tokens", "MiB", &curve(&|r| Some(r.kv.total() as f64 / MIB)))?;
        crate::plot::line_chart(&dir.join("memory.png"), "MEMORY IN USE", "context tokens", "MiB", &curve(&|r| Some(r.memory as f64 / MIB)))?;
        eprintln!("wrote {}", dir.display());
    }
    Ok(())
}

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

#[cfg(test)]
mod tests {
    use super::prefill_flops;
    use duo_core::cache_spec::{lambda_sees, Window};
    use duo_core::pattern::HeadPattern;

    #[test]
    fn a_full_prefill_of_llama_3_8b_at_128k_counts_what_benchmarks_claims() {
        // BENCHMARKS.md: 4.5e15 FLOPs of causal attention and 1.8e15 of products, 6.3e15.
        let c = duo_model::random::shape("llama-3-8b").unwrap();
        let full = HeadPattern::all_retrieval(c.n_layers, c.n_kv_heads);
        let flops = prefill_flops(&c, &full, Window { sink: 64, recent: 256 }, 131_072);
        assert!((flops / 6.33e15 - 1.0).abs() < 0.01, "{flops:e}");
    }

    #[test]
    fn streaming_heads_count_the_pairs_the_lambda_mask_shows() {
        let c = duo_model::random::shape("llama-3-8b").unwrap();
        let (full, streaming) = (HeadPattern::all_retrieval(c.n_layers, c.n_kv_heads), HeadPattern::all_streaming(c.n_layers, c.n_kv_heads));
        for (sink, recent, n) in [(4, 16, 300), (64, 256, 200), (1, 2, 5), (0, 8, 40)] {
            let w = Window { sink, recent };
            let causal = (n * (n + 1) / 2) as f64;
            let seen = (0..n).flat_map(|q| (0..=q).map(move |k| (q, k))).filter(|&(q, k)| lambda_sees(sink, recent, q, k)).count() as f64;
            // Every query head of every layer: 4 x head_dim per pair.
            let per_pair = 4.0 * (c.head_dim * c.n_heads * c.n_layers) as f64;
            let diff = prefill_flops(&c, &full, w, n) - prefill_flops(&c, &streaming, w, n);
            assert!((diff - per_pair * (causal - seen)).abs() < 1.0, "sink {sink} recent {recent} n {n}: {diff} vs {}", per_pair * (causal - seen));
        }
    }
}
