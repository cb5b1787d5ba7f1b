//! `duo`: run Llama-family models with DuoAttention / ZigzagAttention KV caches.
//!
//! Subcommands: `generate` (text from a prompt), `score` (teacher-forced log-probs and
//! perplexity), `bench`, `eval`, `demo`, `identify`, `pattern show` (what a head pattern
//! keeps, with a gate heatmap) and `serve` (the OpenAI-compatible server).

mod args;
mod bench;
mod eval;
mod identify;
mod plot;
mod serve;

use anyhow::{bail, Context, Result};
use args::{GenerateArgs, PatternCommand, ScoreArgs};
use clap::{Parser, Subcommand};
use duo_core::pattern::HeadGates;
use duo_engine::{Runner, SamplingParams};
use duo_model::Message;
use serde_json::json;
use std::io::{Read, Write};

#[derive(Parser)]
#[command(name = "duo", version, about = "Long-context LLM inference that keeps a full KV cache only for the heads that need it")]
struct Cli {
    /// CPU threads for the CPU backend's kernels (default: every core this process may use).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt.
    Generate(GenerateArgs),
    /// Teacher-forced scoring: log-probs of a continuation, or perplexity of a text.
    Score(ScoreArgs),
    /// Prefill and decode speed and KV bytes as the context grows, per method.
    Bench(bench::BenchArgs),
    /// Passkey and needle-in-a-haystack grids over lengths, depths and methods.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// One long passkey prompt with full attention, DuoAttention and the layer layout.
    Demo(eval::DemoArgs),
    /// Learn which KV heads need a full cache (DuoAttention optimisation) and write a pattern.
    Identify(identify::IdentifyArgs),
    /// Inspect head patterns.
    #[command(subcommand)]
    Pattern(PatternCommand),
    /// OpenAI-compatible HTTP server with continuous batching.
    Serve(serve::ServeArgs),
    /// Write a loadable safetensors folder of a real shape with seeded random weights (the
    /// GPU's `--random-weights` model), to exercise the ordinary loader at 7-8B scale.
    RandomCheckpoint {
        /// llama-3-8b, llama-2-7b, smollm2-135m, or a config.json.
        #[arg(long)]
        shape: String,
        /// The folder to write (config.json, tokenizer.json, safetensors shards).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Seed of the weights (the same as `--random-weights --seed`).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Parity of duo's CUDA kernels against their CPU references on seeded random inputs (GPU host).
    CudaCheck {
        /// Seed of the random inputs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Only these groups of checks, comma-separated: ops, prefill, dequant, decode, model,
        /// tp (tensor parallelism over every visible GPU; by default where two or more are visible).
        #[arg(long)]
        only: Option<String>,
        /// Only the prefill, decode and model groups' cases whose name starts with words
        /// containing one of these texts, separated by `|`, ignoring case: the group's words and
        /// the cache (e.g. "K8V4 with bf16 windows|K8V4 cache, bf16 windows"), not the decode kernel or
        /// the shape; a prefill case by its whole printed name (e.g. "Int4 cache, wgmma"). The
        /// other groups run whole; no such case matched is an error.
        #[arg(long)]
        cases: Option<String>,
        /// Parity only: no kernel timings.
        #[arg(long)]
        no_timings: bool,
        /// Only these kernel timings, comma-separated: decode, split, prefill, gemv, tp (the all-reduce where two GPUs or more are visible, and half a layer's decode attention at 1M tokens), bytes (one row's decode attention over a range of lengths and at equal bytes: the launch's fixed part) (default: all but tp and bytes).
        #[arg(long)]
        timings: Option<String>,
    },
}

/// Every allocation goes through the budget allocator, so that untrusted work (chat
/// templates from model files) can be given a memory budget (`duo_model::budget`).
#[global_allocator]
static ALLOCATOR: duo_model::budget::BudgetAllocator = duo_model::budget::BudgetAllocator;

fn main() {
    duo_cuda::nccl::keep_nvlink_multicast_off();
    duo_model::budget::keep_step_buffers_mapped();
    // Warnings (e.g. the server's ignored request fields) show by default; DUO_LOG=info|debug for more.
    let filter = tracing_subscriber::EnvFilter::try_from_env("DUO_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        let set = if (1..=4096).contains(&n) {
            rayon::ThreadPoolBuilder::new().num_threads(n).build_global().map_err(|e| e.to_string())
        } else {
            Err(format!("must be from 1 to 4096 (got {n})"))
        };
        if let Err(e) = set {
            eprintln!("error: --threads: {e}");
            std::process::exit(2);
        }
    }
    let result = match cli.command {
        Command::Generate(a) => generate(a),
        Command::Score(a) => score(a),
        Command::Bench(a) => bench::run(a),
        Command::Identify(a) => identify::run(a),
        Command::Eval(c) => eval::run(c),
        Command::Demo(a) => eval::demo(a),
        Command::Pattern(PatternCommand::Show(a)) => pattern_show(a),
        Command::Serve(a) => serve::run(a),
        Command::CudaCheck { seed, only, cases, no_timings, timings } => cuda_check(seed, only.as_deref(), cases.as_deref(), no_timings, timings.as_deref()),
        Command::RandomCheckpoint { shape, out, seed } => random_checkpoint(&shape, &out, seed),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn random_checkpoint(shape: &str, out: &std::path::Path, seed: u64) -> Result<()> {
    let config = duo_model::random::shape(shape)?;
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} exists and is not empty; give a new folder", out.display());
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template("writing {bar:30} {bytes}/{total_bytes} [{elapsed_precise} < {eta_precise}]").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    let t0 = std::time::Instant::now();
    let w = duo_engine::random_checkpoint::write(&config, seed, out, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    println!("{shape} (seed {seed}): {:.2} GiB of bf16 weights in {} file(s) in {}, written in {:.1} s", w.bytes as f64 / (1u64 << 30) as f64, w.files.len(), out.display(), t0.elapsed().as_secs_f64());
    Ok(())
}

fn cuda_check(seed: u64, only: Option<&str>, cases: Option<&str>, no_timings: bool, timings: Option<&str>) -> Result<()> {
    // "tp" only when asked for (it allocates 4 GiB caches and, with two GPUs, an NCCL group),
    // "bytes" too (a measurement of what a launch costs beside its bytes).
    const TIMINGS: [&str; 6] = ["decode", "split", "prefill", "gemv", "tp", "bytes"];
    let timed: Vec<&str> = timings.map_or(TIMINGS[..4].to_vec(), |t| t.split(',').map(str::trim).collect());
    if let Some(bad) = timed.iter().find(|t| !TIMINGS.contains(t)) {
        bail!("--timings {bad}: the timings are {}", TIMINGS.join(", "));
    }
    let gpu = std::sync::Arc::new(duo_cuda::Gpu::new(0)?);
    println!("{}", gpu.name());
    // Tensor parallelism ("tp") runs where two GPUs or more are visible, over all of them.
    let visible = duo_cuda::runtime::device_count();
    let mut every: Vec<&str> = duo_cuda::CHECK_GROUPS.to_vec();
    if visible >= 2 {
        every.push("tp");
    }
    let groups: Vec<&str> = only.map_or(every, |o| o.split(',').map(str::trim).collect());
    if let Some(bad) = groups.iter().find(|g| !duo_cuda::CHECK_GROUPS.contains(g) && **g != "tp") {
        bail!("--only {bad}: the groups are {}, tp", duo_cuda::CHECK_GROUPS.join(", "));
    }
    let (mut failed, mut total, mut filtered) = (0, 0, 0);
    for group in groups {
        // Each group's results as it ends, so that a fault names the group it happened in.
        println!("checking {group}");
        let results = if group == "tp" {
            let gpus = duo_cuda::runtime::open_gpus(visible.max(2))?;
            duo_cuda::model::check_tensor_parallel(&gpus, seed)?
        } else {
            duo_cuda::check_group(&gpu, group, seed, cases)?
        };
        if matches!(group, "prefill" | "decode" | "model") {
            filtered += results.len();
        }
        for r in results {
            println!(
                "{} {:<80} max |gpu - cpu| = {:.3e} (bound {:.0e})",
                if r.ok() { "ok  " } else { "FAIL" },
                r.case,
                r.max_abs_err,
                r.bound
            );
            failed += usize::from(!r.ok());
            total += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} of {total} kernel parity checks failed");
    }
    if let (Some(c), 0) = (cases, filtered) {
        bail!("--cases {c}: no prefill, decode or model case of the groups run has such a name");
    }
    if no_timings {
        return Ok(());
    }
    // One layer of Llama-3-8B (32 query / 8 KV heads of 128): every KV head retrieval, or
    // half of them streaming (64 + 256 tokens), in one fused launch over a paged pool (blocks
    // of 64); bf16 and fp8 caches side by side on the tensor cores, the CUDA-core kernel (the
    // reference path) beside them; one long sequence, then batches.
    use duo_cuda::decode_attention::{time_decode_attention, DecodeKernel, KvType};
    println!(
        "copy bandwidth {:.0} GB/s (read + written)",
        gpu.copy_bandwidth()? / 1e9
    );
    // The all-reduce of tensor parallelism over every visible GPU (two or more): a decode
    // row, 16 rows, and prefill chunks of 1,024 and 4,096 rows of Llama-3-8B's 4,096 values.
    // With it, the decode attention one GPU of two runs at 1M tokens (16 query / 4 KV heads
    // of a Llama-3-8B layer) beside the whole layer's on one GPU: whether half a layer
    // streams its cache as fast per byte.
    let duo = [true, true, true, true, false, false, false, false];
    if timed.contains(&"tp") {
        let shapes: [(&str, usize, &[bool]); 4] = [
            ("whole layer, full", 32, &[true; 8]),
            ("whole layer, duo 0.5", 32, &duo),
            ("half a layer, full", 16, &[true; 4]),
            ("half a layer, duo 0.5", 16, &[true, true, false, false]),
        ];
        for (name, heads, kinds) in shapes {
            let (ms, bytes) = time_decode_attention(&gpu, heads, 128, kinds, 1 << 20, 1, 64, None, DecodeKernel::Tensor, KvType::Bf16, 20)?;
            println!("time decode attention, Llama-3-8B {name:<22} 1 x 1048576 tokens, Bf16: {ms:.3} ms per launch, {:.0} MB of KV read, {:.0} GB/s", bytes as f64 / 1e6, bytes as f64 / ms / 1e6);
        }
    }
    if timed.contains(&"tp") && visible >= 2 {
        let gpus = duo_cuda::runtime::open_gpus(visible)?;
        for (n, eager, graph) in duo_cuda::model::time_all_reduce(&gpus, &[4096, 16 * 4096, 1024 * 4096, 4096 * 4096], 64)? {
            println!(
                "time all-reduce over {visible} GPUs, {n:>8} f32 ({:>6.2} MB): {eager:8.1} us launched one by one, {graph:8.1} us from a graph ({:.0} GB/s algorithm bandwidth)",
                n as f64 * 4e-6,
                n as f64 * 4e-3 / graph
            );
        }
    }
    // DUO_TIME_KV=bf16|fp8|int8|int4|k8v4 times that cache type's kernels alone (decode: the
    // tensor-core kernel; prefill: both), so that a profiler's first launches of a kernel are
    // its; DUO_TIME_LAYER=full|duo|stream does the same for the prefill timings' layers.
    let only: Option<KvType> = match std::env::var("DUO_TIME_KV").as_deref() {
        Ok("bf16") => Some(KvType::Bf16),
        Ok("fp8") => Some(KvType::Fp8),
        Ok("int8") => Some(KvType::Int8),
        Ok("int4") => Some(KvType::Int4),
        Ok("k8v4") => Some(KvType::K8V4),
        Ok(other) => bail!("DUO_TIME_KV={other}: bf16, fp8, int8, int4 or k8v4"),
        Err(_) => None,
    };
    let decode_layers: &[(&str, [bool; 8])] = if timed.contains(&"decode") { &[("full", [true; 8]), ("duo 0.5", duo)] } else { &[] };
    for &(name, kinds) in decode_layers {
        for (tokens, rows) in [
            (131_072usize, 1usize),
            (524_288, 1),
            (131_072, 9),
            (16_384, 25),
            (4096, 64),
        ] {
            let mut bf16_ms = f64::NAN;
            for (kernel, kv) in [
                (DecodeKernel::Cores(2), KvType::Bf16),
                (DecodeKernel::Tensor, KvType::Bf16),
                (DecodeKernel::Tensor, KvType::Fp8),
                (DecodeKernel::Tensor, KvType::Int8),
                (DecodeKernel::Tensor, KvType::Int4),
                (DecodeKernel::Tensor, KvType::K8V4),
            ]
            .into_iter()
            .filter(|&(kernel, kv)| only.is_none_or(|o| kernel == DecodeKernel::Tensor && kv == o))
            {
                let split = (rows > 1).then_some(duo_cuda::pool::DECODE_SPLIT);
                let (ms, bytes) = time_decode_attention(
                    &gpu, 32, 128, &kinds, tokens, rows, 64, split, kernel, kv, 50,
                )?;
                if kernel == DecodeKernel::Tensor && kv == KvType::Bf16 {
                    bf16_ms = ms;
                }
                let vs = if kv.is_quantised() && bf16_ms.is_finite() {
                    format!(", {:.2}x the bf16 time", ms / bf16_ms)
                } else {
                    String::new()
                };
                println!(
                    "time decode attention, Llama-3-8B layer, {name:<8} {rows:>2} x {tokens:>6} tokens, {:<8} {kv:?}: {ms:.3} ms per launch, {:.0} MB of KV read, {:.0} GB/s{vs}",
                    format!("{kernel:?}"),
                    bytes as f64 / 1e6,
                    bytes as f64 / ms / 1e6
                );
            }
        }
    }
    // "bytes" (only when asked for): what a launch costs beside its bytes. The full layer over
    // a range of lengths (its time against its bytes: the fixed part is the intercept), over
    // 65,536 tokens (the bytes of the duo 0.5 layer at 131,072), and the duo 0.5 layer's four
    // retrieval KV heads alone (16 query heads) at 131,072, beside the duo 0.5 layer itself:
    // whether the streaming heads cost anything in the launch, and what half the bytes cost
    // with the same fixed part. PyTorch's peers are in scripts/torch_decode_attention.py.
    if timed.contains(&"bytes") {
        let rows: [(&str, usize, &[bool], usize); 8] = [
            ("full", 32, &[true; 8], 2048),
            ("full", 32, &[true; 8], 8192),
            ("full", 32, &[true; 8], 32_768),
            ("full", 32, &[true; 8], 65_536),
            ("full", 32, &[true; 8], 131_072),
            ("retrieval half", 16, &[true; 4], 131_072),
            ("duo 0.5", 32, &duo, 131_072),
            ("full", 32, &[true; 8], 262_144),
        ];
        for kv in [KvType::Bf16, KvType::Fp8, KvType::Int4] {
            for &(name, heads, kinds, tokens) in &rows {
                let (ms, bytes) = time_decode_attention(&gpu, heads, 128, kinds, tokens, 1, 64, None, DecodeKernel::Tensor, kv, 100)?;
                println!(
                    "time decode attention bytes, Llama-3-8B {name:<14} ({heads} query heads) 1 x {tokens:>6} tokens, {kv:?}: {ms:.4} ms per launch, {:.1} MB of KV read, {:.0} GB/s",
                    bytes as f64 / 1e6,
                    bytes as f64 / ms / 1e6
                );
            }
        }
    }
    // Split lengths of one long row over quantised caches (a half and a quarter of the bytes
    // of bf16 per split).
    let sweeps: &[(&str, [bool; 8], KvType)] = if timed.contains(&"split") {
        &[("full", [true; 8], KvType::Fp8), ("duo 0.5", duo, KvType::Fp8), ("full", [true; 8], KvType::Int4), ("duo 0.5", duo, KvType::Int4)]
    } else {
        &[]
    };
    for &(name, kinds, kv) in sweeps {
        let mut line = format!("split sweep, {kv:?}, Llama-3-8B layer, {name:<8} 1 x 131072 tokens:");
        for split in [1024usize, 2048, 4096, 8192, 16384] {
            let (ms, bytes) = time_decode_attention(
                &gpu,
                32,
                128,
                &kinds,
                131_072,
                1,
                64,
                Some(split),
                DecodeKernel::Tensor,
                kv,
                30,
            )?;
            line += &format!(" {split}: {ms:.3} ms {:.0} GB/s;", bytes as f64 / ms / 1e6);
        }
        println!("{line}");
    }
    // A decode step's products on Llama-3-8B's shapes (qkv, o, gate/up, down, LM head) at 1
    // to 4 rows: cuBLAS against duo's matrix-vector kernel, as bandwidth of the weights.
    if timed.contains(&"gemv") {
        for (name, k, n) in [("qkv", 4096usize, 6144usize), ("o", 4096, 4096), ("gate/up", 4096, 28672), ("down", 14336, 4096), ("LM head", 4096, 128256)] {
            for t in [1usize, 4] {
                let blas = duo_cuda::time_linear(&gpu, t, k, n, false, 100)?;
                let own = duo_cuda::time_linear(&gpu, t, k, n, true, 100)?;
                let gb = (k * n * 2) as f64 / 1e6;
                println!("time linear, Llama-3-8B {name:<8} {t} x [{n} x {k}]: cuBLAS {blas:.4} ms ({:.0} GB/s), duo gemv {own:.4} ms ({:.0} GB/s), {:.2}x", gb / blas, gb / own, blas / own);
            }
        }
        // The same products as a step runs them with the kernels around them: RMSNorm before
        // qkv and gate/up, the SiLU after gate/up or before down; separate kernels and cuBLAS
        // against duo's kernel with them folded in (DUO_STEP_GEMV=1 and =2's forms).
        use duo_cuda::StepProduct::{DownSiluIn, GateUpNormedSilu, QkvNormed};
        for (name, which, k, n) in [("norm+qkv", QkvNormed, 4096usize, 6144usize), ("norm+gate/up+SiLU", GateUpNormedSilu, 4096, 28672), ("SiLU+down", DownSiluIn, 14336, 4096)] {
            for t in [1usize, 4] {
                let apart = duo_cuda::time_step_product(&gpu, which, t, k, n, false, 100)?;
                let fused = duo_cuda::time_step_product(&gpu, which, t, k, n, true, 100)?;
                let gb = (k * n * 2) as f64 / 1e6;
                println!("time step product, Llama-3-8B {name:<17} {t} x [{n} x {k}]: kernels and cuBLAS {apart:.4} ms ({:.0} GB/s), duo fused {fused:.4} ms ({:.0} GB/s), {:.2}x", gb / apart, gb / fused, apart / fused);
            }
        }
    }
    let layer_only = std::env::var("DUO_TIME_LAYER").ok();
    if let Some(l) = layer_only.as_deref().filter(|l| !["full", "duo", "stream"].contains(l)) {
        bail!("DUO_TIME_LAYER={l}: full, duo or stream");
    }
    let prefill_layers: Vec<(&str, [bool; 8])> = if timed.contains(&"prefill") {
        [("full", [true; 8]), ("duo 0.5", duo), ("stream", [false; 8])]
            .into_iter()
            .filter(|(name, _)| layer_only.as_deref().is_none_or(|l| name.starts_with(l)))
            .collect()
    } else {
        Vec::new()
    };
    if !prefill_layers.is_empty() {
        // The prefill kernels' forms as built here, so that the timings below name what ran.
        let kinds = [KvType::Bf16, KvType::Int8].map(|kv| format!("{kv:?} {:?}", gpu.prefill_kernel_for(128, kv)));
        println!(
            "prefill kernels for heads of 128: {}; the wgmma form over bf16: {}; over quantised caches: {}",
            kinds.join(", "),
            duo_cuda::runtime::prefill_wg_form(128, KvType::Bf16),
            duo_cuda::runtime::prefill_wg_form(128, KvType::Int8)
        );
    }
    // The rate of the causal retrieval work, or what a layer without any is.
    let rate = |ms: f64, flops: f64| if flops > 0.0 { format!("{:.0} TFLOPS (causal retrieval work)", flops / ms / 1e9) } else { "streaming heads only".to_string() };
    for &(name, kinds) in &prefill_layers {
        for (t, first) in [(16_384usize, 16_384usize), (16_384, 114_688)] {
            for kv in [KvType::Bf16, KvType::Fp8, KvType::Int8, KvType::Int4, KvType::K8V4].into_iter().filter(|&kv| only.is_none_or(|o| kv == o)) {
                // The mma.sync kernel (every GPU's), and Hopper's wgmma kernel beside it where it
                // runs (over quantised caches where it is chosen: unless DUO_PREFILL_WG_QUANTISED=0).
                use duo_cuda::runtime::PrefillKernel;
                let (ms, flops) = duo_cuda::time_prefill_attention_with(&gpu, PrefillKernel::Mma, &kinds, t, first, kv, 3)?;
                println!("time prefill attention, Llama-3-8B layer, {name:<8} chunk {t} at {first}..{}, {kv:?}: {ms:.2} ms, {}", first + t, rate(ms, flops));
                let wgmma = if kv.is_quantised() { gpu.prefill_kernel_for(128, kv) == PrefillKernel::Wgmma } else { gpu.wgmma_prefill_runs(128, kv) };
                if wgmma {
                    let (ms, flops) = duo_cuda::time_prefill_attention_with(&gpu, PrefillKernel::Wgmma, &kinds, t, first, kv, 3)?;
                    println!("time prefill attention, Llama-3-8B layer, {name:<8} chunk {t} at {first}..{}, {kv:?} (wgmma kernel): {ms:.2} ms, {}", first + t, rate(ms, flops));
                }
            }
        }
    }
    Ok(())
}

fn read_prompt(a: &GenerateArgs) -> Result<String> {
    match (&a.prompt, &a.prompt_file) {
        (Some(_), Some(_)) => bail!("give the prompt either as an argument or with --prompt-file, not both"),
        (Some(p), None) => Ok(p.clone()),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display())),
        (None, None) => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("reading the prompt from standard input")?;
            Ok(s)
        }
    }
}

fn generate(a: GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        seed: a.method.seed(),
        max_tokens: a.max_tokens,
        stop: a.stop.clone(),
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        repetition_penalty: a.repetition_penalty,
        logit_bias: a.logit_bias.clone(),
        structured: match (&a.json_schema, a.json_object) {
            (Some(p), _) => Some(duo_engine::constraint::Structured::JsonSchema(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)),
            (None, true) => Some(duo_engine::constraint::Structured::JsonObject),
            (None, false) => None,
        },
        ignore_eos: false,
    };
    params.validate()?;
    let prompt = read_prompt(&a)?;
    let (model, method) = a.method.load()?;
    let ids = if a.chat {
        let tpl = model.template.as_ref().context("--chat: this model ships no chat template")?;
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(Message { role: "system".into(), content: s.clone() });
        }
        messages.push(Message { role: "user".into(), content: prompt });
        model.tokenizer.encode_chat(&tpl.render_pieces(&messages, true)?)?
    } else {
        model.tokenizer.encode(&prompt, true)?
    };
    let stdout = std::io::stdout();
    let on_text = |piece: &str| {
        if !a.json {
            let mut out = stdout.lock();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
        true
    };
    let device = model.backend().describe();
    let pattern = method.pattern.clone();
    let window = method.window;
    let gen = Runner::new(&model, method).generate(&ids, &params, on_text)?;
    if a.json {
        let out = json!({
            "device": device,
            "prompt_token_ids": gen.prompt_token_ids,
            "completion_token_ids": gen.completion_token_ids,
            "text": gen.text,
            "finish_reason": gen.finish_reason,
            "prefill_tokens_per_s": gen.prefill_tokens_per_s(),
            "decode_tokens_per_s": gen.decode_tokens_per_s(),
            "kv_cache_bytes": gen.peak_kv.total(),
            "kv_cache_bytes_retrieval": gen.peak_kv.retrieval,
            "kv_cache_bytes_streaming": gen.peak_kv.streaming,
            "retrieval_kv_heads": pattern.retrieval_count(),
            "streaming_kv_heads": pattern.streaming_count(),
            "streaming_window": {"sink": window.sink, "recent": window.recent},
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!();
        eprintln!(
            "[{device}: {} prompt tokens, {:.1} tok/s prefill; {} new tokens, {:.1} tok/s decode; KV peak {:.2} MiB ({} retrieval / {} streaming KV heads, window {} + {}); finish: {:?}]",
            gen.prompt_token_ids.len(),
            gen.prefill_tokens_per_s(),
            gen.completion_token_ids.len(),
            gen.decode_tokens_per_s(),
            gen.peak_kv.total() as f64 / (1 << 20) as f64,
            pattern.retrieval_count(),
            pattern.streaming_count(),
            window.sink,
            window.recent,
            gen.finish_reason
        );
    }
    Ok(())
}

fn score(a: ScoreArgs) -> Result<()> {
    let read = |p: &std::path::Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let (model, method) = a.method.load()?;
    let runner = Runner::new(&model, method);
    let scores = match (&a.prompt_file, &a.continuation_file, &a.text_file) {
        (Some(p), Some(c), None) => {
            let prompt = model.tokenizer.encode(&read(p)?, true)?;
            let cont = model.tokenizer.encode(&read(c)?, false)?;
            if cont.is_empty() {
                bail!("the continuation is empty");
            }
            runner.score(&prompt, &cont)?
        }
        (None, None, Some(t)) => {
            let ids = model.tokenizer.encode(&read(t)?, true)?;
            runner.perplexity(&ids, a.window)?
        }
        _ => bail!("give --prompt-file and --continuation-file, or --text-file"),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json!({
            "tokens": scores.tokens,
            "top1_accuracy": scores.top1_accuracy,
            "mean_logprob": scores.mean_logprob,
            "perplexity": scores.perplexity,
            "kv_cache_bytes": scores.peak_kv.total(),
        }))?);
    } else {
        for t in &scores.tokens {
            let text = model.tokenizer.id_to_token(t.id).unwrap_or_default();
            println!("{:>8} {:>24} logprob {:>9.4} rank {:>6}{}", t.id, format!("{text:?}"), t.logprob, t.rank, if t.top1 { "  top-1" } else { "" });
        }
        println!("tokens {}  top-1 accuracy {:.4}  mean logprob {:.4}  perplexity {:.4}", scores.tokens.len(), scores.top1_accuracy, scores.mean_logprob, scores.perplexity);
    }
    Ok(())
}

/// The most tokens `t` with `plan.total_bytes(t) <= budget` (0 when not even the streaming
/// heads' windows fit), by bisection over a count that only grows with `t`.
fn longest_context(plan: &duo_core::CachePlan, budget: usize) -> usize {
    if plan.total_bytes(1) > budget {
        return 0;
    }
    let (mut lo, mut hi) = (1usize, 1usize << 40);
    if plan.total_bytes(hi) <= budget {
        return hi;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if plan.total_bytes(mid) <= budget { lo = mid } else { hi = mid }
    }
    lo
}

/// `duo pattern show --tensor-parallel N`: the contiguous split engines use against the
/// retrieval-aware placement (`duo_core::placement`), per GPU: retrieval heads, KV bytes at
/// `tokens`, the longest context that fits `budget` bytes per GPU, and the retrieval heads
/// each layer's slowest GPU holds (a step's attention time at long context); then the
/// retrieval-aware placement layer by layer.
fn show_placements(pattern: &duo_core::HeadPattern, placements: &[duo_core::Placement; 2], tokens: usize, budget: Option<usize>, plan_of: impl Fn(&duo_core::HeadPattern) -> duo_core::CachePlan) -> Result<()> {
    use duo_core::Placement;
    let gpus = placements[0].gpus();
    let floor: usize = pattern.retrieval_per_layer().iter().map(|r| r.div_ceil(gpus)).sum();
    let shares: Vec<String> = Placement::shares(pattern.n_kv_heads(), gpus)?.iter().map(usize::to_string).collect();
    println!("\ntensor parallelism over {gpus} GPUs ({} KV heads per GPU per layer), KV at {tokens} tokens:", shares.join(" / "));
    let fit = if budget.is_some() { " | longest context per GPU budget" } else { "" };
    println!("| placement | retrieval KV heads per GPU | KV GiB per GPU | largest / smallest{fit} | slowest GPU's retrieval heads, summed over layers (least possible: {floor}) |");
    println!("|---|---|---|---|{}---|", if budget.is_some() { "---|" } else { "" });
    for p in placements {
        // Each GPU's share as a pattern of its own (its heads of every layer), so the cache
        // arithmetic is the one every other figure uses.
        let shares: Vec<duo_core::HeadPattern> = (0..gpus).map(|g| p.share(pattern, g)).collect::<duo_core::Result<_>>()?;
        let plans: Vec<duo_core::CachePlan> = shares.iter().map(&plan_of).collect();
        let heads: Vec<String> = p.heads_per_gpu(pattern).iter().map(|h| h.retrieval.to_string()).collect();
        let bytes: Vec<usize> = plans.iter().map(|plan| plan.total_bytes(tokens)).collect();
        let gib: Vec<String> = bytes.iter().map(|b| format!("{:.2}", *b as f64 / (1u64 << 30) as f64)).collect();
        let (max, min) = (bytes.iter().copied().max().unwrap_or(0), bytes.iter().copied().min().unwrap_or(0));
        let fits = match budget {
            Some(b) => format!(" | {}", plans.iter().map(|plan| longest_context(plan, b)).min().unwrap_or(0)),
            None => String::new(),
        };
        let name = p.strategy().to_string();
        println!("| {name} | {} | {} | {:.2}x{fits} | {} |", heads.join(" / "), gib.join(" / "), max as f64 / min.max(1) as f64, p.slowest_gpu_retrieval_heads(pattern));
    }
    println!("retrieval-aware placement, KV heads per GPU (* = retrieval):");
    let aware = &placements[1];
    for l in 0..pattern.n_layers() {
        let per: Vec<String> = (0..gpus)
            .map(|g| {
                let heads: Vec<String> = aware.heads_on(l, g).iter().map(|&h| format!("{h}{}", if pattern.is_retrieval(l, h) { "*" } else { "" })).collect();
                format!("gpu {g}: {}", heads.join(" "))
            })
            .collect();
        println!("  layer {l:>2}  {}", per.join("  |  "));
    }
    Ok(())
}

fn pattern_show(a: args::PatternShowArgs) -> Result<()> {
    let gates = HeadGates::load(&a.dir).with_context(|| format!("loading the pattern in {}", a.dir.display()))?;
    let pattern = match a.threshold {
        Some(t) => gates.binarise_threshold(t)?,
        None => gates.binarise_sparsity(a.sparsity, a.layout.parse()?)?,
    };
    // Placed (and a GPU count that cannot split the heads refused) before anything is printed.
    let placements = match a.tensor_parallel {
        Some(gpus) => Some([duo_core::Placement::contiguous(&pattern, gpus)?, duo_core::Placement::retrieval_aware(&pattern, gpus)?]),
        None => None,
    };
    let per_layer = pattern.retrieval_per_layer();
    let (layers, heads) = (gates.n_layers(), gates.n_kv_heads());
    println!("pattern {}: {layers} layers x {heads} KV heads", a.dir.display());
    match a.threshold {
        Some(t) => println!("threshold {t}: {} retrieval / {} streaming KV heads", pattern.retrieval_count(), pattern.streaming_count()),
        None => println!(
            "sparsity {} ({} layout): {} retrieval / {} streaming KV heads (reference quantile threshold {:.7})",
            a.sparsity,
            a.layout,
            pattern.retrieval_count(),
            pattern.streaming_count(),
            gates.quantile(a.sparsity)?
        ),
    }
    println!("retrieval heads per layer: {per_layer:?}");
    let pure_full = per_layer.iter().filter(|&&c| c == heads).count();
    let pure_stream = per_layer.iter().filter(|&&c| c == 0).count();
    println!("layers all-retrieval: {pure_full}, all-streaming: {pure_stream}, mixed: {}", layers - pure_full - pure_stream);
    let trained = gates.trained_window()?;
    let (sink, recent) = duo_engine::method::deploy_window(a.sink, a.recent, trained);
    let window = duo_core::cache_spec::Window::new(sink, recent)?;
    let from = match (trained, a.sink.is_some() || a.recent.is_some()) {
        (_, true) => "as given",
        (Some(_), false) => "the window the pattern was trained against, from its config.json",
        (None, false) => "the default: the pattern's config.json names none",
    };
    println!("streaming window: sink {} + recent {} ({from})", window.sink, window.recent);
    let dtype = a.kv_dtype.as_deref().map(str::parse::<duo_engine::KvDtype>).transpose()?;
    let (bits, scales) = dtype.map_or((8 * a.bytes_per_element, 0), |d| (d.bits(), d.scale_bytes()));
    if bits == 0 {
        bail!("--bytes-per-element must be at least 1");
    }
    if !(1..=4096).contains(&a.head_dim) {
        bail!("--head-dim must be from 1 to 4096 (got {})", a.head_dim);
    }
    let streaming = a.kv_dtype_streaming.as_deref().map(str::parse::<duo_engine::KvDtype>).transpose()?;
    // A GPU bf16 window beside a quantised cache takes whole rows of the cache's type (its
    // paged pool), scale words included: as many as `gpu_window_width` says.
    let plan_with = |p: &duo_core::HeadPattern, cache: Option<duo_engine::KvDtype>, bits: usize, scales: usize| {
        let plan = duo_core::CachePlan::with_bits(p, a.head_dim, bits, window).with_row_scales(scales);
        duo_engine::backend::with_streaming_dtype(plan, cache, streaming, bits, scales)
    };
    let plan_for = |p: &duo_core::HeadPattern| plan_with(p, dtype, bits, scales);
    let all_retrieval = duo_core::HeadPattern::all_retrieval(layers, heads);
    let plan = plan_for(&pattern);
    let full = plan_for(&all_retrieval);
    let t = a.context;
    let element = match (dtype, bits, scales) {
        (Some(duo_engine::KvDtype::K8V4), _, s) => format!("keys 8 and values 4 bits/element, each + {s}-byte scale per row"),
        (_, 8, 0) => "1 byte/element".to_string(),
        (_, b, 0) => format!("{} bytes/element", b / 8),
        (_, 8, s) => format!("1 byte/element + {s}-byte scale per row"),
        (_, b, s) => format!("{b} bits/element + {s}-byte scale per row"),
    };
    let element = match (a.kv_dtype_streaming.as_deref(), dtype.zip(streaming).and_then(|(c, s)| c.gpu_window_width(s))) {
        (Some(s), Some(width)) => format!("{element}; streaming heads {s}, each row in the bytes of {width} of the cache's rows as the GPU's pool keeps it"),
        (Some(s), None) => format!("{element}; streaming heads {s}"),
        (None, _) => element,
    };
    println!(
        "KV cache at {t} tokens (head_dim {}, {element}, sink {}, recent {}): {:.1} MiB vs {:.1} MiB full attention ({:.2}x less)",
        a.head_dim,
        window.sink,
        window.recent,
        plan.total_bytes(t) as f64 / (1 << 20) as f64,
        full.total_bytes(t) as f64 / (1 << 20) as f64,
        full.total_bytes(t) as f64 / plan.total_bytes(t).max(1) as f64
    );
    if let Some(gib) = a.memory_gib {
        if !(gib.is_finite() && gib > 0.0) {
            bail!("--memory-gib must be a positive number of GiB (got {gib})");
        }
        let budget = (gib * (1u64 << 30) as f64) as usize;
        let (ours, theirs) = (
            longest_context(&plan, budget),
            longest_context(&full, budget),
        );
        println!(
            "longest context whose KV fits in {gib} GiB ({element}): {} tokens with this pattern, {} with full attention ({:.2}x)",
            ours,
            theirs,
            ours as f64 / theirs.max(1) as f64
        );
        // The same budget with every cache type duo has, side by side.
        let kv_cache = a.kv_dtype_streaming.as_deref().map_or("KV cache".to_string(), |s| format!("KV cache (streaming heads {s})"));
        println!("| {kv_cache} | bytes per token beyond the window | longest context, this pattern | longest context, full attention |\n|---|---|---|---|");
        use duo_engine::KvDtype;
        for (name, d) in [("f32 (CPU)", KvDtype::F32), ("f16 (CPU) / bf16 (GPU)", KvDtype::Bf16), ("int8 (CPU, GPU) / fp8 (GPU)", KvDtype::Int8), ("k8v4: int8 keys, int4 values (GPU)", KvDtype::K8V4), ("int4 (GPU)", KvDtype::Int4)] {
            let (mine, all) = (plan_with(&pattern, Some(d), d.bits(), d.scale_bytes()), plan_with(&all_retrieval, Some(d), d.bits(), d.scale_bytes()));
            println!("| {name} | {} | {} | {} |", mine.retrieval_bytes(1), longest_context(&mine, budget), longest_context(&all, budget));
        }
    }
    if let Some(placements) = &placements {
        let budget = a.memory_gib.map(|gib| (gib * (1u64 << 30) as f64) as usize);
        show_placements(&pattern, placements, t, budget, plan_for)?;
    }
    let out = a.heatmap.clone().unwrap_or_else(|| a.dir.join("gates.png"));
    plot::gate_heatmap(&out, gates.rows(), &pattern)?;
    println!("gate heatmap: {}", out.display());
    Ok(())
}
