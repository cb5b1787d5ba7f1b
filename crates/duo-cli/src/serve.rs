//! `duo serve`: binds first (so `/health` answers 503 while the model loads), then loads
//! the model on a blocking thread, starts the batching engine, and serves until Ctrl-C.

use crate::args::MethodArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use duo_engine::{BatchConfig, BatchEngine};
use duo_serve::openai::Limits;
use duo_serve::{AppState, Ready, ServeConfig};
use std::path::PathBuf;
use std::sync::Arc;

/// `duo serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to bind; anything other than loopback exposes the server to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route except /health.
    #[arg(long, conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// Read the API key from a file (first line).
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Name of the model in /v1/models and responses (default: the model file's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// KV-cache memory the running requests may reserve together, in MiB (default: half
    /// of the memory available at start).
    #[arg(long)]
    pub kv_budget_mib: Option<f64>,
    /// Requests that may wait for admission before new ones get 429.
    #[arg(long, default_value_t = 64)]
    pub max_waiting: usize,
    /// Sequences decoded together at most (vLLM's --max-num-seqs; default 32 on the CPU,
    /// 256 on a GPU).
    #[arg(long, alias = "max-num-seqs")]
    pub max_running: Option<usize>,
    /// GPU: the fraction of the card's memory duo may use, weights included; the KV pool is
    /// what remains of it after the weights and the step buffers.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// GPU: rows one engine step may run, decode rows plus a prefill chunk (default: the
    /// prefill chunk plus --max-running, so a chunk always runs beside every decode row).
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,
    /// GPU: positions per KV block (a power of two from 8 to 1024).
    #[arg(long, default_value_t = 64)]
    pub block_size: usize,
    /// GPU: exactly this many KV blocks (within the memory fraction), for tests and
    /// preemption experiments.
    #[arg(long)]
    pub num_gpu_blocks_override: Option<usize>,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Prefill chunk in tokens: a long prompt is prefilled this many tokens at a time, with
    /// the other requests' decode steps in between (smaller: steadier inter-token latency).
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Seconds a connection may take to send a request's headers, counted from when it waits
    /// for one (so also how long an idle kept-alive connection stays open).
    #[arg(long, default_value_t = 5.0)]
    pub timeout_keep_alive: f64,
    /// Seconds a request's body may take to arrive once its headers are in.
    #[arg(long, default_value_t = 30.0)]
    pub timeout_read: f64,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = Limits::default().max_tokens)]
    pub max_tokens_limit: usize,
    #[command(flatten)]
    pub method: MethodArgs,
}

/// Runs the server until Ctrl-C.
pub fn run(a: ServeArgs) -> Result<()> {
    let api_key = match (&a.api_key, &a.api_key_file) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("reading the API key file {}", f.display()))?;
            Some(text.lines().next().unwrap_or("").trim().to_string())
        }
        (None, None) => None,
    };
    if api_key.as_deref() == Some("") {
        bail!("the API key is empty");
    }
    let kv_budget = match a.kv_budget_mib {
        Some(m) if m.is_finite() && m > 0.0 => Some((m * (1 << 20) as f64) as usize),
        Some(m) => bail!("--kv-budget-mib must be positive (got {m})"),
        None => None,
    };
    for (name, secs) in [("--timeout-keep-alive", a.timeout_keep_alive), ("--timeout-read", a.timeout_read)] {
        if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
            bail!("{name} must be between 0 and 86400 seconds (got {secs})");
        }
    }
    let on_gpu = a.method.device != duo_engine::Device::Cpu;
    let max_running = a.max_running.unwrap_or(if on_gpu { 256 } else { 32 });
    if a.max_waiting == 0 || max_running == 0 {
        bail!("--max-waiting and --max-running must be at least 1");
    }
    let options = duo_engine::PoolOptions {
        gpu_memory_utilization: a.gpu_memory_utilization,
        max_num_seqs: max_running,
        max_num_batched_tokens: a.max_num_batched_tokens.unwrap_or(a.prefill_chunk.saturating_add(max_running)),
        block_size: a.block_size,
        blocks_override: a.num_gpu_blocks_override,
    };
    options.validate()?;
    a.method.model_source()?;
    if a.method.chunk != duo_engine::MethodSpec::default().chunk {
        bail!("duo serve sets its prefill chunk with --prefill-chunk (default 512), not --chunk");
    }
    if a.prefill_chunk == 0 {
        bail!("--prefill-chunk must be at least 1");
    }
    if let crate::args::Parallel::Process(_) = a.method.parallel()? {
        bail!("duo serve drives all of its GPUs from one process (--tensor-parallel N); --tp-rank (one rank per process, for hosts beyond one) is for bench, generate, score and eval, whose ranks all run the same command");
    }
    let spec = duo_engine::MethodSpec { chunk: a.prefill_chunk, ..a.method.spec()? };
    let model_id = a.served_model_name.clone().unwrap_or_else(|| match &a.method.model {
        None => "SmolLM2-135M-Instruct".to_string(),
        Some(m) => m.trim_end_matches('/').rsplit('/').next().unwrap_or(m).trim_end_matches(".gguf").to_string(),
    });
    let config = ServeConfig {
        model_id,
        api_key,
        max_body_bytes: a.max_body_bytes,
        limits: Limits { max_tokens: a.max_tokens_limit, ..Limits::default() },
        seed: a.method.seed_arg,
        header_timeout: std::time::Duration::from_secs_f64(a.timeout_keep_alive),
        body_timeout: std::time::Duration::from_secs_f64(a.timeout_read),
    };
    let state = AppState::new(config);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port)).await.with_context(|| format!("binding {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        eprintln!("duo: listening on http://{addr} (loading the model)");
        let loading = state.clone();
        let load = tokio::task::spawn_blocking(move || -> Result<()> {
            let (model, _) = a.method.load()?;
            // A chat template that cannot render a plain conversation (or overruns its
            // budget) is refused now, not on the first request.
            if let Some(t) = &model.template {
                t.render(&[duo_model::Message { role: "user".into(), content: "Hello".into() }], true).context("the model's chat template")?;
            }
            let model = Arc::new(model);
            let method = spec.resolve(model.config())?;
            // GPU: one pool of paged blocks from --gpu-memory-utilization. CPU: half of what is
            // free once the weights are in, unless told.
            let pool = model.backend().kv_pool(&method, &options)?;
            let kv_budget = kv_budget.unwrap_or_else(|| model.backend().available_memory().map_or(4 << 30, |b| b / 2));
            let engine = BatchEngine::start_with_pool(model.clone(), method, BatchConfig { kv_budget, max_waiting: a.max_waiting, max_running }, pool.clone());
            match &pool {
                Some(p) => eprintln!(
                    "duo: ready on {} (KV pool: {} blocks of {} tokens, {:.2} GiB; up to {} sequences, {} rows per step)",
                    model.backend().describe(),
                    p.total_blocks(),
                    p.block_tokens(),
                    (p.total_blocks() * p.block_bytes()) as f64 / (1u64 << 30) as f64,
                    engine.config().max_running,
                    p.max_rows()
                ),
                None => eprintln!("duo: ready (KV budget {:.1} MiB)", kv_budget as f64 / (1 << 20) as f64),
            }
            let _ = loading.ready.set(Ready { model, engine });
            Ok(())
        });
        let header_timeout = state.config.header_timeout;
        let server = duo_serve::serve(listener, duo_serve::router(state), header_timeout, async {
            let _ = tokio::signal::ctrl_c().await;
        });
        let server = tokio::spawn(server);
        load.await.context("the loading task")??;
        server.await.context("the server task")?.context("serving")?;
        Ok(())
    })
}
