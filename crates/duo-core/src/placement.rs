//! Which GPU holds which KV heads when a model's layers are split across GPUs (tensor
//! parallelism), and what each choice costs.
//!
//! Tensor parallelism gives every GPU the same number of KV heads per layer (with their
//! query heads and the matching rows of the output projection), so the projections split
//! evenly. Serving engines take the heads in order: GPU 0 the first `heads / gpus`, and so
//! on. Under DuoAttention that split is uneven where it matters: retrieval heads hold a
//! context-length cache, streaming heads a constant window, and a pattern may put most of a
//! layer's retrieval heads in one half. The GPU with the most retrieval KV runs out of
//! memory first (the longest context) and, since every layer ends in an all-reduce, the GPU
//! with the most retrieval heads in a layer sets that layer's attention time.
//!
//! [`Placement::retrieval_aware`] keeps the equal head counts and, per layer, deals the
//! retrieval heads out as evenly as they go (`ceil(r / gpus)` at most on any GPU, the least
//! any placement can do), giving each layer's remainder to the GPUs that hold the fewest
//! retrieval heads so far, so that the totals differ by at most one head. Pure arithmetic on
//! the pattern: computed once, printed by `duo pattern show --tensor-parallel N`.
//!
//! Where the GPUs do not divide a layer's KV heads (SmolLM2's 3 over 2 GPUs), the first
//! `heads % gpus` GPUs hold one head more of every layer; each GPU still holds the same
//! number of heads in every layer (its shard is a model of its own shape).

use crate::error::{CoreError, Result};
use crate::pattern::HeadPattern;

/// How heads were assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Heads in order: GPU `g` holds heads `g * k .. (g + 1) * k` of every layer.
    Contiguous,
    /// Retrieval heads dealt out evenly per layer and in total (see the module docs).
    RetrievalAware,
}

impl std::fmt::Display for Strategy {
    /// As `--placement` spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::Contiguous => "contiguous",
            Strategy::RetrievalAware => "retrieval-aware",
        })
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;

    /// `--placement`'s spellings (`aware` short for `retrieval-aware`).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "retrieval-aware" | "aware" => Ok(Strategy::RetrievalAware),
            "contiguous" => Ok(Strategy::Contiguous),
            other => Err(format!("`{other}` is not a placement: retrieval-aware or contiguous")),
        }
    }
}

/// `gpu_of[layer][kv_head]`: the GPU that holds each KV head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    strategy: Strategy,
    gpus: usize,
    gpu_of: Vec<Vec<usize>>,
}

/// Retrieval and streaming KV heads one GPU holds, summed over layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GpuHeads {
    /// Retrieval heads (context-length caches).
    pub retrieval: usize,
    /// Streaming heads (sink + recent windows).
    pub streaming: usize,
}

impl Placement {
    /// KV heads each GPU holds in every layer: `heads / gpus`, one more on the first
    /// `heads % gpus` GPUs; an error unless 1 <= gpus <= heads.
    pub fn shares(heads: usize, gpus: usize) -> Result<Vec<usize>> {
        if gpus == 0 || gpus > heads {
            return Err(CoreError::InvalidSetting {
                name: "tensor-parallel",
                value: gpus.to_string(),
                expected: "a number of GPUs from 1 to the model's KV heads per layer (each GPU holds at least one)",
            });
        }
        Ok((0..gpus).map(|g| heads / gpus + usize::from(g < heads % gpus)).collect())
    }

    /// The split engines use: heads in order, GPU 0 the first share, and so on.
    pub fn contiguous(pattern: &HeadPattern, gpus: usize) -> Result<Self> {
        let shares = Self::shares(pattern.n_kv_heads(), gpus)?;
        let row: Vec<usize> = shares.iter().enumerate().flat_map(|(g, &n)| std::iter::repeat_n(g, n)).collect();
        Ok(Self { strategy: Strategy::Contiguous, gpus, gpu_of: vec![row; pattern.n_layers()] })
    }

    /// Retrieval heads dealt out evenly per layer, remainders to the GPUs with the fewest so
    /// far (ties to the lower GPU index); every GPU keeps `heads / gpus` heads per layer.
    /// Deterministic: a pattern always gives the same placement.
    pub fn retrieval_aware(pattern: &HeadPattern, gpus: usize) -> Result<Self> {
        let shares = Self::shares(pattern.n_kv_heads(), gpus)?;
        let mut held = vec![0usize; gpus];
        let mut gpu_of = Vec::with_capacity(pattern.n_layers());
        for layer in 0..pattern.n_layers() {
            let kinds = pattern.layer(layer);
            let r = kinds.iter().filter(|&&k| k).count();
            // Quota of retrieval heads per GPU in this layer: r / gpus each (a share is never
            // smaller), the rest one at a time to the GPUs with room that hold the fewest so far.
            let mut order: Vec<usize> = (0..gpus).collect();
            order.sort_by_key(|&g| (held[g], g));
            let mut quota = vec![r / gpus; gpus];
            let mut rest = r - quota.iter().sum::<usize>();
            while rest > 0 {
                for &g in &order {
                    if rest > 0 && quota[g] < shares[g] {
                        quota[g] += 1;
                        rest -= 1;
                    }
                }
            }
            // Retrieval heads (in index order) fill the quotas GPU by GPU, streaming heads
            // fill each GPU up to its share.
            let mut retrieval_room = quota.clone();
            let mut streaming_room: Vec<usize> = quota.iter().zip(&shares).map(|(q, n)| n - q).collect();
            let mut row = Vec::with_capacity(kinds.len());
            for &is_retrieval in kinds {
                let room = if is_retrieval { &mut retrieval_room } else { &mut streaming_room };
                let g = room.iter().position(|&n| n > 0).expect("the quotas add up to the layer's heads");
                room[g] -= 1;
                row.push(g);
            }
            for (g, q) in quota.iter().enumerate() {
                held[g] += q;
            }
            gpu_of.push(row);
        }
        Ok(Self { strategy: Strategy::RetrievalAware, gpus, gpu_of })
    }

    /// The strategy that made it.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// GPUs.
    pub fn gpus(&self) -> usize {
        self.gpus
    }

    /// The GPU holding `kv_head` of `layer`.
    pub fn gpu_of(&self, layer: usize, kv_head: usize) -> usize {
        self.gpu_of[layer][kv_head]
    }

    /// The KV heads of `layer` on `gpu`, in index order.
    pub fn heads_on(&self, layer: usize, gpu: usize) -> Vec<usize> {
        (0..self.gpu_of[layer].len()).filter(|&h| self.gpu_of[layer][h] == gpu).collect()
    }

    /// The KV heads of every layer on `gpu`, in index order: `[layer][..]`, that GPU's shard.
    pub fn heads_of(&self, gpu: usize) -> Vec<Vec<usize>> {
        (0..self.gpu_of.len()).map(|layer| self.heads_on(layer, gpu)).collect()
    }

    /// `pattern` as `gpu` holds it: the kinds of its own heads, layer by layer, in its order.
    pub fn share(&self, pattern: &HeadPattern, gpu: usize) -> Result<HeadPattern> {
        HeadPattern::from_rows(self.heads_of(gpu).iter().enumerate().map(|(l, hs)| hs.iter().map(|&h| pattern.is_retrieval(l, h)).collect()).collect())
    }

    /// Retrieval and streaming heads per GPU, summed over layers.
    pub fn heads_per_gpu(&self, pattern: &HeadPattern) -> Vec<GpuHeads> {
        let mut out = vec![GpuHeads::default(); self.gpus];
        for (layer, row) in self.gpu_of.iter().enumerate() {
            for (h, &g) in row.iter().enumerate() {
                if pattern.is_retrieval(layer, h) {
                    out[g].retrieval += 1;
                } else {
                    out[g].streaming += 1;
                }
            }
        }
        out
    }

    /// Retrieval heads of the GPU with the most in each layer, summed over layers: at long
    /// context a step's attention time is about proportional to it (each layer waits for its
    /// slowest GPU). The least any placement can do is `sum(ceil(r_l / gpus))`.
    pub fn slowest_gpu_retrieval_heads(&self, pattern: &HeadPattern) -> usize {
        (0..self.gpu_of.len())
            .map(|layer| (0..self.gpus).map(|g| self.heads_on(layer, g).iter().filter(|&&h| pattern.is_retrieval(layer, h)).count()).max().unwrap_or(0))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(rows: &[&[bool]]) -> HeadPattern {
        HeadPattern::from_rows(rows.iter().map(|r| r.to_vec()).collect()).expect("pattern")
    }

    fn seeded(layers: usize, heads: usize, seed: u64) -> HeadPattern {
        let mut x = seed | 1;
        let rows = (0..layers)
            .map(|_| {
                (0..heads)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x % 3 == 0
                    })
                    .collect()
            })
            .collect();
        HeadPattern::from_rows(rows).expect("pattern")
    }

    /// Both strategies give every GPU `heads / gpus` heads of every layer, each head once.
    #[test]
    fn every_gpu_holds_an_equal_share_of_every_layer() {
        for (heads, gpus) in [(8, 2), (8, 4), (32, 2), (32, 8), (4, 1)] {
            let p = seeded(32, heads, heads as u64 * 7 + gpus as u64);
            for placement in [Placement::contiguous(&p, gpus), Placement::retrieval_aware(&p, gpus)] {
                let placement = placement.expect("placement");
                for layer in 0..32 {
                    let mut all: Vec<usize> = Vec::new();
                    for g in 0..gpus {
                        let on = placement.heads_on(layer, g);
                        assert_eq!(on.len(), heads / gpus, "{:?}: layer {layer}, gpu {g}", placement.strategy());
                        all.extend(on);
                    }
                    all.sort();
                    assert_eq!(all, (0..heads).collect::<Vec<_>>());
                }
            }
        }
    }

    /// Retrieval-aware: per layer no GPU holds more than ceil(r / gpus) retrieval heads, and
    /// the totals differ by at most one head, on many seeded patterns.
    #[test]
    fn retrieval_aware_is_balanced_per_layer_and_in_total() {
        for seed in 0..50u64 {
            for (heads, gpus) in [(8, 2), (8, 4), (32, 2), (32, 4)] {
                let p = seeded(32, heads, seed * 31 + heads as u64);
                let a = Placement::retrieval_aware(&p, gpus).expect("placement");
                let floor: usize = (0..32).map(|l| p.layer(l).iter().filter(|&&k| k).count().div_ceil(gpus)).sum();
                assert_eq!(a.slowest_gpu_retrieval_heads(&p), floor, "seed {seed}: the per-layer optimum");
                let per = a.heads_per_gpu(&p);
                let (max, min) = (per.iter().map(|g| g.retrieval).max().unwrap_or(0), per.iter().map(|g| g.retrieval).min().unwrap_or(0));
                assert!(max - min <= 1, "seed {seed}, {heads} heads on {gpus}: {per:?}");
                assert_eq!(per.iter().map(|g| g.retrieval).sum::<usize>(), p.retrieval_count());
                let c = Placement::contiguous(&p, gpus).expect("placement");
                assert!(c.slowest_gpu_retrieval_heads(&p) >= floor);
            }
        }
    }

    /// A pattern whose retrieval heads sit in each layer's first half: the contiguous split
    /// puts all of them on GPU 0, the aware one halves them.
    #[test]
    fn a_lopsided_pattern() {
        let p = pattern(&[&[true, true, false, false], &[true, true, false, false], &[true, false, false, false]]);
        let c = Placement::contiguous(&p, 2).expect("placement");
        assert_eq!(c.heads_per_gpu(&p)[0], GpuHeads { retrieval: 5, streaming: 1 });
        assert_eq!(c.heads_per_gpu(&p)[1], GpuHeads { retrieval: 0, streaming: 6 });
        assert_eq!(c.slowest_gpu_retrieval_heads(&p), 5);
        let a = Placement::retrieval_aware(&p, 2).expect("placement");
        let per = a.heads_per_gpu(&p);
        assert_eq!((per[0].retrieval, per[1].retrieval), (3, 2));
        assert_eq!(a.slowest_gpu_retrieval_heads(&p), 3);
        // Layer 0: heads 0 and 1 go to different GPUs, each with one streaming head.
        assert_ne!(a.gpu_of(0, 0), a.gpu_of(0, 1));
        // Layer 2's single retrieval head goes to the GPU with fewer so far (a tie: GPU 0).
        assert_eq!(a.gpu_of(2, 0), 0);
    }

    #[test]
    fn strategies_read_back_as_they_print() {
        for s in [Strategy::Contiguous, Strategy::RetrievalAware] {
            assert_eq!(s.to_string().parse::<Strategy>(), Ok(s));
        }
        assert_eq!("aware".parse::<Strategy>(), Ok(Strategy::RetrievalAware));
        assert!("diagonal".parse::<Strategy>().unwrap_err().contains("retrieval-aware or contiguous"));
    }

    #[test]
    fn every_gpu_needs_a_head() {
        let p = seeded(4, 8, 1);
        for bad in [0, 9, 16] {
            let err = Placement::retrieval_aware(&p, bad).unwrap_err().to_string();
            assert!(err.contains("tensor-parallel"), "{err}");
            assert!(Placement::contiguous(&p, bad).is_err());
        }
    }

    /// GPUs that do not divide the heads: the first `heads % gpus` hold one more of every
    /// layer, and retrieval heads still go no more than `ceil(r / gpus)` to any GPU.
    #[test]
    fn uneven_shares_keep_each_gpus_count_in_every_layer() {
        assert_eq!(Placement::shares(3, 2).expect("shares"), vec![2, 1]);
        assert_eq!(Placement::shares(8, 3).expect("shares"), vec![3, 3, 2]);
        for seed in 0..30u64 {
            for (heads, gpus) in [(3, 2), (8, 3), (5, 4)] {
                let p = seeded(12, heads, seed * 17 + heads as u64);
                let shares = Placement::shares(heads, gpus).expect("shares");
                for placement in [Placement::contiguous(&p, gpus), Placement::retrieval_aware(&p, gpus)] {
                    let placement = placement.expect("placement");
                    for layer in 0..12 {
                        for (g, &n) in shares.iter().enumerate() {
                            assert_eq!(placement.heads_on(layer, g).len(), n, "layer {layer}, gpu {g}");
                        }
                    }
                }
                let a = Placement::retrieval_aware(&p, gpus).expect("placement");
                let floor: usize = (0..12).map(|l| p.layer(l).iter().filter(|&&k| k).count().div_ceil(gpus)).sum();
                assert_eq!(a.slowest_gpu_retrieval_heads(&p), floor, "seed {seed}, {heads} heads on {gpus}");
            }
        }
        // All three of a layer's heads retrieval on 2 GPUs: two on GPU 0 (its share), one on GPU 1.
        let p = pattern(&[&[true, true, true]]);
        let a = Placement::retrieval_aware(&p, 2).expect("placement");
        assert_eq!((a.heads_on(0, 0), a.heads_on(0, 1)), (vec![0, 1], vec![2]));
    }
}
