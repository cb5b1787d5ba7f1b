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

/// e4m3's largest finite magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// The value of an e4m3 byte (`0x7f` and `0xff` are NaN).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = ((b >> 3) & 0xf, b & 7);
    if e == 0xf && m == 7 {
        return f32::NAN;
    }
    let v = if e == 0 {
        m as f32 * 2f32.powi(-9)
    } else {
        (1.0 + m as f32 / 8.0) * 2f32.powi(e as i32 - 7)
    };
    sign * v
}

/// The e4m3 byte nearest to `x` (ties to even), saturating at ±448; NaN stays NaN.
pub fn e4m3_from_f32(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7e;
    }
    let code = if a < 2f32.powi(-6) {
        // Subnormals: multiples of 2^-9 (8 of them reach the smallest normal, code 0x08).
        (a * 512.0).round_ties_even() as u8
    } else {
        let e = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
        let q = ((a / 2f32.powi(e) - 1.0) * 8.0).round_ties_even() as i32; // 0..=8
        let (e, q) = if q == 8 { (e + 1, 0) } else { (e, q) };
        (((e + 7) << 3) | q).min(0x7e) as u8
    };
    sign | code
}

/// The scale of a row whose largest magnitude is `amax` (see the module notes).
pub fn row_scale(amax: f32) -> f32 {
    let u = amax.to_bits();
    let biased = ((u >> 23) & 0xff) as i32;
    if amax == 0.0 || biased == 0 {
        return 1.0;
    }
    // amax = 1.m * 2^(biased - 127) and 448 = 1.75 * 2^8.
    let e = (biased - 127 - 8 + i32::from((u & 0x7f_ffff) > 0x60_0000)).clamp(-24, 15);
    f32::from_bits(((e + 127) as u32) << 23)
}

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

/// `values` as the fp8 cache holds them (quantised and dequantised, row by row).
pub fn round_rows(values: &[f32], head_dim: usize) -> Vec<f32> {
    let (bytes, scales) = quantise_rows(values, head_dim);
    dequantise_rows(&bytes, &scales, head_dim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_finite_code_round_trips_and_the_grid_is_e4m3s() {
        let mut finite = 0;
        for b in 0..=255u8 {
            let v = e4m3_to_f32(b);
            if v.is_nan() {
                assert!(b & 0x7f == 0x7f, "only S.1111.111 is NaN, not {b:#04x}");
                continue;
            }
            finite += 1;
            // -0 encodes as 0x80 and back.
            assert_eq!(e4m3_from_f32(v), b, "code {b:#04x} = {v}");
        }
        assert_eq!(finite, 254);
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(0x38), 1.0);
    }

    #[test]
    fn rounding_is_to_nearest_even_and_saturates() {
        // 1 + 1/16 lies halfway between 1 (mantissa 000, even) and 1.125 (001).
        assert_eq!(e4m3_to_f32(e4m3_from_f32(1.0625)), 1.0);
        // 1.1875 lies halfway between 1.125 (001) and 1.25 (010, even).
        assert_eq!(e4m3_to_f32(e4m3_from_f32(1.1875)), 1.25);
        assert_eq!(e4m3_to_f32(e4m3_from_f32(1.07)), 1.125);
        // Halfway between the two largest subnormals' neighbours: 7.5 * 2^-9 -> 8 * 2^-9 (even).
        assert_eq!(
            e4m3_to_f32(e4m3_from_f32(7.5 * 2f32.powi(-9))),
            2f32.powi(-6)
        );
        assert_eq!(e4m3_from_f32(1e9), 0x7e);
        assert_eq!(e4m3_from_f32(-500.0), 0xfe);
        assert_eq!(e4m3_from_f32(f32::INFINITY), 0x7e);
        assert_eq!(e4m3_from_f32(1e-4), 0x00);
        // Every value's nearest code: no other finite code is closer.
        for i in 0..20_000 {
            let x = (i as f32 * 0.0371).sin() * 2f32.powi((i % 23) - 12);
            let got = e4m3_to_f32(e4m3_from_f32(x));
            let best = (0..=255u8)
                .map(e4m3_to_f32)
                .filter(|v| v.is_finite())
                .map(|v| (v - x).abs())
                .fold(f32::INFINITY, f32::min);
            assert!(
                ((got - x).abs() - best).abs() <= best * 1e-6,
                "{x}: got {got}, nearest is {best} away"
            );
        }
    }

    #[test]
    fn a_row_scale_is_the_smallest_power_of_two_that_fits() {
        assert_eq!(row_scale(448.0), 1.0);
        assert_eq!(row_scale(449.0), 2.0);
        assert_eq!(row_scale(1.0), 2f32.powi(-8));
        assert_eq!(row_scale(0.0), 1.0);
        assert_eq!(
            row_scale(1e-30),
            2f32.powi(-24),
            "clamped to f16's smallest"
        );
        assert_eq!(
            row_scale(1e30),
            2f32.powi(15),
            "clamped to f16's largest power of two"
        );
        for i in 1..5_000 {
            let amax = i as f32 * 0.013 + (i as f32).sqrt();
            let s = row_scale(amax);
            assert!(
                amax / s <= E4M3_MAX && amax / (s / 2.0) > E4M3_MAX,
                "{amax}: scale {s}"
            );
        }
    }

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
