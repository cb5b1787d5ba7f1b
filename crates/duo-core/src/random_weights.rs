//! The one generator of seeded random weights (`--random-weights SHAPE`, `duo
//! random-checkpoint`): every backend builds its random model from these values, so the same
//! seed gives the same model on the CPU (stored as Q4_1), on the GPU (bf16, generated on the
//! device by a kernel that computes [`hash_uniform`] bit for bit) and in a written checkpoint
//! (bf16). Speed and memory do not depend on weight values; these exist so that models of
//! real shape can be measured where their checkpoints cannot be had.
//!
//! Each tensor is uniform in `[-scale, scale)` with `scale = sqrt(3 / in_dim)` (unit-variance
//! outputs for unit-variance inputs; the embedding table has scale 1), value `i` (row-major)
//! being `hash_uniform(tensor seed, i) * scale`. Norm weights are 1; the LM head is untied.

use crate::config::ModelConfig;

/// SplitMix64 of `(seed, i)` mapped to `[-1, 1)` with 24 bits of resolution.
pub fn hash_uniform(seed: u64, i: u64) -> f32 {
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i.wrapping_mul(0xD1B5_4A32_D192_ED03));
    z ^= z >> 30;
    z = z.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^= z >> 27;
    z = z.wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 * (1.0 / 16_777_216.0) * 2.0 - 1.0
}

/// One tensor of the random model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomTensor {
    /// Token embeddings `[vocab, hidden]`.
    Embed,
    /// Block `l`'s q, k and v projections stacked: `[(heads + 2 kv) * head_dim, hidden]`.
    Qkv(usize),
    /// Block `l`'s output projection `[hidden, heads * head_dim]`.
    O(usize),
    /// Block `l`'s gate and up projections stacked: `[2 * ffn, hidden]`.
    GateUp(usize),
    /// Block `l`'s down projection `[hidden, ffn]`.
    Down(usize),
    /// The LM head `[vocab, hidden]`.
    LmHead,
}

impl RandomTensor {
    /// `(rows, columns)` for a model of `c`'s shape.
    pub fn shape(self, c: &ModelConfig) -> (usize, usize) {
        let (h, f, qd, kd) = (c.hidden_size, c.intermediate_size, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        match self {
            RandomTensor::Embed | RandomTensor::LmHead => (c.vocab_size, h),
            RandomTensor::Qkv(_) => (qd + 2 * kd, h),
            RandomTensor::O(_) => (h, qd),
            RandomTensor::GateUp(_) => (2 * f, h),
            RandomTensor::Down(_) => (h, f),
        }
    }

    /// The tensor's own seed under the model seed `seed`.
    pub fn seed(self, seed: u64) -> u64 {
        let (layer, k) = match self {
            RandomTensor::Embed => (0, 1_000_000),
            RandomTensor::LmHead => (0, 1_000_001),
            RandomTensor::Qkv(l) => (l, 0),
            RandomTensor::O(l) => (l, 1),
            RandomTensor::GateUp(l) => (l, 2),
            RandomTensor::Down(l) => (l, 3),
        };
        seed.wrapping_mul(1_000_003).wrapping_add(layer as u64 * 16 + k)
    }

    /// The tensor's uniform scale when its rows have `cols` values (the embedding's is 1).
    pub fn scale(self, cols: usize) -> f32 {
        if self == RandomTensor::Embed { 1.0 } else { scale_for(cols) }
    }

    /// Rows `rows` of the tensor, row-major, as `f32` (backends round to their own type),
    /// computed on all cores.
    pub fn rows(self, c: &ModelConfig, seed: u64, rows: std::ops::Range<usize>) -> Vec<f32> {
        let cols = self.shape(c).1;
        let (s, scale) = (self.seed(seed), self.scale(cols));
        let (start, n) = ((rows.start * cols) as u64, rows.len() * cols);
        let mut out = vec![0f32; n];
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        let per = n.div_ceil(threads).max(1 << 16);
        std::thread::scope(|scope| {
            for (k, part) in out.chunks_mut(per).enumerate() {
                scope.spawn(move || {
                    let base = start + (k * per) as u64;
                    for (i, v) in part.iter_mut().enumerate() {
                        *v = hash_uniform(s, base + i as u64) * scale;
                    }
                });
            }
        });
        out
    }
}

/// A projection of one block, as the Llama family names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    /// Query.
    Q,
    /// Key.
    K,
    /// Value.
    V,
    /// Attention output.
    O,
    /// MLP gate.
    Gate,
    /// MLP up.
    Up,
    /// MLP down.
    Down,
}

impl Projection {
    /// Every projection of a block, in checkpoint order.
    pub const ALL: [Projection; 7] = [Projection::Q, Projection::K, Projection::V, Projection::O, Projection::Gate, Projection::Up, Projection::Down];

    /// Where block `layer`'s projection lies in the generated tensors: q, k and v are row
    /// ranges of the stacked `Qkv`, gate and up of `GateUp` (the GPU keeps them stacked; the CPU
    /// and checkpoints split them).
    pub fn source(self, layer: usize, c: &ModelConfig) -> (RandomTensor, std::ops::Range<usize>) {
        let (h, qd, kd, f) = (c.hidden_size, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.intermediate_size);
        match self {
            Projection::Q => (RandomTensor::Qkv(layer), 0..qd),
            Projection::K => (RandomTensor::Qkv(layer), qd..qd + kd),
            Projection::V => (RandomTensor::Qkv(layer), qd + kd..qd + 2 * kd),
            Projection::O => (RandomTensor::O(layer), 0..h),
            Projection::Gate => (RandomTensor::GateUp(layer), 0..f),
            Projection::Up => (RandomTensor::GateUp(layer), f..2 * f),
            Projection::Down => (RandomTensor::Down(layer), 0..h),
        }
    }
}

/// Uniform scale giving unit-variance outputs for unit-variance inputs.
pub fn scale_for(in_dim: usize) -> f32 {
    (3.0 / in_dim as f32).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_seeded_uniform_and_row_ranges_agree() {
        let v: Vec<f32> = (0..100_000).map(|i| hash_uniform(3, i)).collect();
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.01 && (var - 1.0 / 3.0).abs() < 0.01, "mean {mean}, var {var}");
        assert_ne!(hash_uniform(3, 5), hash_uniform(4, 5));
        let c = ModelConfig {
            architecture: crate::config::Architecture::Llama,
            n_layers: 2,
            hidden_size: 64,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 32,
            intermediate_size: 96,
            vocab_size: 50,
            context_length: 128,
            rope_theta: 10_000.0,
            rope_style: crate::config::RopeStyle::HalfSplit,
            rope_freq_factors: None,
            rms_norm_eps: 1e-5,
            tie_embeddings: false,
            bos_token_id: None,
            eos_token_ids: vec![],
        };
        let all = RandomTensor::Qkv(1).rows(&c, 9, 0..RandomTensor::Qkv(1).shape(&c).0);
        let cols = RandomTensor::Qkv(1).shape(&c).1;
        assert_eq!(RandomTensor::Qkv(1).rows(&c, 9, 2..5), all[2 * cols..5 * cols].to_vec());
        assert_ne!(RandomTensor::Qkv(0).rows(&c, 9, 0..1), all[..cols].to_vec(), "layers differ");
        assert_eq!(RandomTensor::Embed.scale(64), 1.0);
        // The projections tile the stacked tensors exactly.
        let rows = |p: Projection| Projection::source(p, 1, &c).1;
        assert_eq!((rows(Projection::Q), rows(Projection::K), rows(Projection::V)), (0..64, 64..96, 96..128));
        assert_eq!(RandomTensor::Qkv(1).shape(&c).0, 128);
        assert_eq!((rows(Projection::Gate), rows(Projection::Up)), (0..96, 96..192));
        assert_eq!(RandomTensor::GateUp(1).shape(&c).0, 192);
        assert_eq!(RandomTensor::Down(0).scale(96), (3.0f32 / 96.0).sqrt());
    }
}
