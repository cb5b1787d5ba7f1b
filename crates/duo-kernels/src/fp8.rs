//! fp8 (e4m3) KV rows: the arithmetic of the GPU's fp8 cache (`duo_cuda::fp8`) and of the
//! CPU's simulation of fp8 keys (`duo_kv::KvSim`), in one place so both round alike.
//!
//! A row (one position of one KV head) is held as e4m3 bytes and one power-of-two `f32`
//! scale, the smallest with `amax / scale <= 448`, its exponent clamped to `[-24, 15]` (why:
//! `duo_cuda::fp8`); rounding is to nearest even with saturation at ±448 (PTX
//! `cvt.rn.satfinite.e4m3x2.f32`).

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

/// `row` as its fp8 row holds it: each value replaced by `e4m3(x / scale) * scale`.
pub fn round_row(row: &mut [f32]) {
    let scale = row_scale(row.iter().fold(0.0f32, |m, v| m.max(v.abs())));
    let inv = 1.0 / scale;
    for x in row {
        *x = e4m3_to_f32(e4m3_from_f32(*x * inv)) * scale;
    }
}

/// A key `row` as the fp8 cache holds it, seen in its own basis: turned into the Hadamard
/// basis ([`crate::kv4::hadamard`]), rounded as an fp8 row, turned back. e4m3's relative error
/// per element is the same in either basis; turning evens out the products `q_i k_i` that a
/// score sums (RoPE's slow channels are large in queries and keys alike), so their errors no
/// longer come from a few elements, and the score's error shrinks (EVALUATION.md).
pub fn round_row_turned(row: &mut [f32]) {
    crate::kv4::hadamard(row);
    round_row(row);
    crate::kv4::hadamard(row);
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
    fn a_rounded_row_is_its_codes_times_its_scale() {
        let mut row: Vec<f32> = (0..64).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.173).collect();
        let orig = row.clone();
        round_row(&mut row);
        let scale = row_scale(orig.iter().fold(0.0f32, |m, v| m.max(v.abs())));
        for (x, y) in orig.iter().zip(&row) {
            assert_eq!(*y, e4m3_to_f32(e4m3_from_f32(x / scale)) * scale);
            assert!((x - y).abs() <= x.abs() / 16.0 + scale * 2f32.powi(-9), "{x} -> {y}");
        }
        let again = row.clone();
        round_row(&mut row);
        assert_eq!(row, again, "rounding twice changes nothing");
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
}
