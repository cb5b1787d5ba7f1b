//! Command-line flags. Every command that runs a model takes the same model and
//! attention-method flags ([`MethodArgs`]).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use duo_engine::{Device, Engine, KvDtype, Method, MethodSpec, PatternSource, ResolvedMethod};
use duo_model::ModelSource;
use std::path::PathBuf;

/// Model and attention-method flags shared by every command that runs a model.
#[derive(Args, Debug, Clone)]
pub struct MethodArgs {
    /// GGUF file or Hugging Face model folder (default: SmolLM2-135M-Instruct Q4_1, fetched on first use).
    #[arg(long)]
    pub model: Option<String>,
    /// Which heads keep a full KV cache: full, duo, streaming, random.
    #[arg(long, default_value = "full")]
    pub method: String,
    /// Head pattern folder (full_attention_heads.tsv + config.json).
    #[arg(long)]
    pub pattern: Option<PathBuf>,
    /// Fraction of KV heads that become streaming heads (default 0.5).
    #[arg(long)]
    pub sparsity: Option<f64>,
    /// Gate threshold instead of a sparsity: heads with gate >= T keep a full cache.
    #[arg(long)]
    pub threshold: Option<f32>,
    /// head (DuoAttention) or layer (ZigzagAttention: whole layers).
    #[arg(long, default_value = "head")]
    pub layout: String,
    /// Attention-sink tokens kept by streaming heads (default: the pattern's trained window,
    /// `sink_size` in its config.json, else 64).
    #[arg(long)]
    pub sink: Option<usize>,
    /// Recent tokens kept by streaming heads (default: the pattern's `recent_size`, else 256).
    #[arg(long)]
    pub recent: Option<usize>,
    /// Seed for sampling, data generation and `--method random` (default 0, so every command
    /// is deterministic; `duo serve` without it samples each request without a `seed` with a
    /// fresh one, as OpenAI's API does).
    #[arg(long = "seed")]
    pub seed_arg: Option<u64>,
    /// Streaming heads during prefill: lambda (sink + recent mask from the first token) or reference (dense first chunk).
    #[arg(long, default_value = "lambda")]
    pub prefill: String,
    /// Prefill chunk size in tokens.
    #[arg(long, default_value_t = MethodSpec::default().chunk)]
    pub chunk: usize,
    /// A model of real shape with seeded random weights instead of a checkpoint
    /// (llama-3-8b, llama-2-7b, smollm2-135m, or a config.json): `duo bench` only.
    #[arg(long, conflicts_with = "model")]
    pub random_weights: Option<String>,
    /// Where the model runs: cpu, cuda (GPU 0) or cuda:N (bf16 weights and KV cache on duo's
    /// CUDA backend).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Element type of the KV cache: f32 (the CPU's default), f16 (half the memory) or int8
    /// (alias q8: one byte per element and a 4-byte scale per row of head_dim, about a quarter)
    /// on the CPU; bf16 (the GPU's default), fp8 (e4m3, keys in a Hadamard basis) or int8 on
    /// the GPU (about half of bf16), int4 (4 bits per element and a 4-byte step and minimum per row: about a
    /// quarter), or k8v4 (int8 keys and int4 values: about three eighths; simulated on the
    /// CPU within 0.03 of the exact cache, where int4 is not).
    #[arg(long)]
    pub kv_dtype: Option<String>,
    /// The streaming heads' own element type (default: --kv-dtype's; CPU: f32, f16 or int8;
    /// GPU: bf16 beside an fp8, int8, int4 or k8v4 cache): their window is small, so keeping it
    /// exact beside a smaller retrieval cache costs little.
    #[arg(long)]
    pub kv_dtype_streaming: Option<String>,
    /// Split the model over GPUs 0..N-1 (tensor parallelism through NCCL; --device cuda):
    /// each GPU holds its share of every layer's KV heads and of the MLP.
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel: usize,
    /// How KV heads are shared out among the GPUs: retrieval-aware (each GPU an equal share
    /// of every layer's retrieval heads, from the duo pattern at --sparsity) or contiguous
    /// (heads in index order, as other engines split them).
    #[arg(long, default_value = "retrieval-aware")]
    pub placement: duo_core::placement::Strategy,
    /// This process's rank of a tensor-parallel group spanning processes or hosts (one GPU
    /// each, --device cuda:N being this process's; every rank runs the same command);
    /// needs --tp-rendezvous.
    #[arg(long, requires = "tp_rendezvous")]
    pub tp_rank: Option<usize>,
    /// HOST:PORT where rank 0 of a multi-process group listens for the others (rank 0
    /// binds it; the others connect to it).
    #[arg(long, requires = "tp_rank")]
    pub tp_rendezvous: Option<String>,
}

/// How `--tensor-parallel` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parallel {
    /// One GPU.
    One,
    /// GPUs 0..N-1, all driven by this process.
    InProcess(usize),
    /// This process's rank of a group spanning processes.
    Process(duo_engine::backend::ProcessRank),
}

impl Parallel {
    /// Where the model goes, in words: `device`, GPUs 0..N-1, or this process's rank.
    pub fn describe(&self, device: Device) -> String {
        match self {
            Parallel::One => device.to_string(),
            Parallel::InProcess(n) => format!("GPUs 0..{}", n - 1),
            Parallel::Process(at) => format!("rank {} of {} on {device}", at.rank, at.world),
        }
    }

    /// The GPUs a split model's shards go to, opened (before any model file is read; too
    /// few GPUs is the error a user sees first); `None` for one GPU.
    pub fn shards(self) -> duo_engine::Result<Option<duo_engine::backend::Shards>> {
        use duo_engine::backend::Shards;
        match self {
            Parallel::One => Ok(None),
            Parallel::InProcess(gpus) => Shards::in_process(gpus).map(Some),
            Parallel::Process(at) => Shards::rank(at).map(Some),
        }
    }
}

impl MethodArgs {
    /// The model to load.
    pub fn model_source(&self) -> Result<ModelSource> {
        if let Some(shape) = &self.random_weights {
            anyhow::bail!(
                "--random-weights {shape} builds a model with random weights, which has no accuracy, text or answers to report; \
                 it is for speed and memory only: use it with `duo bench`"
            );
        }
        Ok(match &self.model {
            None => ModelSource::Default,
            Some(s) => s.parse()?,
        })
    }

    /// The seed (0 unless `--seed` says otherwise).
    pub fn seed(&self) -> u64 {
        self.seed_arg.unwrap_or(0)
    }

    /// Where the head pattern comes from: `--pattern`, else the patterns shipped for the
    /// default model (the one place that default is decided), else none.
    pub fn pattern_source(&self) -> Option<PatternSource> {
        match (&self.pattern, &self.model, &self.random_weights) {
            (Some(p), _, _) => Some(PatternSource::Path(p.clone())),
            (None, None, None) => Some(PatternSource::Shipped),
            _ => None,
        }
    }

    /// The attention method as the engine takes it.
    pub fn spec(&self) -> Result<MethodSpec> {
        let kv_dtype: Option<KvDtype> = self.kv_dtype.as_deref().map(str::parse).transpose()?;
        match (self.device, kv_dtype) {
            (Device::Cpu, Some(d)) if !d.on_cpu() => anyhow::bail!("--kv-dtype {}: a GPU cache; on the CPU it is f32 (the default), f16 or int8 (q8)", self.kv_dtype.as_deref().unwrap_or_default()),
            (Device::Cuda(_), Some(d)) if !d.on_gpu() => anyhow::bail!("--kv-dtype {}: the CUDA backend caches bf16 (its default), fp8, int8, int4 or k8v4", self.kv_dtype.as_deref().unwrap_or_default()),
            _ => {}
        }
        let kv_dtype_streaming: Option<KvDtype> = self.kv_dtype_streaming.as_deref().map(str::parse).transpose()?;
        match (self.device, kv_dtype_streaming) {
            (Device::Cpu, Some(d)) if !d.on_cpu() => anyhow::bail!("--kv-dtype-streaming {}: on the CPU it is f32, f16 or int8 (q8)", self.kv_dtype_streaming.as_deref().unwrap_or_default()),
            // Streaming rows of another type span whole rows of the cache's (duo-cuda's
            // `paged`): bf16 windows beside fp8, int8, int4 or k8v4.
            (Device::Cuda(_), Some(d)) if !kv_dtype.unwrap_or(KvDtype::Bf16).gpu_takes_streaming(d) => anyhow::bail!(
                "--kv-dtype-streaming {}: the CUDA backend keeps streaming heads in the cache's type (--kv-dtype, bf16 by default), or in bf16 beside an fp8, int8, int4 or k8v4 cache",
                self.kv_dtype_streaming.as_deref().unwrap_or_default()
            ),
            _ => {}
        }
        Ok(MethodSpec {
            method: self.method.parse::<Method>()?,
            pattern: self.pattern_source(),
            sparsity: self.sparsity,
            threshold: self.threshold,
            layout: self.layout.parse()?,
            sink: self.sink,
            recent: self.recent,
            seed: self.seed(),
            prefill: self.prefill.parse().map_err(anyhow::Error::msg)?,
            chunk: self.chunk,
            kv_dtype,
            kv_dtype_streaming,
        })
    }

    /// Loads the model onto `--device` (the device is opened first: without a driver this
    /// fails before any model file is read) and resolves the method against it; with
    /// `--tensor-parallel N`, split over GPUs 0..N-1.
    pub fn load(&self) -> Result<(Engine, ResolvedMethod)> {
        let spec = self.spec()?;
        let source = self.model_source()?;
        let place = |config: &duo_core::config::ModelConfig| self.placement(config).map_err(|e| duo_engine::EngineError::InvalidParameter { name: "placement", reason: format!("{e:#}") });
        let parallel = self.parallel()?;
        let what = format!("loading the model onto {}", parallel.describe(self.device));
        let engine = match parallel.shards().context(what.clone())? {
            None => Engine::load(&source, self.device),
            Some(shards) => Engine::load_split(&source, shards, place),
        }
        .context(what)?;
        let resolved = spec.resolve(engine.config())?;
        Ok((engine, resolved))
    }

    /// How `--tensor-parallel`, `--tp-rank` and `--tp-rendezvous` ask the model to run
    /// (checked against the device: GPUs 0..N-1 of this process, or one GPU per process).
    pub fn parallel(&self) -> Result<Parallel> {
        let n = self.tensor_parallel;
        if let (Some(rank), Some(rendezvous)) = (self.tp_rank, &self.tp_rendezvous) {
            let Device::Cuda(ordinal) = self.device else { anyhow::bail!("--tp-rank runs one rank on a GPU: use it with --device cuda[:N]") };
            if n < 2 || rank >= n {
                anyhow::bail!("--tp-rank {rank} must be below --tensor-parallel {n} (2 or more ranks)");
            }
            if !rendezvous.contains(':') {
                anyhow::bail!("--tp-rendezvous {rendezvous}: HOST:PORT");
            }
            return Ok(Parallel::Process(duo_engine::backend::ProcessRank { ordinal, rank, world: n, rendezvous: rendezvous.clone() }));
        }
        match (n, self.device) {
            (0, _) => anyhow::bail!("--tensor-parallel takes 1 GPU or more"),
            (1, _) => Ok(Parallel::One),
            (n, Device::Cuda(0)) => Ok(Parallel::InProcess(n)),
            (n, Device::Cuda(d)) => anyhow::bail!("--tensor-parallel {n} runs on GPUs 0..{}; use --device cuda, not cuda:{d}", n - 1),
            (n, Device::Cpu) => anyhow::bail!("--tensor-parallel {n} splits the model over GPUs: use it with --device cuda"),
        }
    }

    /// Which GPU holds which KV heads under `--tensor-parallel`: `--placement` applied to the
    /// duo head pattern these flags give at `--sparsity` (full attention and the layer layout
    /// are balanced by any split of equal head counts); contiguous where there is no pattern.
    pub fn placement(&self, config: &duo_core::config::ModelConfig) -> Result<duo_core::placement::Placement> {
        use duo_core::placement::{Placement, Strategy};
        let gpus = self.tensor_parallel;
        let all = duo_core::pattern::HeadPattern::all_retrieval(config.n_layers, config.n_kv_heads);
        if self.placement == Strategy::Contiguous || self.pattern_source().is_none() {
            return Ok(Placement::contiguous(&all, gpus)?);
        }
        let duo = MethodArgs { method: "duo".into(), layout: "head".into(), ..self.clone() };
        let pattern = duo.spec()?.resolve(config)?.pattern;
        Ok(Placement::retrieval_aware(&pattern, gpus)?)
    }
}

fn parse_bias(s: &str) -> std::result::Result<(u32, f32), String> {
    let (id, b) = s.split_once('=').ok_or_else(|| format!("`{s}` is not ID=BIAS"))?;
    Ok((id.trim().parse().map_err(|_| format!("`{id}` is not a token id"))?, b.trim().parse().map_err(|_| format!("`{b}` is not a number"))?))
}

/// `duo generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The prompt (else --prompt-file, else standard input).
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling mass (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Minimum probability relative to the most likely token (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Subtracted once from the logit of each token already generated (OpenAI's, -2 to 2).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of each token already generated (-2 to 2).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Divides (or multiplies, if negative) the logits of tokens in the prompt or generated (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Constrain the output to JSON matching this JSON Schema file (structured output).
    #[arg(long, conflicts_with = "json_object")]
    pub json_schema: Option<PathBuf>,
    /// Constrain the output to a JSON object.
    #[arg(long)]
    pub json_object: bool,
    /// Bias a token's logit: `ID=BIAS`, BIAS in [-100, 100] (repeatable).
    #[arg(long, value_parser = parse_bias, allow_negative_numbers = true)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub method: MethodArgs,
}

/// `duo score`.
#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// Prompt (context) file.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Continuation file: every token of it is scored.
    #[arg(long)]
    pub continuation_file: Option<PathBuf>,
    /// Text file: perplexity of the whole text.
    #[arg(long)]
    pub text_file: Option<PathBuf>,
    /// Window for --text-file, in tokens (capped at the context length).
    #[arg(long, default_value_t = 2048)]
    pub window: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub method: MethodArgs,
}

/// `duo pattern ...`.
#[derive(Subcommand, Debug)]
pub enum PatternCommand {
    /// Per-layer retrieval counts, the KV budget, and a gate heatmap PNG.
    Show(PatternShowArgs),
}

/// `duo pattern show`.
#[derive(Args, Debug)]
pub struct PatternShowArgs {
    /// Pattern folder (or its full_attention_heads.tsv).
    pub dir: PathBuf,
    /// Fraction of KV heads that stream.
    #[arg(long, default_value_t = 0.5)]
    pub sparsity: f64,
    /// Gate threshold instead of a sparsity.
    #[arg(long)]
    pub threshold: Option<f32>,
    /// head or layer.
    #[arg(long, default_value = "head")]
    pub layout: String,
    /// Context length for the KV budget.
    #[arg(long, default_value_t = 32768)]
    pub context: usize,
    /// Head dimension for the KV budget.
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// Bytes per cached element (2 for bf16/f16, 4 for f32).
    #[arg(long, default_value_t = 2, conflicts_with = "kv_dtype")]
    pub bytes_per_element: usize,
    /// The cache's element type instead of --bytes-per-element: f32, f16, bf16, fp8 or int8
    /// (one byte and a 4-byte scale per row of head_dim), or int4 (4 bits and a 4-byte step
    /// and minimum per row).
    #[arg(long)]
    pub kv_dtype: Option<String>,
    /// The streaming heads' own element type (the same names): their window is small, so an
    /// exact one costs little. Runs take any mix of f32, f16 and int8 on the CPU; the CUDA
    /// backend takes bf16 windows beside an fp8, int8, int4 or k8v4 cache.
    #[arg(long)]
    pub kv_dtype_streaming: Option<String>,
    /// Also print the longest context whose KV cache fits in this many GiB, with this
    /// pattern and with full attention (weights and activations not counted).
    #[arg(long)]
    pub memory_gib: Option<f64>,
    /// Sink tokens (default: the pattern's `sink_size`, else 64).
    #[arg(long)]
    pub sink: Option<usize>,
    /// Recent tokens (default: the pattern's `recent_size`, else 256).
    #[arg(long)]
    pub recent: Option<usize>,
    /// Where to write the heatmap (default: DIR/gates.png).
    #[arg(long)]
    pub heatmap: Option<PathBuf>,
    /// Also print how N GPUs would share the heads under tensor parallelism: the
    /// contiguous split against duo's retrieval-aware placement (KV per GPU, the longest
    /// context with --memory-gib per GPU, each layer's slowest GPU), and the placement.
    #[arg(long)]
    pub tensor_parallel: Option<usize>,
}
