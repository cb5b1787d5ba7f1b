//! 8-bit KV rows: the arithmetic of the GPU's int8 cache (`duo_cuda::int8`) and of the CPU's
//! (`--kv-dtype int8`, elements `i8` with a row scale, [`crate::attention::KvElem`]), and of
//! the CPU's simulation of 8-bit keys (`duo_kv::KvSim`): one place, so all three round alike.
//!
//! A row (one position of one KV head: `head_dim` keys or values) keeps signed bytes and one
//! `f32` scale, `amax / 127`; byte `b` stands for `b * scale`. Rounding is to nearest, ties to
//! even (PTX `cvt.rni`), so the largest magnitude is exact (+-127 steps) and every other value
//! is within half a step.

/// The scale of a row whose largest magnitude is `amax` (1 for a row of zeros, or one that is
/// not finite).
pub fn row_scale(amax: f32) -> f32 {
    if amax > 0.0 && amax.is_finite() {
        amax / 127.0
    } else {
        1.0
    }
}

/// The code of `x` in a row of `scale`: nearest (ties to even), -127..=127.
pub fn code(x: f32, scale: f32) -> i8 {
    (x / scale).round_ties_even().clamp(-127.0, 127.0) as i8
}

/// `row`'s codes appended to `out`; returns its scale.
pub fn encode_row(row: &[f32], out: &mut Vec<i8>) -> f32 {
    let scale = row_scale(row.iter().fold(0.0f32, |m, v| m.max(v.abs())));
    out.extend(row.iter().map(|&x| code(x, scale)));
    scale
}

/// `row`'s codes written over `out` (as long as `row`); returns its scale.
pub fn encode_into(row: &[f32], out: &mut [i8]) -> f32 {
    let scale = row_scale(row.iter().fold(0.0f32, |m, v| m.max(v.abs())));
    for (o, &x) in out.iter_mut().zip(row) {
        *o = code(x, scale);
    }
    scale
}

/// `row` as its 8-bit row holds it: each value replaced by `code * scale`.
pub fn round_row(row: &mut [f32]) {
    round_row_levels(row, 127);
}

/// `row` rounded to `levels` symmetric steps of `amax / levels` each side (ties to even; a
/// row of zeros, or one that is not finite, takes steps of 1): 127 is the 8-bit row, 31 a
/// 6-bit one (the KV simulation's).
pub fn round_row_levels(row: &mut [f32], levels: u8) {
    let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let l = levels as f32;
    let scale = if amax > 0.0 && amax.is_finite() { amax / l } else { 1.0 };
    for x in row {
        // Through an integer, as the 8-bit codes go: a NaN becomes code 0.
        *x = ((*x / scale).round_ties_even().clamp(-l, l) as i32) as f32 * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_six_bit_row_has_31_steps_each_side() {
        let row: Vec<f32> = (0..64).map(|i| ((i * 37 % 29) as f32 - 14.0) * 0.31).collect();
        let mut six = row.clone();
        round_row_levels(&mut six, 31);
        let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let mut steps: Vec<i32> = six.iter().map(|v| (v / (amax / 31.0)).round() as i32).collect();
        steps.sort();
        steps.dedup();
        assert!(steps.iter().all(|l| l.abs() <= 31) && steps.len() > 20, "{steps:?}");
        assert!(six.iter().zip(&row).all(|(a, b)| (a - b).abs() <= amax / 31.0 / 2.0 * 1.0001));
        // 127 levels: the codes and scale of the 8-bit row.
        let mut eight = row.clone();
        round_row(&mut eight);
        let mut codes = Vec::new();
        let scale = encode_row(&row, &mut codes);
        assert!(eight.iter().zip(&codes).all(|(v, &c)| *v == c as f32 * scale));
    }

    #[test]
    fn ties_go_to_even_and_the_largest_is_exact() {
        let mut out = Vec::new();
        // amax 127: scale 1, so 2.5 rounds to 2 and -3.5 to -4.
        assert_eq!(encode_row(&[127.0, 2.5, -3.5, -127.0], &mut out), 1.0);
        assert_eq!(out, vec![127, 2, -4, -127]);
        let mut row = [0.3f32, -1.7, 0.0, 1.1];
        round_row(&mut row);
        assert_eq!(row[1], -1.7, "the largest magnitude keeps its value");
        assert!((row[0] - 0.3).abs() <= 1.7 / 254.0 * 1.000_001);
    }

    #[test]
    fn zero_and_infinite_rows_take_scale_one() {
        assert_eq!(row_scale(0.0), 1.0);
        assert_eq!(row_scale(f32::INFINITY), 1.0);
        let mut out = Vec::new();
        assert_eq!(encode_row(&[0.0; 3], &mut out), 1.0);
        assert_eq!(out, vec![0, 0, 0]);
    }
}
