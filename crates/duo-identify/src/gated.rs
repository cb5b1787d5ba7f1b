//! The gated model: loss and gate gradients for one sample (ALGORITHM.md §2).
//!
//! Per layer and head the student's attention output is
//! `alpha * teacher_full + (1 - alpha) * student_streaming`, where `teacher_full` is the
//! unmodified model's full attention output of that layer (as the reference code does, so
//! no gradient flows through full attention). The loss is the mean squared error between
//! the teacher's and the student's final-norm hidden states over the loss positions.
//!
//! Memory: a no-grad student pass keeps only each layer's input; the backward pass then
//! recomputes one layer at a time with gradients, pulls the upstream gradient through it
//! (`sum(output * upstream)` has the layer's vector-Jacobian product as its gradient), and
//! drops that layer's graph before the next. Peak memory is one layer's graph plus the
//! stored inputs and teacher attention outputs.

use crate::dense::{attention_with, DenseModel, MaskCache, Span};
use crate::{IdentifyError, Result};
use candle_core::{Tensor, Var};
use std::ops::Range;

/// Gate values for every layer: `per_layer` gates per layer (one per KV head, or one
/// shared by the whole layer).
#[derive(Debug, Clone, PartialEq)]
pub struct GateValues {
    /// `[layer * per_layer + g]`.
    pub values: Vec<f32>,
    /// Gates per layer: the KV head count, or 1 for the layer layout.
    pub per_layer: usize,
}

impl GateValues {
    /// All gates at 1 (the unmodified model).
    pub fn ones(layers: usize, per_layer: usize) -> Self {
        Self { values: vec![1.0; layers * per_layer], per_layer }
    }

    /// One row per layer, one value per KV head (a shared layer gate is repeated).
    pub fn rows(&self, kv_heads: usize) -> Vec<Vec<f32>> {
        self.values
            .chunks(self.per_layer)
            .map(|g| (0..kv_heads).map(|h| if self.per_layer == 1 { g[0] } else { g[h] }).collect())
            .collect()
    }
}

/// Loss and gradient of one sample.
#[derive(Debug, Clone)]
pub struct LossAndGrad {
    /// Distillation loss (MSE).
    pub distill: f64,
    /// Regularisation term `reg * mean(|alpha|)`.
    pub regulariser: f64,
    /// d(total loss)/d(gate), same layout as [`GateValues::values`].
    pub grad: Vec<f32>,
    /// Where the time went.
    pub phases: PhaseSeconds,
}

/// Wall time of each pass of [`GatedModel::loss_and_grad`], the device synchronised at
/// each boundary (on a GPU the host otherwise runs ahead of the kernels it queued).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PhaseSeconds {
    /// The teacher's full-attention forward pass.
    pub teacher: f64,
    /// The student's forward pass without gradients (each layer's input kept).
    pub student: f64,
    /// The loss and the layer-by-layer recomputation with gradients.
    pub backward: f64,
}

impl LossAndGrad {
    /// The total loss.
    pub fn total(&self) -> f64 {
        self.distill + self.regulariser
    }
}

/// Teacher outputs for one sample.
struct Teacher {
    /// Per layer, the full attention output `[n_kv, group, t, hd]`.
    full: Vec<Tensor>,
    /// Final-norm hidden states at the loss positions.
    target: Tensor,
}

/// The gated model around a frozen [`DenseModel`].
pub struct GatedModel<'a> {
    model: &'a DenseModel,
    streaming: Span,
}

impl<'a> GatedModel<'a> {
    /// `streaming` is the student's attention span (sink 128 / recent 256 in the paper).
    pub fn new(model: &'a DenseModel, streaming: Span) -> Self {
        Self { model, streaming }
    }

    fn teacher(&self, ids: &[u32], positions: &Range<usize>, masks: &MaskCache) -> Result<Teacher> {
        let m = self.model;
        let mut x = m.embed(ids)?;
        let mut full = Vec::with_capacity(m.config().n_layers);
        for l in 0..m.config().n_layers {
            let qkv = m.qkv(l, &x)?;
            let a = attention_with(&qkv, Span::Causal, m.block(ids.len()), masks)?;
            x = m.finish_layer(l, &x, &a)?;
            full.push(a);
        }
        let target = m.final_norm(&x)?.narrow(0, positions.start, positions.len())?;
        Ok(Teacher { full, target })
    }

    /// One student layer with gates `alpha` (`[per_layer]`).
    fn student_layer(&self, l: usize, x: &Tensor, full: &Tensor, alpha: &Tensor, masks: &MaskCache) -> Result<Tensor> {
        let m = self.model;
        let qkv = m.qkv(l, x)?;
        let stream = attention_with(&qkv, self.streaming, m.block(x.dim(0)?), masks)?;
        let g = alpha.dim(0)?;
        let a = alpha.reshape((g, 1, 1, 1))?;
        let mixed = (full.broadcast_mul(&a)? + stream.broadcast_mul(&(1.0 - &a)?)?)?;
        m.finish_layer(l, x, &mixed)
    }

    /// The total loss alone (no backward pass): for checks and evaluation.
    pub fn loss(&self, ids: &[u32], positions: Range<usize>, gates: &GateValues, reg: f64) -> Result<f64> {
        self.check(ids, &positions, gates)?;
        let m = self.model;
        let masks = MaskCache::default();
        let teacher = self.teacher(ids, &positions, &masks)?;
        let mut x = m.embed(ids)?;
        for l in 0..m.config().n_layers {
            x = self.student_layer(l, &x, &teacher.full[l], &self.alpha(gates, l)?, &masks)?;
        }
        let y = m.final_norm(&x)?.narrow(0, positions.start, positions.len())?;
        let distill = (y - &teacher.target)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
        let n = gates.values.len() as f64;
        Ok(distill + reg * gates.values.iter().map(|a| a.abs() as f64).sum::<f64>() / n)
    }

    fn alpha(&self, gates: &GateValues, l: usize) -> Result<Tensor> {
        let g = &gates.values[l * gates.per_layer..(l + 1) * gates.per_layer];
        Ok(Tensor::from_slice(g, (g.len(),), self.model.device())?)
    }

    fn check(&self, ids: &[u32], positions: &Range<usize>, gates: &GateValues) -> Result<()> {
        let c = self.model.config();
        let layers = c.n_layers;
        if gates.values.len() != layers * gates.per_layer || !(gates.per_layer == 1 || gates.per_layer == c.n_kv_heads) {
            return Err(IdentifyError::Invalid(format!(
                "{} gates ({} per layer) do not fit {layers} layers of {} KV heads",
                gates.values.len(),
                gates.per_layer,
                c.n_kv_heads
            )));
        }
        if positions.is_empty() || positions.end > ids.len() {
            return Err(IdentifyError::Invalid(format!("loss positions {positions:?} outside a sample of {} tokens", ids.len())));
        }
        Ok(())
    }

    /// Distillation loss and gate gradients on one sample; `positions` are the loss
    /// positions, `reg` the L1 weight.
    pub fn loss_and_grad(&self, ids: &[u32], positions: Range<usize>, gates: &GateValues, reg: f64) -> Result<LossAndGrad> {
        self.check(ids, &positions, gates)?;
        let m = self.model;
        let layers = m.config().n_layers;
        let masks = MaskCache::default();
        let clock = PhaseClock::start(m.device())?;
        let teacher = self.teacher(ids, &positions, &masks)?;
        let teacher_s = clock.lap()?;
        let alpha = |l: usize| self.alpha(gates, l);

        // No-grad student pass, keeping each layer's input.
        let mut inputs = Vec::with_capacity(layers);
        let mut x = m.embed(ids)?;
        for l in 0..layers {
            let next = self.student_layer(l, &x, &teacher.full[l], &alpha(l)?, &masks)?;
            inputs.push(x);
            x = next;
        }
        let student_s = clock.lap()?;

        // Loss on the final hidden states, and its gradient with respect to them.
        let xv = Var::from_tensor(&x)?;
        let y = m.final_norm(xv.as_tensor())?.narrow(0, positions.start, positions.len())?;
        let distill_t = (y - &teacher.target)?.sqr()?.mean_all()?;
        let distill = distill_t.to_scalar::<f32>()? as f64;
        let grads = distill_t.backward()?;
        let mut upstream = grads.get(xv.as_tensor()).ok_or_else(|| IdentifyError::Gradient("final hidden states".into()))?.clone();

        // Layer by layer, last to first.
        let mut grad = vec![0f32; gates.values.len()];
        for l in (0..layers).rev() {
            let xl = Var::from_tensor(&inputs[l])?;
            let al = Var::from_tensor(&alpha(l)?)?;
            let out = self.student_layer(l, xl.as_tensor(), &teacher.full[l], al.as_tensor(), &masks)?;
            let surrogate = (out * &upstream)?.sum_all()?;
            let grads = surrogate.backward()?;
            let ga = grads.get(al.as_tensor()).ok_or_else(|| IdentifyError::Gradient(format!("gates of layer {l}")))?;
            for (dst, v) in grad[l * gates.per_layer..].iter_mut().zip(ga.to_vec1::<f32>()?) {
                *dst = v;
            }
            if l > 0 {
                upstream = grads.get(xl.as_tensor()).ok_or_else(|| IdentifyError::Gradient(format!("input of layer {l}")))?.clone();
            }
        }

        // L1 term: reg * mean(|alpha|); d/d alpha = reg * sign(alpha) / n.
        let n = gates.values.len() as f64;
        let regulariser = reg * gates.values.iter().map(|a| a.abs() as f64).sum::<f64>() / n;
        for (g, a) in grad.iter_mut().zip(&gates.values) {
            let sign = if *a > 0.0 { 1.0 } else if *a < 0.0 { -1.0 } else { 0.0 };
            *g += (reg * sign / n) as f32;
        }
        let phases = PhaseSeconds { teacher: teacher_s, student: student_s, backward: clock.lap()? };
        Ok(LossAndGrad { distill, regulariser, grad, phases })
    }
}

/// Seconds between synchronised points of one device.
struct PhaseClock<'d> {
    device: &'d candle_core::Device,
    last: std::cell::Cell<std::time::Instant>,
}

impl<'d> PhaseClock<'d> {
    fn start(device: &'d candle_core::Device) -> Result<Self> {
        device.synchronize()?;
        Ok(Self { device, last: std::cell::Cell::new(std::time::Instant::now()) })
    }

    /// Seconds since the previous lap, once the device has finished its queued work.
    fn lap(&self) -> Result<f64> {
        self.device.synchronize()?;
        let now = std::time::Instant::now();
        Ok(now.duration_since(self.last.replace(now)).as_secs_f64())
    }
}
