//! A training-free estimate of which heads retrieve.
//!
//! On the same synthetic samples, measure for every KV head how much of its attention
//! mass (full attention, averaged over its query heads and the loss positions) falls
//! outside the sink + recent window a streaming head would keep. A head that puts mass
//! far back cannot be made streaming without changing its output. One forward pass per
//! sample instead of an optimisation; compared with the learned gates in BENCHMARKS.md.

use crate::dense::{attention, softmax_last_dim, span_mask, DenseModel, Span};
use crate::Result;
use candle_core::{DType, D};
use std::ops::Range;

/// Mean attention mass outside `window` at `positions`, per (layer, KV head):
/// `[layer][kv_head]`, each in [0, 1].
pub fn mass_outside(model: &DenseModel, ids: &[u32], positions: Range<usize>, window: Span) -> Result<Vec<Vec<f32>>> {
    let c = model.config();
    let device = model.device();
    let block = model.block(ids.len());
    // Each query block's causal mask and its indicator of the keys outside the window: the
    // same for every layer, so built once, on the device (span_mask), not per layer on the host.
    let blocks = positions
        .clone()
        .step_by(block)
        .map(|s| {
            let e = (s + block).min(positions.end);
            let keys: Vec<usize> = (0..e).collect();
            let causal = span_mask(s, e, Span::Causal, &keys, device)?;
            let windowed = span_mask(s, e, window, &keys, device)?;
            // Seen by full attention (mask 0) and not by the window (mask -1e30).
            let outside = causal.ge(-1.0)?.minimum(&windowed.lt(-1.0)?)?.to_dtype(DType::F32)?;
            Ok((s, e, causal, outside))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut x = model.embed(ids)?;
    let mut out = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let qkv = model.qkv(l, &x)?;
        let (nkv, group, _, hd) = qkv.q.dims4()?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut total = vec![0f64; nkv];
        for (s, e, mask, outside) in &blocks {
            let (b, keys) = (e - s, *e); // causal: keys 0..e
            let qb = qkv.q.narrow(2, *s, b)?.contiguous()?.reshape((nkv, group * b, hd))?;
            let kb = qkv.k.narrow(1, 0, keys)?;
            let scores = (qb.matmul(&kb.t()?)? * scale)?.reshape((nkv, group, b, keys))?.broadcast_add(mask)?;
            let p = softmax_last_dim(&scores)?;
            let mass = p.broadcast_mul(outside)?.sum(D::Minus1)?.sum(D::Minus1)?.sum(D::Minus1)?; // [nkv]
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
