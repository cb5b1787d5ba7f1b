//! Attention methods at a stated KV budget, resolved into a head pattern.

use crate::error::{EngineError, Result};
use duo_core::cache_spec::{CachePlan, Window};
use duo_core::config::ModelConfig;
use duo_core::pattern::{HeadGates, HeadPattern, Layout};
use duo_kv::{PrefillMode, SequenceKv};
use std::path::PathBuf;

/// Which heads keep a full cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// Every head (full attention).
    #[default]
    Full,
    /// The heads a DuoAttention pattern selects.
    Duo,
    /// No head (StreamingLLM: every head keeps sink + recent).
    Streaming,
    /// Seeded random heads: as many per layer as the pattern selects (with `--pattern`),
    /// else the same global count.
    Random,
}

impl std::str::FromStr for Method {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "full" => Method::Full,
            "duo" => Method::Duo,
            "streaming" => Method::Streaming,
            "random" => Method::Random,
            _ => return Err(EngineError::InvalidParameter { name: "method", reason: format!("`{s}` is not one of full, duo, streaming, random") }),
        })
    }
}

/// How the KV cache stores keys and values. The CPU backend caches `f32` (the default),
/// `f16` (half the memory) or int8 (the GPU's int8 rows: a quarter of `f32`'s bytes plus a
/// 4-byte scale per row; attention still computes in `f32`); the CUDA backend caches bf16
/// (the default), fp8 (e4m3 with a power-of-two scale per row: half of bf16's bytes plus 4
/// per row), int8 (the same bytes, a scale of `amax / 127` per row: more accurate) or int4
/// (a quarter of bf16's bytes plus an f16 step and minimum per row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// 4 bytes per element.
    F32,
    /// 2 bytes per element: IEEE half precision.
    F16,
    /// 2 bytes per element: bfloat16.
    Bf16,
    /// 1 byte per element (e4m3) and a 4-byte scale per row of `head_dim`.
    Fp8,
    /// 1 byte per element (int8) and a 4-byte scale per row of `head_dim`.
    Int8,
    /// 4 bits per element (asymmetric int4) and a 4-byte step and minimum per row.
    Int4,
    /// Keys as int8, values as int4 (0.75 bytes per element, a 4-byte word per row of
    /// each): a quarter more memory than int4, and within 0.03 of the exact cache where
    /// int4 is not (simulated on the CPU, EVALUATION.md).
    K8V4,
}

impl KvDtype {
    /// Bits per element.
    pub fn bits(self) -> usize {
        match self {
            KvDtype::F32 => 32,
            KvDtype::F16 | KvDtype::Bf16 => 16,
            KvDtype::Fp8 | KvDtype::Int8 => 8,
            // The mean of the keys' 8 and the values' 4 (a row of each per position).
            KvDtype::K8V4 => 6,
            KvDtype::Int4 => 4,
        }
    }

    /// Bytes of scales per cached row (one position of one head, keys or values).
    pub fn scale_bytes(self) -> usize {
        if matches!(self, KvDtype::Fp8 | KvDtype::Int8 | KvDtype::Int4 | KvDtype::K8V4) { 4 } else { 0 }
    }

    /// How many rows of this GPU cache type one bf16 window row spans in the GPU's paged
    /// pool (`streaming` bf16 beside fp8 or int8: 2, beside int4 or k8v4: 4; duo-cuda's
    /// `paged::window_widths`, the wider side's): there a window row takes the bytes, scale
    /// words included, of that many of the cache's rows. `None` where the pair is not the
    /// GPU's bf16 window beside a quantised cache.
    pub fn gpu_window_width(self, streaming: KvDtype) -> Option<usize> {
        let (kv, st) = (self.gpu()?, streaming.gpu()?);
        if kv == st {
            return None;
        }
        duo_cuda::paged::window_widths(kv, st).map(|(k, v)| k.max(v))
    }

    /// Whether the GPU may keep streaming heads in `streaming` beside a cache of this type:
    /// the same type, or a bf16 window ([`KvDtype::gpu_window_width`]).
    pub fn gpu_takes_streaming(self, streaming: KvDtype) -> bool {
        streaming == self || self.gpu_window_width(streaming).is_some()
    }

    /// The CUDA backend's cache type for this one, where it has it.
    pub fn gpu(self) -> Option<duo_cuda::decode_attention::KvType> {
        use duo_cuda::decode_attention::KvType;
        match self {
            KvDtype::Bf16 => Some(KvType::Bf16),
            KvDtype::Fp8 => Some(KvType::Fp8),
            KvDtype::Int8 => Some(KvType::Int8),
            KvDtype::Int4 => Some(KvType::Int4),
            KvDtype::K8V4 => Some(KvType::K8V4),
            KvDtype::F32 | KvDtype::F16 => None,
        }
    }

    /// Whether the CUDA backend caches this type.
    pub fn on_gpu(self) -> bool {
        self.gpu().is_some()
    }

    /// Whether the CPU backend caches this type (int8: the GPU's rows, `duo_kernels::kv8`).
    pub fn on_cpu(self) -> bool {
        matches!(self, KvDtype::F32 | KvDtype::F16 | KvDtype::Int8)
    }
}

impl std::str::FromStr for KvDtype {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "f32" => KvDtype::F32,
            "f16" => KvDtype::F16,
            "bf16" => KvDtype::Bf16,
            "fp8" => KvDtype::Fp8,
            // q8: llama.cpp's name for its 8-bit cache (here the same int8 rows).
            "int8" | "q8" => KvDtype::Int8,
            "int4" => KvDtype::Int4,
            "k8v4" => KvDtype::K8V4,
            _ => return Err(EngineError::InvalidParameter { name: "kv-dtype", reason: format!("`{s}` is not one of f32, f16, int8 (CPU) or bf16, fp8, int8, int4, k8v4 (GPU)") }),
        })
    }
}

/// Where a head pattern comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternSource {
    /// A folder with `full_attention_heads.tsv` (and `config.json`), or the table itself.
    Path(PathBuf),
    /// The patterns shipped for the default model (compiled in): the head layout's or the
    /// layer layout's optimisation, following the method's layout.
    Shipped,
}

impl PatternSource {
    /// Loads the gates (`layout` picks the shipped table).
    pub fn load(&self, layout: Layout) -> Result<HeadGates> {
        match self {
            PatternSource::Path(p) => Ok(HeadGates::load(p)?),
            PatternSource::Shipped => crate::shipped::gates(layout),
        }
    }
}

/// The streaming window (sink, recent) where neither the user nor the pattern names one:
/// the reference's evaluation default.
pub const DEFAULT_WINDOW: (usize, usize) = (64, 256);

/// The streaming window (sink, recent) to deploy with: each part the user gives, else the
/// window the pattern's gates were trained against (`trained`, from its `config.json`),
/// else [`DEFAULT_WINDOW`].
pub fn deploy_window(sink: Option<usize>, recent: Option<usize>, trained: Option<(usize, usize)>) -> (usize, usize) {
    let (s, r) = trained.unwrap_or(DEFAULT_WINDOW);
    (sink.unwrap_or(s), recent.unwrap_or(r))
}

/// Everything the user says about attention. The streaming window the user leaves out is
/// the one the pattern was trained against (`sink_size` and `recent_size` in its
/// `config.json`: a gate says how much a head needs beyond that window), else
/// [`DEFAULT_WINDOW`].
#[derive(Debug, Clone)]
pub struct MethodSpec {
    /// The method.
    pub method: Method,
    /// Where the head pattern comes from.
    pub pattern: Option<PatternSource>,
    /// Fraction of KV heads that stream (default 0.5).
    pub sparsity: Option<f64>,
    /// Gate threshold instead of a sparsity.
    pub threshold: Option<f32>,
    /// Head or layer layout.
    pub layout: Layout,
    /// Attention-sink tokens (`None`: the pattern's trained window, else [`DEFAULT_WINDOW`]).
    pub sink: Option<usize>,
    /// Recent-window tokens (`None`: as `sink`).
    pub recent: Option<usize>,
    /// Seed for `random`.
    pub seed: u64,
    /// How streaming heads see chunked prefill.
    pub prefill: PrefillMode,
    /// Prefill chunk size in tokens.
    pub chunk: usize,
    /// Element type of the KV cache (`None`: the backend's own, f32 on the CPU, bf16 on
    /// the GPU).
    pub kv_dtype: Option<KvDtype>,
    /// The streaming heads' own element type (`None`: `kv_dtype`'s): on the CPU any of its
    /// types, on the GPU bf16 beside an fp8, int8, int4 or k8v4 cache.
    pub kv_dtype_streaming: Option<KvDtype>,
}

impl Default for MethodSpec {
    fn default() -> Self {
        Self { method: Method::Full, pattern: None, sparsity: None, threshold: None, layout: Layout::Head, sink: None, recent: None, seed: 0, prefill: PrefillMode::Lambda, chunk: 4096, kv_dtype: None, kv_dtype_streaming: None }
    }
}

/// A method resolved against a model.
#[derive(Debug, Clone)]
pub struct ResolvedMethod {
    /// Which KV heads are retrieval heads.
    pub pattern: HeadPattern,
    /// The streaming window.
    pub window: Window,
    /// Prefill visibility for streaming heads.
    pub prefill: PrefillMode,
    /// Prefill chunk size.
    pub chunk: usize,
    /// The cache's element type as asked (`None`: the backend's own).
    pub kv_dtype: Option<KvDtype>,
    /// The streaming heads' element type as asked (`None`: `kv_dtype`'s).
    pub kv_dtype_streaming: Option<KvDtype>,
    /// The per-layer cache specs of a CPU cache: f32 elements, or f16 or int8 when asked (the
    /// streaming heads' own type where `kv_dtype_streaming` gives one).
    pub plan: CachePlan,
    /// A CPU cache that rounds what it holds as a 4-bit scheme would, for accuracy studies
    /// ([`duo_kv::KvSim`]; `duo eval` sets it from `DUO_SIMULATE_KV`); `None`: exact.
    pub simulate: Option<duo_kv::KvSim>,
}

impl ResolvedMethod {
    /// A fresh, empty cache for one sequence.
    pub fn new_cache(&self) -> SequenceKv {
        SequenceKv::new(&self.plan, self.prefill).with_sim(self.simulate)
    }
}

impl MethodSpec {
    /// Resolves the method for a model, checking the pattern's shape.
    pub fn resolve(&self, config: &ModelConfig) -> Result<ResolvedMethod> {
        let (layers, kv) = (config.n_layers, config.n_kv_heads);
        if self.chunk == 0 {
            return Err(EngineError::InvalidParameter { name: "chunk", reason: "must be at least 1".into() });
        }
        if self.sparsity.is_some() && self.threshold.is_some() {
            return Err(EngineError::InvalidParameter { name: "threshold", reason: "give either --sparsity or --threshold, not both".into() });
        }
        // The gates, read once: full attention needs none (nor their window).
        let gates = match (self.method, &self.pattern) {
            (Method::Full, _) | (_, None) => None,
            (_, Some(p)) => Some(p.load(self.layout)?),
        };
        let trained = gates.as_ref().map(HeadGates::trained_window).transpose()?.flatten();
        let (sink, recent) = deploy_window(self.sink, self.recent, trained);
        // Windows beyond the context would never fill; bounding them here keeps every
        // allocation derived from them (CPU rings, GPU window rows) within the model's size.
        for (name, value, given) in [("sink", sink, self.sink.is_some()), ("recent", recent, self.recent.is_some())] {
            if value > config.context_length {
                let from = if given { "" } else { " (the window the pattern's config.json names)" };
                return Err(EngineError::InvalidParameter { name, reason: format!("{value} tokens{from} exceed the model's context of {}", config.context_length) });
            }
        }
        let window = Window::new(sink, recent)?;
        let sparsity = self.sparsity.unwrap_or(0.5);
        let binarise = |gates: &HeadGates| -> Result<HeadPattern> {
            gates.check_shape(layers, kv)?;
            Ok(match self.threshold {
                Some(t) if self.layout == Layout::Head => gates.binarise_threshold(t)?,
                Some(_) => return Err(EngineError::InvalidParameter { name: "threshold", reason: "--layout layer takes --sparsity".into() }),
                None => gates.binarise_sparsity(sparsity, self.layout)?,
            })
        };
        let pattern = match self.method {
            Method::Full => HeadPattern::all_retrieval(layers, kv),
            Method::Streaming => HeadPattern::all_streaming(layers, kv),
            Method::Duo => {
                let gates = gates.as_ref().ok_or(EngineError::InvalidParameter { name: "pattern", reason: "--method duo needs --pattern DIR (a folder with full_attention_heads.tsv)".into() })?;
                binarise(gates)?
            }
            Method::Random => match &gates {
                Some(g) => HeadPattern::random_per_layer(&binarise(g)?, self.seed),
                None => {
                    if self.layout == Layout::Layer {
                        let full_layers = ((1.0 - sparsity) * layers as f64).round() as usize;
                        let flat = HeadPattern::random_global(layers, 1, full_layers, self.seed);
                        HeadPattern::from_rows((0..layers).map(|l| vec![flat.is_retrieval(l, 0); kv]).collect())?
                    } else {
                        let count = ((1.0 - sparsity) * (layers * kv) as f64).round() as usize;
                        HeadPattern::random_global(layers, kv, count, self.seed)
                    }
                }
            },
        };
        // The CPU cache's plan (the GPU's pool counts its own): f32 unless a CPU type is asked
        // for (f16, or int8 rows with a 4-byte scale each).
        let cpu = self.kv_dtype.filter(|d| d.on_cpu()).unwrap_or(KvDtype::F32);
        let mut plan = CachePlan::with_bits(&pattern, config.head_dim, cpu.bits(), window).with_row_scales(cpu.scale_bytes());
        if let Some(s) = self.kv_dtype_streaming.filter(|d| d.on_cpu()) {
            plan = plan.with_streaming(s.bits(), s.scale_bytes());
        }
        Ok(ResolvedMethod { pattern, window, prefill: self.prefill, chunk: self.chunk, kv_dtype: self.kv_dtype, kv_dtype_streaming: self.kv_dtype_streaming, plan, simulate: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_longer_than_the_context_are_refused_by_name() {
        let config = duo_model::random::shape("smollm2-135m").expect("preset");
        for (sink, recent, name) in [(1usize << 40, 256, "sink"), (64, usize::MAX, "recent"), (8193, 1, "sink")] {
            let e = MethodSpec { sink: Some(sink), recent: Some(recent), ..Default::default() }.resolve(&config).unwrap_err();
            assert!(matches!(e, EngineError::InvalidParameter { name: n, .. } if n == name), "{e}");
            assert!(e.to_string().contains("8192"), "{e}");
        }
        assert!(MethodSpec { sink: Some(8192), recent: Some(8192), ..Default::default() }.resolve(&config).is_ok());
    }

    #[test]
    fn the_window_left_out_is_the_patterns_trained_one_and_a_given_one_wins() {
        let config = duo_model::random::shape("smollm2-135m").expect("preset");
        let dir = std::env::temp_dir().join(format!("duo-window-{}", std::process::id()));
        let mut gates = HeadGates::new((0..config.n_layers).map(|l| (0..config.n_kv_heads).map(|h| ((l * 7 + h * 3) % 10) as f32 / 10.0).collect()).collect()).unwrap();
        gates.config = serde_json::json!({"sink_size": 32, "recent_size": 512});
        gates.save(&dir).unwrap();
        let spec = |method, sink, recent| MethodSpec { method, pattern: Some(PatternSource::Path(dir.clone())), sink, recent, ..Default::default() };
        let window = |s: MethodSpec| s.resolve(&config).unwrap().window;
        for method in [Method::Duo, Method::Streaming, Method::Random] {
            assert_eq!(window(spec(method, None, None)), Window::new(32, 512).unwrap(), "{method:?}: the trained window");
            assert_eq!(window(spec(method, Some(4), None)), Window::new(4, 512).unwrap(), "{method:?}: --sink alone");
            assert_eq!(window(spec(method, None, Some(100))), Window::new(32, 100).unwrap(), "{method:?}: --recent alone");
        }
        // Without a pattern, or one whose config names no window: the default.
        let (sink, recent) = DEFAULT_WINDOW;
        assert_eq!(window(MethodSpec { method: Method::Streaming, ..Default::default() }), Window::new(sink, recent).unwrap());
        gates.config = serde_json::json!({"seed": 1});
        gates.save(&dir).unwrap();
        assert_eq!(window(spec(Method::Duo, None, None)), Window::new(sink, recent).unwrap());
        // A window the config names badly is an error, not a silent default; one beyond the
        // context says where it came from.
        gates.config = serde_json::json!({"sink_size": "sixty-four", "recent_size": 256});
        gates.save(&dir).unwrap();
        assert!(spec(Method::Duo, None, None).resolve(&config).is_err());
        gates.config = serde_json::json!({"sink_size": 64, "recent_size": 100_000});
        gates.save(&dir).unwrap();
        let e = spec(Method::Duo, None, None).resolve(&config).unwrap_err().to_string();
        assert!(e.contains("recent") && e.contains("config.json") && e.contains("8192"), "{e}");
        assert!(spec(Method::Duo, None, Some(512)).resolve(&config).is_ok(), "a given window overrides it");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_shipped_patterns_deploy_with_the_window_they_were_trained_with() {
        let config = duo_model::random::shape("smollm2-135m").expect("preset");
        for layout in [Layout::Head, Layout::Layer] {
            let trained = crate::shipped::gates(layout).unwrap().trained_window().unwrap().expect("the shipped config names its window");
            let resolved = MethodSpec { method: Method::Duo, pattern: Some(PatternSource::Shipped), layout, ..Default::default() }.resolve(&config).unwrap();
            assert_eq!(resolved.window, Window::new(trained.0, trained.1).unwrap(), "{layout:?}");
        }
    }
}
