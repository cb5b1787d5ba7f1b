//! 4-bit KV rounding: the arithmetic of the GPU's int4 cache (`duo_cuda::int4`, which packs
//! the codes this module computes) and the rounding the CPU cache applies when asked to
//! simulate a 4-bit cache for accuracy studies (`duo_kv::KvSim`).
//!
//! A group of values (a row of one position, or one channel over a block of positions)
//! keeps an f16 step and an f16 minimum; code `n` in 0..=15 stands for `n * step + min`,
//! rounded once to f16. Keys may be turned by an orthonormal Walsh-Hadamard transform
//! first ([`hadamard`]): `q . k` is unchanged when queries turn alike, and a key's outlier
//! channels no longer set its row's range.

use half::f16;

/// The largest magnitude a group keeps: values beyond are clipped to it, so that neither the
/// minimum nor `15 * step + minimum` can leave f16's finite range (65,504).
pub const LIMIT: f32 = 32768.0;

/// The f16 step and minimum of a group whose smallest value is `lo` and largest `hi` (both
/// clipped to `±LIMIT`): the step spans the range in 15 codes (1 for a constant group).
pub fn group_params(lo: f32, hi: f32) -> (f16, f16) {
    let (lo, hi) = (lo.clamp(-LIMIT, LIMIT), hi.clamp(-LIMIT, LIMIT));
    let step = f16::from_f32((hi - lo) / 15.0);
    let step = if step.to_f32() > 0.0 { step } else { f16::ONE };
    (step, f16::from_f32(lo))
}

/// The code of `x` in a group of `step` and `min`: nearest (ties to even), 0..=15.
pub fn code(x: f32, step: f16, min: f16) -> u8 {
    ((x - min.to_f32()) / step.to_f32()).round_ties_even().clamp(0.0, 15.0) as u8
}

/// What code `n` holds in a group of `step` and `min`: `n * step + min` rounded once to f16,
/// as the GPU kernels' f16 fused multiply-add rounds it.
pub fn value(n: u8, step: f16, min: f16) -> f32 {
    // Exact in f64: a 4-bit by 11-bit product plus an f16.
    f16_nearest(n as f64 * step.to_f64() + min.to_f64()).to_f32()
}

/// `x` rounded once to the nearest f16, ties to even. `half`'s conversion from f64 may pass
/// through f32 (with F16C) and round twice: 135.93749 goes to f32's 135.9375, a tie, then to
/// 136 instead of 135.875. Its answer is one f16 step off at most, so the nearest of it and
/// its two neighbours is the single rounding.
pub fn f16_nearest(x: f64) -> f16 {
    let c = f16::from_f64(x);
    let mut best = c;
    for bits in [c.to_bits().wrapping_sub(1), c.to_bits().wrapping_add(1)] {
        let n = f16::from_bits(bits);
        if !n.is_finite() {
            continue;
        }
        let (d, db) = ((n.to_f64() - x).abs(), (best.to_f64() - x).abs());
        if d < db || (d == db && bits % 2 == 0) {
            best = n;
        }
    }
    best
}

/// The smallest and largest of `xs`.
fn extremes(xs: impl Iterator<Item = f32> + Clone) -> (f32, f32) {
    (xs.clone().fold(f32::INFINITY, f32::min), xs.fold(f32::NEG_INFINITY, f32::max))
}

/// Rounds a group in place (`at` lists its elements' indices in `x`).
fn round_group(x: &mut [f32], at: impl Iterator<Item = usize> + Clone) {
    let (lo, hi) = extremes(at.clone().map(|i| x[i]));
    let (step, min) = group_params(lo, hi);
    for i in at {
        x[i] = value(code(x[i], step, min), step, min);
    }
}

/// The orthonormal Walsh-Hadamard transform of `x` (a power-of-two length), in place, in the
/// GPU kernels' order (stages h = 1, 2, 4, ...: pairs j, j + h become sum and difference;
/// then a scale of `1 / sqrt(len)`). It is its own inverse.
pub fn hadamard(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for j in (0..n).step_by(2 * h) {
            for k in j..j + h {
                let (a, b) = (x[k], x[k + h]);
                x[k] = a + b;
                x[k + h] = a - b;
            }
        }
        h *= 2;
    }
    let s = 1.0 / (n as f32).sqrt();
    for v in x {
        *v *= s;
    }
}

/// Rows of `head_dim` values rounded as 4-bit rows, in place.
pub fn round_rows(x: &mut [f32], head_dim: usize) {
    for row in x.chunks_mut(head_dim) {
        round_group(row, 0..row.len());
    }
}

/// Rows rounded as 4-bit rows in a Hadamard basis and turned back (what `q . k` sees of
/// keys cached that way).
pub fn round_rows_turned(x: &mut [f32], head_dim: usize) {
    for row in x.chunks_mut(head_dim) {
        hadamard(row);
        round_group(row, 0..row.len());
        hadamard(row);
    }
}

/// Rows rounded as groups of `group` consecutive values, each with its own step and minimum
/// (`head_dim / group` pairs per row instead of one), in place.
pub fn round_groups(x: &mut [f32], head_dim: usize, group: usize) {
    for row in x.chunks_mut(head_dim) {
        for g in (0..row.len()).step_by(group) {
            round_group(row, g..(g + group).min(row.len()));
        }
    }
}

/// Rows rounded in a Hadamard basis as groups of `group` consecutive values (each with its
/// own step and minimum: `head_dim / group` pairs per row instead of one), turned back.
pub fn round_groups_turned(x: &mut [f32], head_dim: usize, group: usize) {
    for row in x.chunks_mut(head_dim) {
        hadamard(row);
        round_groups(row, head_dim, group);
        hadamard(row);
    }
}

/// A block of rows of `head_dim` values rounded channel by channel (each channel's values
/// over the block one group), in place: KIVI's key quantisation.
pub fn round_channels(x: &mut [f32], head_dim: usize) {
    let rows = x.len() / head_dim;
    for c in 0..head_dim {
        round_group(x, (0..rows).map(|r| r * head_dim + c));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finer_groups_round_closer_and_a_whole_row_group_is_the_row_scheme() {
        let hd = 64;
        // Rows with a few large channels, as keys have.
        let x: Vec<f32> = (0..hd * 50)
            .map(|i| {
                let v = ((i * 7919 + 13) % 1000) as f32 / 500.0 - 1.0;
                if i % hd == 5 || i % hd == 40 { v * 12.0 } else { v }
            })
            .collect();
        let err = |y: &[f32]| y.iter().zip(&x).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
        let mut rows = x.clone();
        round_rows_turned(&mut rows, hd);
        let mut whole = x.clone();
        round_groups_turned(&mut whole, hd, hd);
        assert_eq!(whole, rows);
        let (mut g32, mut g16) = (x.clone(), x.clone());
        round_groups_turned(&mut g32, hd, 32);
        round_groups_turned(&mut g16, hd, 16);
        assert!(err(&g16) < err(&g32) && err(&g32) < err(&rows), "{} {} {}", err(&g16), err(&g32), err(&rows));
    }

    #[test]
    fn values_round_once_to_the_nearest_f16() {
        // The case where f64 -> f32 -> f16 rounds twice (to 136).
        let (step, min) = (f16::from_f32(11.328125), f16::from_bits(0x8000 | 114));
        assert_eq!(value(12, step, min), 135.875);
        // Every value is within half an f16 step of the exact sum, and on a tie even.
        let mut checked = 0;
        for sb in (0x0400u16..0x7800).step_by(37) {
            for mb in (0u16..0xfbff).step_by(401) {
                let (step, min) = (f16::from_bits(sb), f16::from_bits(mb));
                for n in 0..16u8 {
                    let exact = n as f64 * step.to_f64() + min.to_f64();
                    if !min.is_finite() || exact.abs() > 60000.0 {
                        continue;
                    }
                    let got = f16::from_f32(value(n, step, min));
                    let ulp = (f16::from_bits(got.to_bits() | 1).to_f64() - f16::from_bits(got.to_bits() & !1).to_f64()).abs();
                    let d = (got.to_f64() - exact).abs();
                    assert!(d < ulp / 2.0 || (d == ulp / 2.0 && got.to_bits() % 2 == 0) || (exact.abs() < 1e-4 && d <= 6e-8), "n {n} step {step} min {min}: {got} for {exact}");
                    checked += 1;
                }
            }
        }
        assert!(checked > 100_000, "{checked}");
    }

    #[test]
    fn channels_keep_a_small_channel_that_rows_lose_in_a_big_ones_steps() {
        // Channel 0 spans +-20, channels 1..8 about +-0.06: by rows, every row's steps are
        // the big channel's (about 2.7); by channels, each keeps steps of its own range.
        let hd = 8;
        let x: Vec<f32> = (0..64).flat_map(|r| (0..hd).map(move |c| if c == 0 { ((r * 7 % 11) as f32 - 5.0) * 4.0 } else { (((r * 5 + c) % 13) as f32 - 6.0) * 0.01 })).collect();
        let err = |y: &[f32], c: usize| (0..64).map(|r| (y[r * hd + c] - x[r * hd + c]).abs()).fold(0.0f32, f32::max);
        let (mut rows, mut chans) = (x.clone(), x.clone());
        round_rows(&mut rows, hd);
        round_channels(&mut chans, hd);
        // Half a step (and the f16 rounding of the result) everywhere.
        assert!(err(&rows, 0) <= 40.0 / 15.0 * 0.51 && err(&chans, 0) <= 40.0 / 15.0 * 0.51);
        for c in 1..hd {
            assert!(err(&chans, c) <= 0.12 / 15.0 * 0.51 + 1e-4, "channel {c}: {}", err(&chans, c));
            assert!(err(&chans, c) * 5.0 < err(&rows, c), "channel {c}: {} vs {}", err(&chans, c), err(&rows, c));
        }
    }

    #[test]
    fn the_transform_is_its_own_inverse_and_turned_rows_stay_close() {
        let row: Vec<f32> = (0..64).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect();
        let mut back = row.clone();
        hadamard(&mut back);
        hadamard(&mut back);
        assert!(back.iter().zip(&row).all(|(a, b)| (a - b).abs() < 1e-5));
        let rms = |y: &[f32]| (y.iter().zip(&row).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / 64.0).sqrt();
        let (mut turned, mut plain) = (row.clone(), row.clone());
        round_rows_turned(&mut turned, 64);
        round_rows(&mut plain, 64);
        // Both errors are a fraction of a step (2/15 for the plain row); turning an evenly
        // spread row neither helps nor hurts much.
        assert!(rms(&plain) < 2.0 / 15.0 / 2.0 && rms(&turned) < 2.0 / 15.0 / 2.0 * 1.6, "{} {}", rms(&plain), rms(&turned));
    }
}
