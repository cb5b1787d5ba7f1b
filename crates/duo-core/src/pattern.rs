//! Head patterns: which KV heads keep a full cache.
//!
//! Two types. [`HeadGates`] holds the raw gate values learned by identification, in the
//! DuoAttention on-disk format (`full_attention_heads.tsv`, one row per layer and one
//! tab-separated column per KV head, plus `config.json`). [`HeadPattern`] is the binary
//! decision the engine runs with.
//!
//! Binarisation is deterministic. With a sparsity `s` over `N` KV heads exactly
//! `round((1 - s) * N)` heads become retrieval heads: the heads with the highest gates,
//! ties broken in favour of the lower `(layer, head)` index. (The reference code breaks
//! ties with unseeded noise, so its choice is not reproducible.) With `--threshold t`
//! every head whose gate is `>= t` is a retrieval head; [`HeadGates::quantile`] gives
//! the reference's threshold for a sparsity.
//!
//! The layer layout (ZigzagAttention) makes every layer entirely retrieval or entirely
//! streaming: layers are ranked by their mean gate (ties: lower layer first) and the
//! top `round((1 - s) * layers)` become full layers.

use crate::error::{CoreError, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// File name of the gate table inside a pattern folder.
pub const GATES_FILE: &str = "full_attention_heads.tsv";
/// File name of the settings beside it.
pub const CONFIG_FILE: &str = "config.json";

/// How retrieval heads may be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// Any KV head may be retrieval or streaming (DuoAttention).
    #[default]
    Head,
    /// Every layer is entirely retrieval or entirely streaming (ZigzagAttention).
    Layer,
}

impl std::str::FromStr for Layout {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "head" => Ok(Layout::Head),
            "layer" => Ok(Layout::Layer),
            _ => Err(CoreError::InvalidSetting { name: "layout", value: s.into(), expected: "`head` or `layer`" }),
        }
    }
}

/// Raw gate values, one per (layer, KV head), clipped to [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct HeadGates {
    gates: Vec<Vec<f32>>, // [layer][kv_head]
    /// The `config.json` found beside the table (settings of the run that made it).
    pub config: serde_json::Value,
}

/// Writes rows of gates as `full_attention_heads.tsv` in `dir` (created if missing), one
/// tab-separated row per layer, exactly as given (raw optimiser output may lie slightly
/// outside [0, 1]; readers clip on load).
pub fn write_table(dir: &Path, rows: &[Vec<f32>]) -> Result<()> {
    let io = |path: PathBuf| move |source| CoreError::Io { path, source };
    std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    let mut text = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().map(|g| format!("{g:.18e}")).collect();
        let _ = writeln!(text, "{}", cells.join("\t"));
    }
    let table = dir.join(GATES_FILE);
    std::fs::write(&table, text).map_err(io(table.clone()))
}

impl HeadGates {
    /// Builds gates from rows, one per layer. Rows must be non-empty, of equal length
    /// and finite; values are clipped to [0, 1].
    pub fn new(rows: Vec<Vec<f32>>) -> Result<Self> {
        Self::from_rows(rows, Path::new("<memory>"))
    }

    fn from_rows(rows: Vec<Vec<f32>>, path: &Path) -> Result<Self> {
        let malformed = |reason: String| CoreError::MalformedPattern { path: path.to_path_buf(), reason };
        if rows.is_empty() {
            return Err(malformed("no layers".into()));
        }
        let width = rows[0].len();
        if width == 0 {
            return Err(malformed("layer 0 has no heads".into()));
        }
        for (l, row) in rows.iter().enumerate() {
            if row.len() != width {
                return Err(malformed(format!("layer {l} has {} heads, layer 0 has {width}", row.len())));
            }
            if let Some(h) = row.iter().position(|g| !g.is_finite()) {
                return Err(malformed(format!("gate (layer {l}, head {h}) is not a finite number")));
            }
        }
        let gates = rows.into_iter().map(|r| r.into_iter().map(|g| g.clamp(0.0, 1.0)).collect()).collect();
        Ok(Self { gates, config: serde_json::Value::Object(Default::default()) })
    }

    /// Reads `full_attention_heads.tsv` (and `config.json` when present) from a folder,
    /// or the table itself when `path` is a file.
    pub fn load(path: &Path) -> Result<Self> {
        let (dir, table) = if path.is_dir() { (path.to_path_buf(), path.join(GATES_FILE)) } else {
            (path.parent().map(Path::to_path_buf).unwrap_or_default(), path.to_path_buf())
        };
        let text = std::fs::read_to_string(&table).map_err(|source| CoreError::Io { path: table.clone(), source })?;
        let config_path = dir.join(CONFIG_FILE);
        let config = if config_path.exists() {
            Some(std::fs::read_to_string(&config_path).map_err(|source| CoreError::Io { path: config_path.clone(), source })?)
        } else {
            None
        };
        Self::parse(&text, config.as_deref(), &table)
    }

    /// Gates from the text of a `full_attention_heads.tsv` and, if given, of its
    /// `config.json`; `table` names the source in errors.
    pub fn parse(text: &str, config: Option<&str>, table: &Path) -> Result<Self> {
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let row = line
                .split('\t')
                .enumerate()
                .map(|(c, v)| {
                    v.trim().parse::<f32>().map_err(|_| CoreError::MalformedPattern {
                        path: table.to_path_buf(),
                        reason: format!("line {}, column {}: `{}` is not a number", i + 1, c + 1, v.trim()),
                    })
                })
                .collect::<Result<Vec<f32>>>()?;
            rows.push(row);
        }
        let mut gates = Self::from_rows(rows, table)?;
        if let Some(text) = config {
            let config_path = table.with_file_name(CONFIG_FILE);
            gates.config = serde_json::from_str(text).map_err(|source| CoreError::Json { path: config_path, source })?;
        }
        Ok(gates)
    }

    /// The streaming window the gates were trained against: `sink_size` and `recent_size`
    /// of `config.json` (the reference's keys), `None` where the config names neither. Gates
    /// measure how much a head needs beyond that window, so it is the window to deploy them
    /// with unless told otherwise.
    pub fn trained_window(&self) -> Result<Option<(usize, usize)>> {
        let read = |key: &str| -> Result<Option<usize>> {
            match self.config.get(key) {
                None => Ok(None),
                Some(v) => v.as_u64().and_then(|n| usize::try_from(n).ok()).map(Some).ok_or_else(|| CoreError::MalformedPattern {
                    path: PathBuf::from(CONFIG_FILE),
                    reason: format!("`{key}` is {v}, not a whole number of tokens"),
                }),
            }
        };
        match (read("sink_size")?, read("recent_size")?) {
            (Some(sink), Some(recent)) => Ok(Some((sink, recent))),
            (None, None) => Ok(None),
            _ => Err(CoreError::MalformedPattern { path: PathBuf::from(CONFIG_FILE), reason: "names one of `sink_size` and `recent_size` without the other".into() }),
        }
    }

    /// Writes the table and `config.json` into `dir` (created if missing).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let io = |path: PathBuf| move |source| CoreError::Io { path, source };
        write_table(dir, &self.gates)?;
        let config = dir.join(CONFIG_FILE);
        let json = serde_json::to_string_pretty(&self.config).map_err(|source| CoreError::Json { path: config.clone(), source })?;
        std::fs::write(&config, json).map_err(io(config.clone()))
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.gates.len()
    }

    /// KV heads per layer.
    pub fn n_kv_heads(&self) -> usize {
        self.gates[0].len()
    }

    /// The gate of one KV head.
    pub fn gate(&self, layer: usize, head: usize) -> f32 {
        self.gates[layer][head]
    }

    /// All gates, row per layer.
    pub fn rows(&self) -> &[Vec<f32>] {
        &self.gates
    }

    /// Errors unless the gates fit a model of `layers` x `kv_heads`.
    pub fn check_shape(&self, layers: usize, kv_heads: usize) -> Result<()> {
        check_shape(self.n_layers(), self.n_kv_heads(), layers, kv_heads)
    }

    /// Quantile of all gates at `q` with linear interpolation between order statistics
    /// (what `torch.quantile` computes): the reference's threshold for sparsity `q`.
    pub fn quantile(&self, q: f64) -> Result<f32> {
        check_fraction("sparsity", q)?;
        let mut all: Vec<f32> = self.gates.iter().flatten().copied().collect();
        all.sort_by(f32::total_cmp);
        let pos = q * (all.len() - 1) as f64;
        let lo = pos.floor() as usize;
        let hi = pos.ceil() as usize;
        let frac = pos - lo as f64;
        Ok((all[lo] as f64 + (all[hi] as f64 - all[lo] as f64) * frac) as f32)
    }

    /// Every head whose gate is `>= threshold` becomes a retrieval head.
    pub fn binarise_threshold(&self, threshold: f32) -> Result<HeadPattern> {
        if !threshold.is_finite() {
            return Err(CoreError::InvalidSetting { name: "threshold", value: threshold.to_string(), expected: "a finite number" });
        }
        Ok(HeadPattern { retrieval: self.gates.iter().map(|r| r.iter().map(|&g| g >= threshold).collect()).collect() })
    }

    /// Exactly `round((1 - sparsity) * N)` retrieval heads (see the module docs for
    /// the ranking and tie-break of each layout).
    pub fn binarise_sparsity(&self, sparsity: f64, layout: Layout) -> Result<HeadPattern> {
        check_fraction("sparsity", sparsity)?;
        let (layers, heads) = (self.n_layers(), self.n_kv_heads());
        let mut retrieval = vec![vec![false; heads]; layers];
        match layout {
            Layout::Head => {
                let keep = ((1.0 - sparsity) * (layers * heads) as f64).round() as usize;
                let mut order: Vec<(usize, usize)> = (0..layers).flat_map(|l| (0..heads).map(move |h| (l, h))).collect();
                // Stable sort: equal gates keep their (layer, head) order.
                order.sort_by(|a, b| self.gates[b.0][b.1].total_cmp(&self.gates[a.0][a.1]));
                for &(l, h) in order.iter().take(keep) {
                    retrieval[l][h] = true;
                }
            }
            Layout::Layer => {
                let keep = ((1.0 - sparsity) * layers as f64).round() as usize;
                let means: Vec<f64> = self.gates.iter().map(|r| r.iter().map(|&g| g as f64).sum::<f64>() / heads as f64).collect();
                let mut order: Vec<usize> = (0..layers).collect();
                order.sort_by(|&a, &b| means[b].total_cmp(&means[a]));
                for &l in order.iter().take(keep) {
                    retrieval[l].fill(true);
                }
            }
        }
        Ok(HeadPattern { retrieval })
    }
}

fn check_fraction(name: &'static str, v: f64) -> Result<()> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(CoreError::InvalidSetting { name, value: v.to_string(), expected: "a fraction between 0 and 1" })
    }
}

fn check_shape(pattern_layers: usize, pattern_kv_heads: usize, model_layers: usize, model_kv_heads: usize) -> Result<()> {
    if pattern_layers == model_layers && pattern_kv_heads == model_kv_heads {
        Ok(())
    } else {
        Err(CoreError::PatternShape { pattern_layers, pattern_kv_heads, model_layers, model_kv_heads })
    }
}

/// The binary decision: `retrieval[layer][kv_head]` is true for a full-cache head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadPattern {
    retrieval: Vec<Vec<bool>>,
}

impl HeadPattern {
    /// Every head is a retrieval head (full attention).
    pub fn all_retrieval(layers: usize, kv_heads: usize) -> Self {
        Self { retrieval: vec![vec![true; kv_heads]; layers] }
    }

    /// Every head is a streaming head (StreamingLLM).
    pub fn all_streaming(layers: usize, kv_heads: usize) -> Self {
        Self { retrieval: vec![vec![false; kv_heads]; layers] }
    }

    /// Builds a pattern from explicit rows.
    pub fn from_rows(retrieval: Vec<Vec<bool>>) -> Result<Self> {
        let w = retrieval.first().map(Vec::len).unwrap_or(0);
        if w == 0 || retrieval.iter().any(|r| r.len() != w) {
            return Err(CoreError::InvalidConfig("a head pattern needs equal, non-empty rows".into()));
        }
        Ok(Self { retrieval })
    }

    /// A seeded random pattern with the same number of retrieval heads in each layer as `like`.
    pub fn random_per_layer(like: &HeadPattern, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let retrieval = like
            .retrieval
            .iter()
            .map(|row| {
                let k = row.iter().filter(|&&r| r).count();
                let mut heads: Vec<usize> = (0..row.len()).collect();
                heads.shuffle(&mut rng);
                let mut out = vec![false; row.len()];
                for &h in &heads[..k] {
                    out[h] = true;
                }
                out
            })
            .collect();
        Self { retrieval }
    }

    /// A seeded random pattern with `count` retrieval heads anywhere in the model.
    pub fn random_global(layers: usize, kv_heads: usize, count: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut all: Vec<usize> = (0..layers * kv_heads).collect();
        all.shuffle(&mut rng);
        let mut retrieval = vec![vec![false; kv_heads]; layers];
        for &i in all.iter().take(count.min(layers * kv_heads)) {
            retrieval[i / kv_heads][i % kv_heads] = true;
        }
        Self { retrieval }
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.retrieval.len()
    }

    /// KV heads per layer.
    pub fn n_kv_heads(&self) -> usize {
        self.retrieval[0].len()
    }

    /// Whether one KV head keeps a full cache.
    pub fn is_retrieval(&self, layer: usize, head: usize) -> bool {
        self.retrieval[layer][head]
    }

    /// The row of one layer.
    pub fn layer(&self, layer: usize) -> &[bool] {
        &self.retrieval[layer]
    }

    /// Retrieval heads in each layer.
    pub fn retrieval_per_layer(&self) -> Vec<usize> {
        self.retrieval.iter().map(|r| r.iter().filter(|&&x| x).count()).collect()
    }

    /// Retrieval heads in the whole model.
    pub fn retrieval_count(&self) -> usize {
        self.retrieval_per_layer().iter().sum()
    }

    /// Streaming heads in the whole model.
    pub fn streaming_count(&self) -> usize {
        self.n_layers() * self.n_kv_heads() - self.retrieval_count()
    }

    /// True when no layer mixes the two kinds.
    pub fn is_layer_exclusive(&self) -> bool {
        self.retrieval.iter().all(|r| r.iter().all(|&x| x == r[0]))
    }

    /// Errors unless the pattern fits a model of `layers` x `kv_heads`.
    pub fn check_shape(&self, layers: usize, kv_heads: usize) -> Result<()> {
        check_shape(self.n_layers(), self.n_kv_heads(), layers, kv_heads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn official(name: &str) -> Option<HeadGates> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference/duo-attention-patterns").join(name);
        dir.exists().then(|| HeadGates::load(&dir).expect("official pattern loads"))
    }

    #[test]
    fn the_trained_window_is_read_from_the_config_and_malformed_ones_are_refused() {
        let table = Path::new("t/full_attention_heads.tsv");
        let with = |config: &str| HeadGates::parse("0.5\t1\n", Some(config), table).unwrap().trained_window();
        assert_eq!(with(r#"{"sink_size": 64, "recent_size": 1024, "seed": 1}"#).unwrap(), Some((64, 1024)));
        assert_eq!(with(r#"{"seed": 1}"#).unwrap(), None);
        assert_eq!(HeadGates::parse("0.5\t1\n", None, table).unwrap().trained_window().unwrap(), None);
        for bad in [r#"{"sink_size": 64}"#, r#"{"recent_size": 8}"#, r#"{"sink_size": -1, "recent_size": 8}"#, r#"{"sink_size": 64, "recent_size": "many"}"#, r#"{"sink_size": 1.5, "recent_size": 8}"#] {
            let e = with(bad).unwrap_err();
            assert!(matches!(e, CoreError::MalformedPattern { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn six_official_patterns_load_with_their_shapes() {
        let expected = [
            ("Llama-2-7B-32K-Instruct", 32, 32),
            ("Llama-3-8B-Instruct-Gradient-1048k", 32, 8),
            ("Llama-3-8B-Instruct-Gradient-4194k", 32, 8),
            ("Meta-Llama-3.1-8B-Instruct", 32, 8),
            ("Mistral-7B-Instruct-v0.2", 32, 8),
            ("Mistral-7B-Instruct-v0.3", 32, 8),
        ];
        let mut seen = 0;
        for (name, l, h) in expected {
            let Some(g) = official(name) else { continue };
            seen += 1;
            assert_eq!((g.n_layers(), g.n_kv_heads()), (l, h), "{name}");
            assert!(g.rows().iter().flatten().all(|&x| (0.0..=1.0).contains(&x)), "{name}: clipped");
            assert_eq!(g.config["sink_size"], 128, "{name}: config.json read");
            assert_eq!(g.trained_window().unwrap(), Some((128, 256)), "{name}: trained with sink 128 + recent 256");
            g.check_shape(l, h).unwrap();
            assert!(matches!(g.check_shape(l, h + 1), Err(CoreError::PatternShape { .. })));
        }
        assert!(seen == 6 || std::env::var("CI").is_err(), "official patterns must be present in CI");
    }

    #[test]
    fn llama3_gradient_1048k_matches_the_published_sanity_figures() {
        let Some(g) = official("Llama-3-8B-Instruct-Gradient-1048k") else { return };
        let t = g.quantile(0.5).unwrap();
        assert_eq!(t, 0.9609375);
        let ties: Vec<(usize, usize)> =
            (0..32).flat_map(|l| (0..8).map(move |h| (l, h))).filter(|&(l, h)| g.gate(l, h) == t).collect();
        assert_eq!(ties, vec![(2, 3), (25, 4), (31, 7)]);
        let by_threshold = g.binarise_threshold(t).unwrap();
        let listed = [1, 1, 3, 2, 2, 4, 2, 4, 6, 4, 5, 3, 2, 6, 5, 5, 5, 6, 3, 5, 6, 3, 3, 6, 4, 5, 3, 4, 6, 5, 8, 3];
        assert_eq!(by_threshold.retrieval_per_layer(), listed);
        assert_eq!(by_threshold.retrieval_count(), 130);
        // Exact budget: 128 heads; the tie-break keeps the lowest (layer, head), (2, 3).
        let exact = g.binarise_sparsity(0.5, Layout::Head).unwrap();
        assert_eq!(exact.retrieval_count(), 128);
        assert!(exact.is_retrieval(2, 3) && !exact.is_retrieval(25, 4) && !exact.is_retrieval(31, 7));
        let mut expected = listed.to_vec();
        expected[25] -= 1;
        expected[31] -= 1;
        assert_eq!(exact.retrieval_per_layer(), expected);
    }

    #[test]
    fn layer_layout_keeps_whole_layers_with_the_same_budget() {
        let g = HeadGates::new(vec![vec![0.75, 0.25], vec![0.25, 0.25], vec![1.0, 0.875], vec![0.5, 0.5]]).unwrap();
        let p = g.binarise_sparsity(0.5, Layout::Layer).unwrap();
        assert!(p.is_layer_exclusive());
        // Means 0.5, 0.25, 0.9375, 0.5: layer 2 first, then the tie at 0.5 goes to layer 0.
        assert_eq!(p.retrieval_per_layer(), vec![2, 0, 2, 0]);
    }

    #[test]
    fn layer_ties_prefer_lower_layers() {
        let g = HeadGates::new(vec![vec![0.5, 0.5], vec![0.2, 0.2], vec![0.5, 0.5]]).unwrap();
        let p = g.binarise_sparsity(2.0 / 3.0, Layout::Layer).unwrap();
        assert_eq!(p.retrieval_per_layer(), vec![2, 0, 0]);
    }

    #[test]
    fn head_binarisation_is_exact_and_deterministic() {
        let g = HeadGates::new(vec![vec![1.0, 1.0, 0.3], vec![1.0, 0.0, -0.5]]).unwrap();
        assert_eq!(g.gate(1, 2), 0.0, "negative gates clip to zero");
        let p = g.binarise_sparsity(0.5, Layout::Head).unwrap();
        assert_eq!(p.retrieval_count(), 3);
        assert_eq!(p.layer(0), &[true, true, false]);
        assert_eq!(p.layer(1), &[true, false, false]);
        assert_eq!(g.binarise_sparsity(0.0, Layout::Head).unwrap(), HeadPattern::all_retrieval(2, 3));
        assert_eq!(g.binarise_sparsity(1.0, Layout::Head).unwrap(), HeadPattern::all_streaming(2, 3));
        assert!(g.binarise_sparsity(1.5, Layout::Head).is_err());
    }

    #[test]
    fn malformed_tables_are_rejected_with_position() {
        let dir = std::env::temp_dir().join(format!("duo-pattern-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(GATES_FILE), "1.0\t0.5\n0.2\tabc\n").unwrap();
        let e = HeadGates::load(&dir).unwrap_err().to_string();
        assert!(e.contains("line 2, column 2") && e.contains("abc"), "{e}");
        std::fs::write(dir.join(GATES_FILE), "1.0\t0.5\n0.2\n").unwrap();
        let e = HeadGates::load(&dir).unwrap_err().to_string();
        assert!(e.contains("layer 1 has 1 heads"), "{e}");
        std::fs::write(dir.join(GATES_FILE), "1.0\tNaN\n").unwrap();
        assert!(HeadGates::load(&dir).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = std::env::temp_dir().join(format!("duo-pattern-rt-{}", std::process::id()));
        let mut g = HeadGates::new(vec![vec![0.123_456_79, 1.0], vec![0.0, 0.5]]).unwrap();
        g.config = serde_json::json!({"sink_size": 128, "seed": 7});
        g.save(&dir).unwrap();
        let back = HeadGates::load(&dir).unwrap();
        assert_eq!(back, g);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn random_patterns_are_seeded_and_keep_counts() {
        let like = HeadPattern::from_rows(vec![vec![true, false, false], vec![true, true, false]]).unwrap();
        let a = HeadPattern::random_per_layer(&like, 3);
        assert_eq!(a.retrieval_per_layer(), vec![1, 2]);
        assert_eq!(a, HeadPattern::random_per_layer(&like, 3));
        let g = HeadPattern::random_global(4, 8, 10, 1);
        assert_eq!(g.retrieval_count(), 10);
        assert_eq!(g, HeadPattern::random_global(4, 8, 10, 1));
        assert_ne!(g, HeadPattern::random_global(4, 8, 10, 2));
    }
}
