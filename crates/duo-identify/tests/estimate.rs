//! The training-free estimate (attention mass outside the streaming window) against a
//! direct f64 computation on a small random model.

mod common;

use candle_core::Device;
use common::tiny;
use duo_core::RopeStyle;
use duo_identify::dense::attention;
use duo_identify::estimate::mass_outside;
use duo_identify::{DenseModel, Span};

/// Per layer and KV head: the mean over query heads and `positions` of the softmax mass on
/// keys the full (causal) attention sees and `window` does not, in f64.
fn reference(model: &DenseModel, ids: &[u32], positions: std::ops::Range<usize>, window: Span) -> Vec<Vec<f64>> {
    let mut x = model.embed(ids).expect("embed");
    let mut out = Vec::new();
    for l in 0..model.config().n_layers {
        let qkv = model.qkv(l, &x).expect("qkv");
        let (nkv, group, t, hd) = qkv.q.dims4().expect("dims");
        let q: Vec<f32> = qkv.q.flatten_all().and_then(|v| v.to_vec1()).expect("q");
        let k: Vec<f32> = qkv.k.flatten_all().and_then(|v| v.to_vec1()).expect("k");
        let mut per_head = vec![0f64; nkv];
        for (h, total) in per_head.iter_mut().enumerate() {
            for g in 0..group {
                for i in positions.clone() {
                    let qi = &q[((h * group + g) * t + i) * hd..][..hd];
                    let s: Vec<f64> = (0..=i).map(|j| qi.iter().zip(&k[(h * t + j) * hd..][..hd]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() / (hd as f64).sqrt()).collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                    *total += (0..=i).filter(|&j| !window.sees(i, j)).map(|j| (s[j] - m).exp() / z).sum::<f64>();
                }
            }
            *total /= (positions.len() * group) as f64;
        }
        out.push(per_head);
        x = model.finish_layer(l, &x, &attention(&qkv, Span::Causal, model.block(t)).expect("attention")).expect("layer");
    }
    out
}

#[test]
fn mass_outside_the_window_matches_a_direct_computation() {
    // Blocks of 7 queries: the loss positions span several, the last one partial.
    let model = DenseModel::random(tiny(RopeStyle::Interleaved), 5, &Device::Cpu).expect("model").with_block(Some(7));
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 64).collect();
    let window = Span::Lambda { sink: 2, recent: 5 };
    let got = mass_outside(&model, &ids, 22..40, window).expect("estimate");
    let want = reference(&model, &ids, 22..40, window);
    assert_eq!(got.len(), 3);
    for (l, (g, w)) in got.iter().zip(&want).enumerate() {
        for (h, (a, b)) in g.iter().zip(w).enumerate() {
            assert!((*a as f64 - b).abs() < 1e-5, "layer {l} head {h}: {a} vs {b}");
            assert!(*b > 0.01 && *b < 1.0, "a real fraction: {b}");
        }
    }
    // A window that holds every position leaves nothing outside it.
    let all = mass_outside(&model, &ids, 22..40, Span::Lambda { sink: 0, recent: 64 }).expect("estimate");
    assert!(all.iter().flatten().all(|m| m.abs() < 1e-7), "{all:?}");
}
