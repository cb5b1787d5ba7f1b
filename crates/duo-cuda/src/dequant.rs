//! GGUF weights dequantised on the GPU: the raw blocks of a tensor are uploaded as they are in
//! the file and one kernel turns them into bf16 where they will live, so a quantised 7-8B
//! checkpoint never exists in `f32` (or even bf16) on the host.
//!
//! Types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K (those of the common Llama GGUF files).
//! [`reference`] is the CPU dequantisation, written from the GGML block layouts with the same
//! operation order as the kernel; the GPU must match it bit for bit (`duo cuda-check`), and
//! it matches candle's dequantisation (duo-engine's tests).

use crate::{CudaError, Result};

/// The kernel's CUDA source.
pub const SOURCE: &str = include_str!("kernels/dequant.cu");

/// A tensor element type the GPU dequantises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    /// 4-byte floats.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// 32 values: f16 scale, 32 signed bytes.
    Q8_0,
    /// 32 values: f16 scale, 16 bytes of nibbles (offset 8).
    Q4_0,
    /// 32 values: f16 scale, f16 minimum, 16 bytes of nibbles.
    Q4_1,
    /// 256 values: f16 scale and minimum, 12 bytes of 6-bit sub-block scales, 128 bytes of nibbles.
    Q4K,
    /// 256 values: 128 bytes of low nibbles, 64 of high bit pairs, 16 signed scales, f16 scale.
    Q6K,
}

impl QuantType {
    /// `(values per block, bytes per block)`.
    pub fn block(self) -> (usize, usize) {
        match self {
            QuantType::F32 => (1, 4),
            QuantType::F16 | QuantType::Bf16 => (1, 2),
            QuantType::Q8_0 => (32, 34),
            QuantType::Q4_0 => (32, 18),
            QuantType::Q4_1 => (32, 20),
            QuantType::Q4K => (256, 144),
            QuantType::Q6K => (256, 210),
        }
    }

    /// The kernel's type code.
    pub(crate) fn code(self) -> i32 {
        self as i32
    }

    /// Bytes of `n` values, or an error when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Result<usize> {
        let (per, bytes) = self.block();
        if !n.is_multiple_of(per) {
            return Err(CudaError::Input(format!("{n} values are not whole {self:?} blocks of {per}")));
        }
        Ok(n / per * bytes)
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The CPU dequantisation of `n` values of type `ty` (checked against the byte count).
pub fn reference(ty: QuantType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    if ty.bytes_for(n)? != bytes.len() {
        return Err(CudaError::Input(format!("{n} {ty:?} values take {} bytes, not {}", ty.bytes_for(n)?, bytes.len())));
    }
    let (per, size) = ty.block();
    let mut out = Vec::with_capacity(n);
    match ty {
        QuantType::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        QuantType::F16 => out.extend((0..n).map(|i| f16_at(bytes, 2 * i))),
        QuantType::Bf16 => out.extend(bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        _ => {
            for b in bytes.chunks_exact(size) {
                for j in 0..per {
                    out.push(match ty {
                        QuantType::Q8_0 => f16_at(b, 0) * (b[2 + j] as i8) as f32,
                        QuantType::Q4_0 | QuantType::Q4_1 => {
                            let q = b[size - 16 + (j & 15)];
                            let nib = if j < 16 { q & 0xF } else { q >> 4 } as f32;
                            if ty == QuantType::Q4_0 { f16_at(b, 0) * (nib - 8.0) } else { f16_at(b, 0) * nib + f16_at(b, 2) }
                        }
                        QuantType::Q4K => {
                            let (g, w) = (j / 64, j % 64);
                            let (sc, m) = scale_min_k4(2 * g + usize::from(w >= 32), &b[4..16]);
                            let (d, mn) = (f16_at(b, 0) * sc as f32, f16_at(b, 2) * m as f32);
                            let q = b[16 + 32 * g + w % 32];
                            d * (if w < 32 { q & 0xF } else { q >> 4 }) as f32 - mn
                        }
                        _ => {
                            let (h, r) = (j / 128, j % 128);
                            let (quarter, l) = (r / 32, r % 32);
                            let low = if quarter & 1 == 1 { b[64 * h + l + 32] } else { b[64 * h + l] };
                            let nib = if quarter < 2 { low & 0xF } else { low >> 4 } as i32;
                            let q = (nib | ((((b[128 + 32 * h + l] >> (2 * quarter)) & 3) as i32) << 4)) - 32;
                            let sc = b[192 + 8 * h + l / 16 + 2 * quarter] as i8;
                            f16_at(b, 208) * sc as f32 * q as f32
                        }
                    });
                }
            }
        }
    }
    Ok(out)
}

/// GGML's `get_scale_min_k4`.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Seeded random blocks of `ty` for `n` values, with finite scales of a trained model's size.
pub fn random_blocks(ty: QuantType, n: usize, seed: u64) -> Result<Vec<u8>> {
    let len = ty.bytes_for(n)?;
    let mut bytes: Vec<u8> = (0..len as u64).map(|i| (crate::ops::hash_uniform(seed, i).to_bits() >> 7) as u8).collect();
    let (per, size) = ty.block();
    let put_f16 = |b: &mut [u8], at: usize, v: f32| b[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
    match ty {
        QuantType::F32 => {
            for (k, c) in bytes.chunks_exact_mut(4).enumerate() {
                c.copy_from_slice(&(crate::ops::hash_uniform(seed, k as u64) * 0.1).to_le_bytes());
            }
        }
        QuantType::F16 => {
            for (k, c) in bytes.chunks_exact_mut(2).enumerate() {
                put_f16(c, 0, crate::ops::hash_uniform(seed, k as u64) * 0.1);
            }
        }
        QuantType::Bf16 => {
            for (k, c) in bytes.chunks_exact_mut(2).enumerate() {
                c.copy_from_slice(&half::bf16::from_f32(crate::ops::hash_uniform(seed, k as u64) * 0.1).to_le_bytes());
            }
        }
        _ => {
            for (k, b) in bytes.chunks_exact_mut(size).enumerate() {
                let s = 0.002 + 0.01 * crate::ops::hash_uniform(seed ^ 0x5eed, k as u64).abs();
                let at = if ty == QuantType::Q6K { 208 } else { 0 };
                put_f16(b, at, s);
                if matches!(ty, QuantType::Q4_1 | QuantType::Q4K) {
                    put_f16(b, 2, -s * 3.0);
                }
            }
        }
    }
    let _ = per;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_and_refusals() {
        assert_eq!(QuantType::Q4K.bytes_for(512).unwrap(), 288);
        assert_eq!(QuantType::Q6K.bytes_for(256).unwrap(), 210);
        assert!(QuantType::Q8_0.bytes_for(33).is_err(), "not whole blocks");
        let b = random_blocks(QuantType::Q4_1, 64, 1).unwrap();
        assert!(reference(QuantType::Q4_1, &b[..39], 64).is_err(), "short data");
    }

    #[test]
    fn q4_0_and_q8_0_of_constructed_blocks() {
        // Q4_0: scale 0.5, nibbles 0..15 in the low halves, 15 in the high halves.
        let mut b = half::f16::from_f32(0.5).to_le_bytes().to_vec();
        b.extend((0..16u8).map(|j| j | 0xF0));
        let x = reference(QuantType::Q4_0, &b, 32).unwrap();
        assert_eq!(x[0], -4.0);
        assert_eq!(x[15], 3.5);
        assert!(x[16..].iter().all(|&v| v == 3.5));
        let mut b = half::f16::from_f32(2.0).to_le_bytes().to_vec();
        b.extend((0..32).map(|j: i8| (j - 16) as u8));
        let x = reference(QuantType::Q8_0, &b, 32).unwrap();
        assert_eq!((x[0], x[16], x[31]), (-32.0, 0.0, 30.0));
    }
}
