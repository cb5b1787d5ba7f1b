//! Element-wise and row-wise kernels: RMSNorm, RoPE, SwiGLU, a vectorisable `exp`.
//!
//! Numerics follow llama.cpp where it matters for token-for-token agreement: RMSNorm
//! sums squares in `f64`, RoPE advances the angle by repeated multiplication in `f32`.

use crate::par;

/// RMSNorm of each row of `x` (`[rows, dim]`) in place, times `weight` (`[dim]`).
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    par::for_each_chunk_mut(x, dim, |_, row| {
        let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
        let scale = 1.0 / ((sum / dim as f64) as f32 + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * scale * w;
        }
    });
}

/// RoPE angles for one model: the per-pair inverse frequencies.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>, // [head_dim / 2]
    half_split: bool,
}

impl Rope {
    /// Builds the table. `freq_factors` (Llama 3.1 scaling) divide the frequencies.
    pub fn new(head_dim: usize, theta: f32, half_split: bool, freq_factors: Option<&[f32]>) -> Self {
        let scale = theta.powf(-2.0 / head_dim as f32);
        let mut f = 1.0f32;
        let inv_freq = (0..head_dim / 2)
            .map(|i| {
                let v = f / freq_factors.map_or(1.0, |ff| ff[i]);
                f *= scale;
                v
            })
            .collect();
        Self { inv_freq, half_split }
    }

    /// The inverse frequency of each rotated pair, `[head_dim / 2]`.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Whether pairs are `(i, i + head_dim / 2)` (Hugging Face layout) rather than
    /// adjacent `(2i, 2i + 1)` (GGUF layout).
    pub fn is_half_split(&self) -> bool {
        self.half_split
    }

    /// Rotates `heads` heads of `head_dim` in each row of `x` (`[rows, heads * head_dim]`),
    /// row `r` being at position `first_position + r`.
    pub fn apply(&self, x: &mut [f32], heads: usize, first_position: usize) {
        let hd = self.inv_freq.len() * 2;
        par::for_each_chunk_mut(x, heads * hd, |r, row| {
            let pos = (first_position + r) as f32;
            let (cos, sin): (Vec<f32>, Vec<f32>) = self.inv_freq.iter().map(|f| {
                let a = pos * f;
                (a.cos(), a.sin())
            }).unzip();
            for head in row.chunks_mut(hd) {
                for i in 0..hd / 2 {
                    let (a, b) = if self.half_split { (i, i + hd / 2) } else { (2 * i, 2 * i + 1) };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos[i] - x1 * sin[i];
                    head[b] = x0 * sin[i] + x1 * cos[i];
                }
            }
        });
    }
}

/// `gate = silu(gate) * up`, element-wise, in place.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    // Element-wise, so any chunks give the same bits. Tried: chunks of 256 so that a decode
    // step's single row (1,536 elements) is shared by the team; on the 2-core machine the
    // extra section per layer cost more (decode at 2K 9.1 -> 10.5 ms) than it saved.
    let chunk = 4096;
    par::for_each_chunk_mut(gate, chunk, |c, g| {
        let u = &up[c * chunk..c * chunk + g.len()];
        for (g, u) in g.iter_mut().zip(u) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    });
}

/// `exp(x)` to within a few ulp for `x <= 0`, written without branches so that loops
/// over it vectorise (the standard library's `exp` does not).
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    // Two-step reduction r = x - n ln2, exact enough in f32.
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    // Taylor/minimax polynomial for e^r on |r| <= ln2/2.
    let p = 1.0
        + r * (1.0 + r * (0.5 + r * (0.166_666_67 + r * (0.041_666_5 + r * (0.008_333_6 + r * 0.001_393_8)))));
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_std() {
        let mut worst = 0.0f32;
        for i in 0..=100_000 {
            let x = -80.0 + 90.0 * i as f32 / 100_000.0;
            let rel = ((fast_exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 2e-6, "worst relative error {worst}");
        assert!(fast_exp(-1000.0) < 1e-37);
    }

    #[test]
    fn rms_norm_matches_definition() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 0.0, 2.0];
        let w = [1.0, 0.5, 2.0, 1.0];
        let orig = x.clone();
        rms_norm(&mut x, &w, 1e-5);
        for r in 0..2 {
            let row = &orig[r * 4..r * 4 + 4];
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / 4.0 + 1e-5).sqrt();
            for i in 0..4 {
                assert!((x[r * 4 + i] - row[i] / rms * w[i]).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn rope_preserves_norm_and_relative_angles() {
        // A rotation keeps each pair's norm, and q.k depends only on the position gap.
        for half in [false, true] {
            let rope = Rope::new(8, 10000.0, half, None);
            let base: Vec<f32> = (0..8).map(|i| (i as f32 * 0.37).sin()).collect();
            let other: Vec<f32> = (0..8).map(|i| (i as f32 * 0.91).cos()).collect();
            let dot_at = |pq: usize, pk: usize| {
                let (mut q, mut k) = (base.clone(), other.clone());
                rope.apply(&mut q, 1, pq);
                rope.apply(&mut k, 1, pk);
                q.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>()
            };
            assert!((dot_at(10, 7) - dot_at(103, 100)).abs() < 1e-4, "half_split={half}");
            let mut q = base.clone();
            rope.apply(&mut q, 1, 5);
            let n0: f32 = base.iter().map(|v| v * v).sum();
            let n1: f32 = q.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-5);
            let mut z = base.clone();
            rope.apply(&mut z, 1, 0);
            assert_eq!(z, base, "position 0 is the identity");
        }
    }

    #[test]
    fn rope_pairs_follow_the_style() {
        // With one frequency pair per head (head_dim 2) both styles coincide; with 4 dims
        // interleaved rotates (0,1) together, half-split rotates (0,2) together.
        let mut a = vec![1.0, 0.0, 0.0, 0.0];
        Rope::new(4, 10000.0, false, None).apply(&mut a, 1, 1);
        assert!(a[1].abs() > 0.5 && a[2] == 0.0);
        let mut b = vec![1.0, 0.0, 0.0, 0.0];
        Rope::new(4, 10000.0, true, None).apply(&mut b, 1, 1);
        assert!(b[2].abs() > 0.5 && b[1] == 0.0);
    }

    #[test]
    fn swiglu_matches_definition() {
        let mut g = vec![-2.0, 0.0, 3.0];
        swiglu(&mut g, &[1.0, 5.0, 2.0]);
        let silu = |x: f32| x / (1.0 + (-x).exp());
        assert_eq!(g, vec![silu(-2.0), 0.0, silu(3.0) * 2.0]);
        // Rows long enough to be cut into many chunks, alone and in a decode team: every
        // element pairs with its own `up`.
        let n = 10_007;
        let gate: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        let up: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: Vec<f32> = gate.iter().zip(&up).map(|(&g, &u)| silu(g) * u).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(crate::par::MIN_TEAM).build().expect("pool");
        let (alone, team) = pool.install(|| {
            let (mut a, mut b) = (gate.clone(), gate.clone());
            swiglu(&mut a, &up);
            crate::par::with_team(|| swiglu(&mut b, &up));
            (a, b)
        });
        assert_eq!(alone, want);
        assert_eq!(team, want);
    }
}
