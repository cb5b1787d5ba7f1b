//! `duo identify`: learn which KV heads need a full cache and write a pattern folder
//! (`full_attention_heads.tsv`, `config.json`, `gates.png`, `loss.png`, `state.json`).

use crate::plot;
use anyhow::{bail, Context, Result};
use clap::Args;
use duo_core::pattern::{HeadGates, Layout};
use duo_identify::estimate::mass_outside;
use duo_identify::{DenseModel, IdentifySettings, Span, TrainState, Trainer};
use duo_model::{Checkpoint, ModelSource};
use duo_tasks::Haystack;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Flags of `duo identify`.
#[derive(Args, Debug)]
pub struct IdentifyArgs {
    /// GGUF file or Hugging Face model folder (default: SmolLM2-135M-Instruct Q4_1).
    #[arg(long)]
    pub model: Option<String>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Optimisation steps (one sample each).
    #[arg(long, default_value_t = IdentifySettings::default().steps)]
    pub steps: usize,
    /// Peak learning rate of AdamW.
    #[arg(long, default_value_t = IdentifySettings::default().lr)]
    pub lr: f64,
    /// Weight of the L1 term mean(|gate|).
    #[arg(long, default_value_t = IdentifySettings::default().reg)]
    pub reg: f64,
    /// Shortest sample in tokens.
    #[arg(long, default_value_t = IdentifySettings::default().min_len)]
    pub min_len: usize,
    /// Longest sample in tokens (at most the model's context).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Number of evenly spaced sample lengths.
    #[arg(long, default_value_t = IdentifySettings::default().length_count)]
    pub length_count: usize,
    /// Attention sinks of the student's streaming attention.
    #[arg(long, default_value_t = IdentifySettings::default().sink)]
    pub sink: usize,
    /// Recent window of the student's streaming attention.
    #[arg(long, default_value_t = IdentifySettings::default().recent)]
    pub recent: usize,
    /// head: one gate per KV head (DuoAttention); layer: one gate per layer (ZigzagAttention).
    #[arg(long, default_value = "head")]
    pub layout: String,
    /// Seed of the synthetic data.
    #[arg(long, default_value_t = IdentifySettings::default().seed)]
    pub seed: u64,
    /// Passkeys (needles) per sample.
    #[arg(long, default_value_t = IdentifySettings::default().passkeys)]
    pub passkeys: usize,
    /// Words per passkey.
    #[arg(long, default_value_t = IdentifySettings::default().words)]
    pub passkey_words: usize,
    /// Folder of .txt files to hide the passkeys in (default: duo's generated prose).
    #[arg(long)]
    pub haystack: Option<PathBuf>,
    /// Save state.json every N steps.
    #[arg(long, default_value_t = 10)]
    pub checkpoint_every: usize,
    /// Continue from OUT/state.json.
    #[arg(long)]
    pub resume: bool,
    /// Training-free estimate instead of the optimisation: attention mass outside sink + recent, averaged over STEPS samples.
    #[arg(long)]
    pub estimate: bool,
    /// Query block of the attention passes (default: 256 on the CPU, 512 on a GPU where
    /// it fits); for measuring what it costs, the results do not depend on it beyond rounding.
    #[arg(long)]
    pub attention_block: Option<usize>,
    /// cpu, cuda or cuda:N (the gradient passes run on candle: a GPU needs the binary of
    /// scripts/build-cuda.sh).
    #[arg(long, default_value = "cpu")]
    pub device: duo_engine::Device,
}

/// The candle device for duo's device flag.
pub fn device(d: duo_engine::Device) -> Result<candle_core::Device> {
    match d {
        duo_engine::Device::Cpu => Ok(candle_core::Device::Cpu),
        duo_engine::Device::Cuda(n) => cuda_device(n),
    }
}

#[cfg(feature = "cuda")]
pub(crate) fn cuda_device(ordinal: usize) -> Result<candle_core::Device> {
    // The CUDA libraries are loaded at run time; where they are missing the loader panics
    // inside cudarc. Turn that into an error (and keep its message off the terminal).
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| candle_core::Device::new_cuda(ordinal));
    std::panic::set_hook(hook);
    // f32 products on the tensor cores (TF32: 10 mantissa bits against the bf16 of the
    // reference's training, 7): the teacher and the student round alike, so all-open gates
    // still reproduce the teacher exactly.
    candle_core::cuda::set_gemm_reduced_precision_f32(true);
    match opened {
        Ok(device) => device.with_context(|| format!("opening CUDA device {ordinal}")),
        Err(_) => bail!("no usable CUDA driver on this machine (libcuda.so.1 could not be loaded); run without --device cuda"),
    }
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn cuda_device(_ordinal: usize) -> Result<candle_core::Device> {
    bail!("this duo binary was built without CUDA; build it with scripts/build-cuda.sh")
}

/// A short description of the machine for records: CPU model and core count, or GPU.
pub fn machine(device: &candle_core::Device) -> String {
    if device.is_cuda() {
        let name = std::process::Command::new("nvidia-smi")
            .args(["--query-gpu=name", "--format=csv,noheader"])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        return if name.is_empty() { "CUDA GPU".into() } else { name };
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpu}, {} threads", std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn model_path(model: &Option<String>) -> Result<PathBuf> {
    let source = match model {
        None => ModelSource::Default,
        Some(s) => s.parse()?,
    };
    Ok(source.local_path()?)
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(&format!("{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}] {{msg}}"))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// Runs `duo identify`.
pub fn run(a: IdentifyArgs) -> Result<()> {
    let layer_gates = match a.layout.as_str() {
        "head" => false,
        "layer" => true,
        other => bail!("--layout must be head or layer, not `{other}`"),
    };
    let device = device(a.device)?;
    let path = model_path(&a.model)?;
    let ck = Checkpoint::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let config = ck.config()?;
    let tokenizer = ck.tokenizer()?;
    let haystack = match &a.haystack {
        Some(dir) => Haystack::from_dir(dir)?,
        None => Haystack::Generated,
    };
    let settings = IdentifySettings {
        steps: a.steps,
        lr: a.lr,
        reg: a.reg,
        min_len: a.min_len,
        max_len: a.max_len.unwrap_or(config.context_length.min(32 * 1024)),
        length_count: a.length_count,
        sink: a.sink,
        recent: a.recent,
        layer_gates,
        seed: a.seed,
        passkeys: a.passkeys,
        words: a.passkey_words,
    };
    settings.validate(config.context_length)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let state_path = a.out.join("state.json");
    if !a.resume && !a.estimate && state_path.exists() {
        bail!("{} already holds a run; pass --resume to continue it or choose another --out", a.out.display());
    }
    eprintln!("loading {} onto {} ...", path.display(), a.device);
    let load_start = Instant::now();
    let model = DenseModel::load(&ck, &device)?.with_block(a.attention_block);
    eprintln!("loaded in {:.1} s", load_start.elapsed().as_secs_f64());
    let trainer = Trainer::new(&model, &tokenizer, &haystack, settings.clone())?;
    let sha = duo_model::fetch::sha256_file(&path)?;
    let command: Vec<String> = std::env::args().collect();
    let started = Instant::now();

    let (rows, record) = if a.estimate {
        let bar = progress(settings.steps as u64, "estimating");
        let mut sum = vec![vec![0f64; config.n_kv_heads]; config.n_layers];
        for step in 0..settings.steps {
            let sample = trainer.sample(step)?;
            let mass = mass_outside(&model, &sample.ids, sample.qa.clone(), Span::Lambda { sink: settings.sink, recent: settings.recent })?;
            for (s, m) in sum.iter_mut().zip(mass) {
                for (s, m) in s.iter_mut().zip(m) {
                    *s += m as f64;
                }
            }
            bar.inc(1);
        }
        bar.finish();
        let mut rows: Vec<Vec<f32>> = sum.iter().map(|r| r.iter().map(|s| (s / settings.steps as f64) as f32).collect()).collect();
        if layer_gates {
            for r in &mut rows {
                let mean = r.iter().sum::<f32>() / r.len() as f32;
                r.iter_mut().for_each(|v| *v = mean);
            }
        }
        (rows, json!({"method": "attention mass outside sink + recent at the answer positions (training-free estimate)"}))
    } else {
        let mut state = if a.resume && state_path.exists() {
            let s = TrainState::load(&state_path)?;
            if s.settings != settings {
                bail!("{} was made with different settings; use the same flags to resume", state_path.display());
            }
            eprintln!("resuming at step {}", s.step);
            s
        } else {
            TrainState::new(settings.clone(), config.n_layers, config.n_kv_heads)
        };
        let bar = progress(settings.steps as u64, "identifying");
        bar.set_position(state.step as u64);
        while state.step < settings.steps {
            let log = trainer.step(&mut state)?;
            let p = log.phases;
            bar.set_message(format!(
                "loss {:.5} (distill {:.5}) len {} {:.1}s/step (sample {:.2}, teacher {:.2}, student {:.2}, backward {:.2})",
                log.loss, log.distill, log.length, log.seconds, log.sample_seconds, p.teacher, p.student, p.backward
            ));
            bar.inc(1);
            if state.step % a.checkpoint_every.max(1) == 0 || state.step == settings.steps {
                state.save(&state_path)?;
            }
        }
        bar.finish();
        let losses: Vec<f64> = state.log.iter().map(|l| l.loss).collect();
        plot::line_chart(
            &a.out.join("loss.png"),
            "identification loss",
            "step",
            "loss",
            &[plot::Series { name: "total loss".into(), points: losses.iter().enumerate().map(|(i, &l)| (i as f64, l)).collect() }],
        )?;
        let seconds_per_step: Vec<(usize, f64)> = state.log.iter().map(|l| (l.length, l.seconds)).collect();
        // Seconds per step by pass, over the steps that recorded them (the first, which
        // loads the GPU's kernels, left out).
        let timed: Vec<_> = state.log.iter().skip(1).filter(|l| l.phases.teacher > 0.0).collect();
        let mean = |f: &dyn Fn(&duo_identify::train::StepLog) -> f64| timed.iter().map(|l| f(l)).sum::<f64>() / timed.len().max(1) as f64;
        let phase_means = json!({
            "steps": timed.len(),
            "tokens": mean(&|l| l.length as f64),
            "sample": mean(&|l| l.sample_seconds),
            "teacher": mean(&|l| l.phases.teacher),
            "student": mean(&|l| l.phases.student),
            "backward": mean(&|l| l.phases.backward),
            "step": mean(&|l| l.seconds),
        });
        let rows = state.gate_values().rows(config.n_kv_heads);
        (
            rows,
            json!({
                "method": "DuoAttention optimisation (distillation + L1, AdamW)",
                "final_loss": state.log.last().map(|l| l.loss),
                "step_seconds_by_length": seconds_per_step,
                "mean_seconds_per_step": phase_means,
            }),
        )
    };

    let mut gates = HeadGates::new(rows.clone())?;
    gates.config = json!({
        "sink_size": settings.sink,
        "recent_size": settings.recent,
        "model": path.file_name().map(|n| n.to_string_lossy().to_string()),
        "model_sha256": sha,
        "command": command.join(" "),
        "settings": settings,
        "haystack": haystack.describe(),
        "device": a.device.to_string(),
        "machine": machine(&device),
        "seconds": started.elapsed().as_secs_f64(),
        "duo_version": env!("CARGO_PKG_VERSION"),
        "run": record,
    });
    // The table keeps the raw (unclipped) values, as the reference writes them.
    duo_core::pattern::write_table(&a.out, &rows)?;
    std::fs::write(a.out.join("config.json"), serde_json::to_string_pretty(&gates.config)?)?;
    let pattern = gates.binarise_sparsity(0.5, if layer_gates { Layout::Layer } else { Layout::Head })?;
    plot::gate_heatmap(&a.out.join("gates.png"), gates.rows(), &pattern)?;
    eprintln!("wrote {} (retrieval heads per layer at sparsity 0.5: {:?})", a.out.display(), pattern.retrieval_per_layer());
    Ok(())
}
