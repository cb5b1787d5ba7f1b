//! The optimisation loop: which sample each step sees, AdamW over the gates, the
//! learning-rate schedule, and checkpoints that make a run resumable bit for bit.
//!
//! Every step's sample is drawn from its own generator seeded by `(seed, step)`, so a run
//! resumed from a checkpoint sees exactly the samples an uninterrupted run would.

use crate::gated::{GateValues, GatedModel, LossAndGrad, PhaseSeconds};
use crate::{DenseModel, IdentifyError, Result, Span};
use duo_model::TextTokenizer;
use duo_tasks::{Haystack, PasskeySample, PasskeySpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// Everything that defines an identification run (written to `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentifySettings {
    /// Optimisation steps (batch 1).
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Weight of `mean(|alpha|)` in the loss.
    pub reg: f64,
    /// Shortest sample, in tokens.
    pub min_len: usize,
    /// Longest sample, in tokens.
    pub max_len: usize,
    /// How many evenly spaced lengths between the two (each step draws one).
    pub length_count: usize,
    /// Attention-sink tokens of the student's streaming attention.
    pub sink: usize,
    /// Recent window of the student's streaming attention.
    pub recent: usize,
    /// One gate per layer (ZigzagAttention reading (b)) instead of one per KV head.
    pub layer_gates: bool,
    /// Seed of the data.
    pub seed: u64,
    /// Needles per sample.
    pub passkeys: usize,
    /// Words per passkey.
    pub words: usize,
}

impl Default for IdentifySettings {
    fn default() -> Self {
        Self {
            steps: 2000,
            lr: 0.02,
            reg: 0.05,
            min_len: 2048,
            max_len: 8192,
            length_count: 50,
            sink: 128,
            recent: 256,
            layer_gates: false,
            seed: 42,
            passkeys: 10,
            words: 32,
        }
    }
}

impl IdentifySettings {
    /// Checks the settings against a model's context length.
    pub fn validate(&self, context_length: usize) -> Result<()> {
        let bad = |m: String| Err(IdentifyError::Invalid(m));
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite() && self.reg >= 0.0 && self.reg.is_finite()) {
            return bad(format!("--lr must be positive and --reg non-negative (got {} and {})", self.lr, self.reg));
        }
        if self.min_len == 0 || self.min_len > self.max_len {
            return bad(format!("--min-len {} must be positive and at most --max-len {}", self.min_len, self.max_len));
        }
        if self.max_len > context_length {
            return bad(format!("--max-len {} exceeds the model's context length of {context_length}", self.max_len));
        }
        if self.length_count == 0 || self.recent == 0 {
            return bad("--length-count and --recent must be at least 1".into());
        }
        Ok(())
    }

    /// The sample lengths: `length_count` values evenly spaced from `min_len` to `max_len`.
    pub fn lengths(&self) -> Vec<usize> {
        if self.length_count == 1 || self.min_len == self.max_len {
            return vec![self.max_len];
        }
        let span = (self.max_len - self.min_len) as f64;
        let mut v: Vec<usize> =
            (0..self.length_count).map(|i| self.min_len + (span * i as f64 / (self.length_count - 1) as f64).round() as usize).collect();
        v.dedup();
        v
    }

    /// Learning rate at `step` (0-based): linear warm-up over the first 20% of steps and
    /// linear decay over the last 20%, both floored at 0.1 of the peak.
    pub fn lr_at(&self, step: usize) -> f64 {
        let phase = (self.steps as f64 * 0.2).max(1.0);
        let warm = ((step + 1) as f64 / phase).min(1.0);
        let decay = ((self.steps - step.min(self.steps)) as f64 / phase).min(1.0);
        self.lr * warm.min(decay).max(0.1)
    }

    /// The passkey task of this run.
    pub fn passkey_spec(&self) -> PasskeySpec {
        PasskeySpec { passkeys: self.passkeys, words: self.words, ..Default::default() }
    }
}

/// One step's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    /// Step index (0-based).
    pub step: usize,
    /// Sample length in tokens.
    pub length: usize,
    /// Total loss.
    pub loss: f64,
    /// Distillation part.
    pub distill: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Wall time of the step.
    pub seconds: f64,
    /// Drawing the sample (tokenising its text).
    #[serde(default)]
    pub sample_seconds: f64,
    /// The passes of the step (zero in checkpoints written before they were recorded).
    #[serde(default)]
    pub phases: PhaseSeconds,
}

/// Everything needed to continue a run: gates, optimiser moments, history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// The settings the run started with (a resume must match them).
    pub settings: IdentifySettings,
    /// Steps done.
    pub step: usize,
    /// Gate values.
    pub gates: Vec<f32>,
    /// Gates per layer.
    pub per_layer: usize,
    /// AdamW first moments.
    pub m: Vec<f64>,
    /// AdamW second moments.
    pub v: Vec<f64>,
    /// Per-step records.
    pub log: Vec<StepLog>,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

impl TrainState {
    /// A fresh run: every gate at 1.
    pub fn new(settings: IdentifySettings, layers: usize, kv_heads: usize) -> Self {
        let per_layer = if settings.layer_gates { 1 } else { kv_heads };
        let n = layers * per_layer;
        Self { settings, step: 0, gates: vec![1.0; n], per_layer, m: vec![0.0; n], v: vec![0.0; n], log: Vec::new() }
    }

    /// The gates as [`GateValues`].
    pub fn gate_values(&self) -> GateValues {
        GateValues { values: self.gates.clone(), per_layer: self.per_layer }
    }

    /// One AdamW update (no weight decay) with learning rate `lr`.
    pub fn adamw(&mut self, grad: &[f32], lr: f64) {
        let t = (self.step + 1) as i32;
        let (c1, c2) = (1.0 - BETA1.powi(t), 1.0 - BETA2.powi(t));
        for (i, &g) in grad.iter().enumerate().take(self.gates.len()) {
            let g = g as f64;
            self.m[i] = BETA1 * self.m[i] + (1.0 - BETA1) * g;
            self.v[i] = BETA2 * self.v[i] + (1.0 - BETA2) * g * g;
            let update = lr * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + EPS);
            self.gates[i] = (self.gates[i] as f64 - update) as f32;
        }
    }

    /// Writes the state as JSON (to a temporary file, then renamed).
    pub fn save(&self, path: &Path) -> Result<()> {
        let err = |reason: String| IdentifyError::Checkpoint { path: path.to_path_buf(), reason };
        let json = serde_json::to_string(self).map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
    }

    /// Reads a state written by [`TrainState::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let err = |reason: String| IdentifyError::Checkpoint { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let s: Self = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        let n = s.gates.len();
        if s.m.len() != n || s.v.len() != n || s.per_layer == 0 || !n.is_multiple_of(s.per_layer) || s.step > s.settings.steps {
            return Err(err("inconsistent state (gate, moment and step counts disagree)".into()));
        }
        Ok(s)
    }
}

/// Runs steps of the optimisation.
pub struct Trainer<'a> {
    gated: GatedModel<'a>,
    model: &'a DenseModel,
    tokenizer: &'a TextTokenizer,
    haystack: &'a Haystack,
    settings: IdentifySettings,
}

impl<'a> Trainer<'a> {
    /// Checks the settings against the model.
    pub fn new(model: &'a DenseModel, tokenizer: &'a TextTokenizer, haystack: &'a Haystack, settings: IdentifySettings) -> Result<Self> {
        settings.validate(model.config().context_length)?;
        let gated = GatedModel::new(model, Span::Lambda { sink: settings.sink, recent: settings.recent });
        Ok(Self { gated, model, tokenizer, haystack, settings })
    }

    /// The sample of step `step`.
    pub fn sample(&self, step: usize) -> Result<PasskeySample> {
        let mut rng = StdRng::seed_from_u64(self.settings.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let lengths = self.settings.lengths();
        let length = lengths[rng.gen_range(0..lengths.len())];
        Ok(self.settings.passkey_spec().sample(self.tokenizer, self.haystack, length, &mut rng)?)
    }

    /// Loss and gradient of step `step`'s sample at the given gates, and the seconds the
    /// sample took to draw.
    pub fn loss_and_grad(&self, step: usize, gates: &GateValues) -> Result<(PasskeySample, LossAndGrad, f64)> {
        let start = Instant::now();
        let sample = self.sample(step)?;
        let sample_seconds = start.elapsed().as_secs_f64();
        let lg = self.gated.loss_and_grad(&sample.ids, sample.qa.clone(), gates, self.settings.reg)?;
        Ok((sample, lg, sample_seconds))
    }

    /// Runs the next step of `state`: clamp, loss and gradient, AdamW.
    pub fn step(&self, state: &mut TrainState) -> Result<StepLog> {
        if state.settings != self.settings {
            return Err(IdentifyError::Invalid("the checkpoint was made with different settings".into()));
        }
        if state.per_layer != if self.settings.layer_gates { 1 } else { self.model.config().n_kv_heads } {
            return Err(IdentifyError::Invalid("the checkpoint's gate layout does not fit this model".into()));
        }
        let start = Instant::now();
        for g in &mut state.gates {
            *g = g.clamp(0.0, 1.0);
        }
        let (sample, lg, sample_seconds) = self.loss_and_grad(state.step, &state.gate_values())?;
        let lr = self.settings.lr_at(state.step);
        state.adamw(&lg.grad, lr);
        let log = StepLog {
            step: state.step,
            length: sample.ids.len(),
            loss: lg.total(),
            distill: lg.distill,
            lr,
            seconds: start.elapsed().as_secs_f64(),
            sample_seconds,
            phases: lg.phases,
        };
        state.log.push(log.clone());
        state.step += 1;
        Ok(log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_holds_and_decays_with_floor() {
        let s = IdentifySettings { steps: 100, lr: 0.02, ..Default::default() };
        assert!((s.lr_at(0) - 0.002).abs() < 1e-12, "first step floored at 0.1 lr");
        assert!((s.lr_at(9) - 0.01).abs() < 1e-12);
        assert!((s.lr_at(19) - 0.02).abs() < 1e-12);
        assert!((s.lr_at(50) - 0.02).abs() < 1e-12);
        assert!((s.lr_at(90) - 0.01).abs() < 1e-12);
        assert!((s.lr_at(99) - 0.002).abs() < 1e-12);
    }

    #[test]
    fn lengths_are_evenly_spaced_and_bounded() {
        let s = IdentifySettings { min_len: 1000, max_len: 2000, length_count: 5, ..Default::default() };
        assert_eq!(s.lengths(), vec![1000, 1250, 1500, 1750, 2000]);
        assert!(s.validate(4096).is_ok());
        assert!(s.validate(1500).is_err());
        assert!(IdentifySettings { min_len: 3000, max_len: 2000, ..Default::default() }.validate(8192).is_err());
    }

    #[test]
    fn adamw_first_step_moves_each_gate_by_lr_against_its_gradient_sign() {
        let mut st = TrainState::new(IdentifySettings::default(), 2, 2);
        st.gates = vec![0.5; 4];
        st.adamw(&[1.0, -2.0, 0.0, 1e-3], 0.01);
        // Bias-corrected first step: update = lr * g / |g| (eps aside).
        assert!((st.gates[0] - 0.49).abs() < 1e-6);
        assert!((st.gates[1] - 0.51).abs() < 1e-6);
        assert_eq!(st.gates[2], 0.5);
        assert!((st.gates[3] - 0.49).abs() < 1e-4);
    }

    #[test]
    fn state_round_trips_and_rejects_inconsistency() {
        let dir = std::env::temp_dir().join(format!("duo-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("state.json");
        let mut st = TrainState::new(IdentifySettings::default(), 3, 2);
        st.adamw(&[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 0.02);
        st.log.push(StepLog { step: 0, length: 100, loss: 0.5, distill: 0.4, lr: 0.02, seconds: 1.0, sample_seconds: 0.0, phases: PhaseSeconds::default() });
        st.save(&path).expect("save");
        assert_eq!(TrainState::load(&path).expect("load"), st);
        // A checkpoint written before the passes were timed still loads (zero times).
        let mut old: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        let entries = old["log"].as_array_mut().expect("log");
        assert_eq!(entries.len(), 1);
        for entry in entries {
            let entry = entry.as_object_mut().expect("entry");
            assert!(entry.remove("phases").is_some() && entry.remove("sample_seconds").is_some());
        }
        std::fs::write(&path, old.to_string()).expect("write");
        assert_eq!(TrainState::load(&path).expect("old load").log, st.log);
        std::fs::write(&path, r#"{"settings": 1}"#).expect("write");
        assert!(TrainState::load(&path).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
