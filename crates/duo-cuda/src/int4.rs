//! int4 KV rows: the host-side twin of what the kernels do for `--kv-dtype int4`.
//!
//! A cached row (one position of one KV head: `head_dim` keys or values) is stored as
//! `head_dim / 2` bytes of 4-bit codes and one 32-bit word holding two f16: the row's step
//! `s` (low half) and its minimum `z` (high half); a code `n` in 0..=15 stands for
//! `n * s + z`. Why this scheme:
//! * Asymmetric (a minimum as well as a step): a row's values are rarely centred on zero
//!   (RoPE'd keys carry per-channel offsets), and with 16 codes a symmetric grid wastes up to
//!   half of them on the side the row does not reach.
//! * One group per row (per token and head, as KIVI's values; KIVI quantises keys per
//!   channel, which needs a full-precision residual of recent tokens and groups that span
//!   positions — neither fits a paged cache whose rows are written once). The row's scale
//!   word costs 4 bytes per `head_dim / 2` (12.5% at 64, 6% at 128); the accuracy this buys
//!   is measured on the passkey and needle grids (EVALUATION.md).
//! * The step and minimum are f16 so that the kernels dequantise with one f16 fused
//!   multiply-add per pair of values (`n * s + z`, rounded once to f16), which this module
//!   reproduces bit for bit.
//! * Keys are cached in a Hadamard basis ([`hadamard`], applied after RoPE to keys and
//!   queries alike, so `q . k` is unchanged): RoPE'd keys carry a few outlier channels that
//!   would set a row's range and leave the other channels two or three codes; the rotation
//!   spreads every channel over all of them (QuaRot's observation), and per-row int4 keys
//!   then lose less (measured on the passkey grid at 1K-8K: full attention's teacher-forced
//!   mean 0.708 -> 0.782, bf16's 0.871; EVALUATION.md). Values stay in their own basis:
//!   turning them as well (and attention's outputs back) measured no better (0.791).
//! * Codes are laid out for the kernels' unpacking: within each 32-bit word of 8 values,
//!   nibble `j < 4` holds value `2j` and nibble `4 + j` value `2j + 1`, so that masking the
//!   word (shifted by `4j`) with `0x000f000f` yields the pair of values `(2j, 2j + 1)` in the
//!   two halves of an f16x2 register.

use half::f16;

pub use duo_kernels::kv4::{code, group_params as row_params, hadamard, value, LIMIT};

/// Where value `d` of a row lives: its byte and the shift of its nibble in that byte.
pub fn code_at(d: usize) -> (usize, u32) {
    let (word, j) = (d / 8, d % 8);
    let nibble = if j % 2 == 0 { j / 2 } else { 4 + j / 2 };
    (word * 4 + nibble / 2, (nibble % 2) as u32 * 4)
}

/// The 32-bit word of a row's step and minimum (step in the low half), as the `f32` whose
/// bits it is: the cache keeps it where byte caches keep their `f32` scale.
pub fn scale_word(step: f16, min: f16) -> f32 {
    f32::from_bits(u32::from(step.to_bits()) | (u32::from(min.to_bits()) << 16))
}

/// The step and minimum of a scale word.
pub fn params_of(word: f32) -> (f16, f16) {
    let b = word.to_bits();
    (f16::from_bits(b as u16), f16::from_bits((b >> 16) as u16))
}

/// One row quantised: its `len / 2` bytes and its scale word.
pub fn quantise_row(row: &[f32]) -> (Vec<u8>, f32) {
    let lo = row.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (step, min) = row_params(lo, hi);
    let mut bytes = vec![0u8; row.len() / 2];
    for (d, &x) in row.iter().enumerate() {
        let (at, shift) = code_at(d);
        bytes[at] |= code(x, step, min) << shift;
    }
    (bytes, scale_word(step, min))
}

/// Rows of `head_dim` values quantised: all bytes, then one scale word per row.
pub fn quantise_rows(values: &[f32], head_dim: usize) -> (Vec<u8>, Vec<f32>) {
    crate::fp8::quantise_rows_with(values, head_dim, quantise_row)
}

/// What quantised rows hold.
pub fn dequantise_rows(bytes: &[u8], words: &[f32], head_dim: usize) -> Vec<f32> {
    bytes
        .chunks(head_dim / 2)
        .zip(words)
        .flat_map(|(row, &w)| {
            let (step, min) = params_of(w);
            (0..head_dim).map(move |d| {
                let (at, shift) = code_at(d);
                value((row[at] >> shift) & 0xf, step, min)
            })
        })
        .collect()
}

/// Keys as the int4 cache makes them, back in their own basis: each row turned into the
/// Hadamard basis, quantised, dequantised and turned back (what `q . k` sees).
pub fn round_key_rows(keys: &[f32], head_dim: usize) -> Vec<f32> {
    let mut x = keys.to_vec();
    duo_kernels::kv4::round_rows_turned(&mut x, head_dim);
    x
}

/// `values` as the int4 cache holds them (quantised and dequantised, row by row: the same
/// arithmetic as packing and unpacking, `duo_kernels::kv4`).
pub fn round_rows(values: &[f32], head_dim: usize) -> Vec<f32> {
    let mut x = values.to_vec();
    duo_kernels::kv4::round_rows(&mut x, head_dim);
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_is_within_half_a_step_and_the_extremes_are_near_exact() {
        let values: Vec<f32> = (0..64 * 9)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 0.7) * (1 + i / 64) as f32 + (i / 64) as f32)
            .collect();
        let back = round_rows(&values, 64);
        let (bytes, words) = quantise_rows(&values, 64);
        // Packing and unpacking the codes gives exactly what the rounding says.
        assert_eq!(dequantise_rows(&bytes, &words, 64), back);
        for ((row, got), &w) in values.chunks(64).zip(back.chunks(64)).zip(&words) {
            let s = params_of(w).0.to_f32();
            let lo = row.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            // The step spans the row in 15 codes (to f16's precision).
            assert!((s * 15.0 - (hi - lo)).abs() <= (hi - lo) * 2e-3, "{s} for {lo}..{hi}");
            // Half a step, the f16 roundings of the minimum and of the result, and the
            // clamp at the top when the rounded step falls short.
            let slack = s * 0.5 + (lo.abs() + hi.abs()) * 2e-3;
            for (x, y) in row.iter().zip(got) {
                assert!((x - y).abs() <= slack, "{x} -> {y} (step {s})");
            }
        }
    }

    #[test]
    fn codes_sit_where_the_kernels_unpack_them() {
        // Value d of a word must come out of (word >> 4j) & 0x000f000f as the pair (2j, 2j+1).
        let row: Vec<f32> = (0..16).map(|d| d as f32).collect();
        let (bytes, w) = quantise_row(&row);
        assert_eq!(params_of(w), (f16::ONE, f16::ZERO));
        for word in 0..2 {
            let x = u32::from_le_bytes(bytes[word * 4..][..4].try_into().unwrap());
            for j in 0..4 {
                let pair = (x >> (4 * j)) & 0x000f_000f;
                assert_eq!((pair & 0xffff, pair >> 16), ((word * 8 + 2 * j) as u32, (word * 8 + 2 * j + 1) as u32));
            }
        }
        assert_eq!(dequantise_rows(&bytes, &[w], 16), row);
    }

    #[test]
    fn the_rotation_is_orthonormal_and_spreads_an_outlier_channel() {
        let row: Vec<f32> = (0..64).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0 + if i == 5 { 40.0 } else { 0.0 }).collect();
        let q: Vec<f32> = (0..64).map(|i| ((i * 11 % 13) as f32 - 6.0) / 6.0).collect();
        let (mut r, mut qr) = (row.clone(), q.clone());
        hadamard(&mut r);
        hadamard(&mut qr);
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        assert!((dot(&r, &qr) - dot(&row, &q)).abs() < 1e-3, "q . k unchanged");
        let mut back = r.clone();
        hadamard(&mut back);
        assert!(back.iter().zip(&row).all(|(a, b)| (a - b).abs() < 1e-4), "its own inverse");
        // The outlier (40 in one channel) no longer sets the range alone: the row's error
        // (root mean square) shrinks with the step.
        let err = |got: &[f32]| (got.iter().zip(&row).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / 64.0).sqrt();
        let plain = round_rows(&row, 64);
        let turned = round_key_rows(&row, 64);
        assert!(err(&turned) < err(&plain) * 0.6, "turned {} vs plain {}", err(&turned), err(&plain));
    }

    #[test]
    fn constant_and_extreme_rows() {
        // A constant row: step 1, every code 0, the value back exactly.
        let (bytes, w) = quantise_row(&[2.5; 8]);
        assert_eq!((bytes, params_of(w)), (vec![0; 4], (f16::ONE, f16::from_f32(2.5))));
        // Values beyond the limit clip instead of turning into infinities.
        let got = round_rows(&[-1e6, 1e6, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0], 8);
        assert!(got.iter().all(|v| v.is_finite()), "{got:?}");
        assert_eq!(got[0], -LIMIT);
        assert!(got[1] <= LIMIT && got[1] >= LIMIT * 0.999, "{}", got[1]);
    }
}
