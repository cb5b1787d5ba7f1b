//! A training-free estimate of which heads retrieve.
//!
//! On the same synthetic samples, measure for every KV head how much of its attention
//! mass (full attention, averaged over its query heads and the loss positions) falls
//! outside the sink + recent window a streaming head would keep. A head that puts mass
//! far back cannot be made streaming without changing its output. One forward pass per
//! sample instead of an optimisation; compared with the learned gates in BENCHMARKS.md.

use crate::dense::{attention, DenseModel, Span};
use crate::Result;
use candle_core::{Tensor, D};
use std::ops::Range;

/// Mean attention mass outside `window` at `positions`, per (layer, KV head):
/// `[layer][kv_head]`, each in [0, 1].
pub fn mass_outside(model: &DenseModel, ids: &[u32], positions: Range<usize>, window: Span) -> Result<Vec<Vec<f32>>> {
    let c = model.config();
    let device = model.device();
    let mut x = model.embed(ids)?;
    let mut out = Vec::with_capacity(c.n_layers);
    let block = model.block(ids.len());
    for l in 0..c.n_layers {
        let qkv = model.qkv(l, &x)?;
        let (nkv, group, _, hd) = qkv.q.dims4()?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut total = vec![0f64; nkv];
        for s in positions.clone().step_by(block) {
            let e = (s + block).min(positions.end);
            let b = e - s;
            let keys = e; // causal: keys 0..e
            let mut mask = Vec::with_capacity(b * keys);
            let mut outside = Vec::with_capacity(b * keys);
            for i in s..e {
                for j in 0..keys {
                    mask.push(if j <= i { 0.0f32 } else { -1e30 });
                    outside.push(if j <= i && !window.sees(i, j) { 1.0f32 } else { 0.0 });
                }
            }
            let mask = Tensor::from_vec(mask, (b, keys), device)?;
            let outside = Tensor::from_vec(outside, (b, keys), device)?;
            let qb = qkv.q.narrow(2, s, b)?.contiguous()?.reshape((nkv, group * b, hd))?;
            let kb = qkv.k.narrow(1, 0, keys)?;
            let scores = (qb.matmul(&kb.t()?)? * scale)?.reshape((nkv, group, b, keys))?.broadcast_add(&mask)?;
            let max = scores.max_keepdim(D::Minus1)?;
            let p = scores.broadcast_sub(&max)?.exp()?;
            let p = p.broadcast_div(&p.sum_keepdim(D::Minus1)?)?;
            let mass = p.broadcast_mul(&outside)?.sum(D::Minus1)?.sum(D::Minus1)?.sum(D::Minus1)?; // [nkv]
            for (t, m) in total.iter_mut().zip(mass.to_vec1::<f32>()?) {
                *t += m as f64;
            }
        }
        let n = (positions.len() * group) as f64;
        out.push(total.iter().map(|t| (t / n) as f32).collect());
        let a = attention(&qkv, Span::Causal, block)?;
        x = model.finish_layer(l, &x, &a)?;
    }
    Ok(out)
}
