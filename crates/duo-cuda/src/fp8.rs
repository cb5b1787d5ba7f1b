//! fp8 (e4m3) KV rows: the host-side twin of what the kernels do, so that every fp8 kernel
//! has a reference that quantises exactly as the GPU does.
//!
//! A cached row (one position of one KV head: `head_dim` keys or values) is stored as
//! `head_dim` e4m3 bytes and one `f32` scale; the value is `e4m3 * scale`. Why this scheme:
//! * One scale per row, not per tensor: vLLM's fp8 cache takes one scale per layer (1.0 unless
//!   calibrated), which clips outlier rows; a row scale costs 4 bytes per `head_dim` bytes
//!   (3% at 128) and needs no calibration pass.
//! * The scale is a power of two, the smallest with `amax / scale <= 448` (e4m3's largest
//!   finite value). e4m3 is a float format, so its relative precision (3 mantissa bits) is the
//!   same anywhere in its normal range: a power of two loses nothing against `amax / 448`,
//!   and it makes quantising (`x * (1 / scale)`) and dequantising (`e4m3 * scale`) exact
//!   multiplications, on the GPU in f16 as well as in f32. Its exponent is clamped to
//!   `[-24, 15]` so that the scale is exactly an f16 (the kernels scale values in f16).
//! * Rounding is to nearest even with saturation at ±448 (PTX `cvt.rn.satfinite.e4m3x2.f32`).
//! * Keys are quantised in a Hadamard basis ([`round_key_rows`]; RoPE + append turns queries
//!   and keys alike, as for int4): on the H200 it took fp8's passkey loss from up to 0.045 to
//!   up to 0.017 per length, within 0.005 over every cell (EVALUATION.md, session 25).

pub use duo_kernels::fp8::{e4m3_from_f32, e4m3_to_f32, row_scale, E4M3_MAX};

/// One row quantised: its bytes and its scale.
pub fn quantise_row(row: &[f32]) -> (Vec<u8>, f32) {
    let scale = row_scale(row.iter().fold(0.0f32, |m, v| m.max(v.abs())));
    let inv = 1.0 / scale;
    (row.iter().map(|&v| e4m3_from_f32(v * inv)).collect(), scale)
}

/// Rows of `head_dim` values quantised: all bytes, then one scale per row.
pub fn quantise_rows(values: &[f32], head_dim: usize) -> (Vec<u8>, Vec<f32>) {
    quantise_rows_with(values, head_dim, quantise_row)
}

/// What quantised rows hold: `e4m3 * scale` per value.
pub fn dequantise_rows(bytes: &[u8], scales: &[f32], head_dim: usize) -> Vec<f32> {
    dequantise_rows_with(bytes, scales, head_dim, e4m3_to_f32)
}

/// Rows of `head_dim` values through a row quantiser (any byte format with a row scale).
pub(crate) fn quantise_rows_with(values: &[f32], head_dim: usize, row: impl Fn(&[f32]) -> (Vec<u8>, f32)) -> (Vec<u8>, Vec<f32>) {
    let (mut bytes, mut scales) = (Vec::with_capacity(values.len()), Vec::with_capacity(values.len() / head_dim));
    for r in values.chunks(head_dim) {
        let (b, s) = row(r);
        bytes.extend(b);
        scales.push(s);
    }
    (bytes, scales)
}

/// Bytes and row scales back to values: `value(byte) * scale`.
pub(crate) fn dequantise_rows_with(bytes: &[u8], scales: &[f32], head_dim: usize, value: impl Fn(u8) -> f32 + Copy) -> Vec<f32> {
    bytes.chunks(head_dim).zip(scales).flat_map(|(row, &s)| row.iter().map(move |&b| value(b) * s)).collect()
}

/// Keys as the fp8 cache makes them, back in their own basis: each row turned into the
/// Hadamard basis, quantised, dequantised and turned back (what `q . k` sees; RoPE + append
/// turns queries and keys alike, as for int4).
pub fn round_key_rows(keys: &[f32], head_dim: usize) -> Vec<f32> {
    let mut x = keys.to_vec();
    x.chunks_mut(head_dim).for_each(duo_kernels::fp8::round_row_turned);
    x
}

/// `values` as the fp8 cache holds them (quantised and dequantised, row by row).
pub fn round_rows(values: &[f32], head_dim: usize) -> Vec<f32> {
    let (bytes, scales) = quantise_rows(values, head_dim);
    dequantise_rows(&bytes, &scales, head_dim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantised_rows_keep_three_mantissa_bits_of_every_value() {
        let values: Vec<f32> = (0..128 * 5)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1 + i / 128) as f32)
            .collect();
        let back = round_rows(&values, 128);
        for (row, got) in values.chunks(128).zip(back.chunks(128)) {
            let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (x, y) in row.iter().zip(got) {
                // Half a unit in the last place: 2^-4 of the value, or of the subnormal step.
                assert!(
                    (x - y).abs() <= x.abs() / 16.0 + amax / 448.0 * 2f32.powi(-9) * 2.0,
                    "{x} -> {y}"
                );
            }
        }
    }
}
