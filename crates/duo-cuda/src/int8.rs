//! int8 KV rows: the host-side twin of what the kernels do for `--kv-dtype int8`.
//!
//! A cached row (one position of one KV head: `head_dim` keys or values) is stored as
//! `head_dim` signed bytes and one `f32` scale, `amax / 127`; the value is `byte * scale`.
//! Why beside fp8 ([`crate::fp8`]): e4m3 keeps 3 mantissa bits of every value (a relative
//! error up to 1/16), while an integer grid scaled to the row's largest value keeps an
//! absolute error of at most `amax / 254` — on heads of 64 or 128 values that is several
//! times less error in a dot product, at the same bytes (measured on the passkey and needle
//! grids, EVALUATION.md). Rounding is to nearest even, as PTX `cvt.rni`.

pub use duo_kernels::kv8::row_scale;

/// One row quantised: its bytes (two's complement) and its scale (the arithmetic is
/// [`duo_kernels::kv8`]'s, which the CPU's int8 cache shares).
pub fn quantise_row(row: &[f32]) -> (Vec<u8>, f32) {
    let mut codes = Vec::with_capacity(row.len());
    let scale = duo_kernels::kv8::encode_row(row, &mut codes);
    (codes.into_iter().map(|c| c as u8).collect(), scale)
}

/// Rows of `head_dim` values quantised: all bytes, then one scale per row.
pub fn quantise_rows(values: &[f32], head_dim: usize) -> (Vec<u8>, Vec<f32>) {
    crate::fp8::quantise_rows_with(values, head_dim, quantise_row)
}

/// What quantised rows hold: `byte * scale` per value.
pub fn dequantise_rows(bytes: &[u8], scales: &[f32], head_dim: usize) -> Vec<f32> {
    crate::fp8::dequantise_rows_with(bytes, scales, head_dim, |b| b as i8 as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_keep_every_value_within_half_a_step_of_their_largest() {
        let values: Vec<f32> = (0..64 * 7)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1 + i / 64) as f32)
            .collect();
        let (bytes, scales) = quantise_rows(&values, 64);
        let back = dequantise_rows(&bytes, &scales, 64);
        for ((row, got), s) in values.chunks(64).zip(back.chunks(64)).zip(&scales) {
            let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(*s, amax / 127.0);
            assert!(
                row.iter()
                    .zip(got)
                    .all(|(x, y)| (x - y).abs() <= s * 0.5 * (1.0 + 1e-6)),
                "{row:?} -> {got:?}"
            );
            // The largest value is exact in magnitude: +-127 steps.
            assert!(got.iter().any(|y| (y.abs() - amax).abs() <= amax * 1e-6));
        }
    }

    #[test]
    fn zeros_ties_and_signs() {
        assert_eq!(quantise_row(&[0.0; 4]), (vec![0; 4], 1.0));
        // amax 127: scale 1, so 2.5 rounds to 2 and -3.5 to -4 (ties to even).
        let (b, s) = quantise_row(&[127.0, 2.5, -3.5, -127.0]);
        assert_eq!(
            (b.iter().map(|&x| x as i8).collect::<Vec<_>>(), s),
            (vec![127, 2, -4, -127], 1.0)
        );
    }
}
