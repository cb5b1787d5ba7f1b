//! Tensor parallelism's split of a model over GPUs (issue 17): which rows and columns of
//! each weight matrix a GPU (a *rank*) keeps.
//!
//! Each rank holds, per layer, the KV heads a [`duo_core::placement::Placement`] gives it
//! (retrieval-aware or contiguous), with their query heads, and a slice of the MLP:
//! - q, k, v rows of its heads (column-parallel): its attention needs nothing from the
//!   other ranks;
//! - the output projection's columns of its query heads (row-parallel): its product is a
//!   partial sum of the layer's output, completed by an all-reduce;
//! - gate and up rows `[rank * f / n, (rank + 1) * f / n)` and the matching down columns:
//!   again a partial sum and an all-reduce.
//!
//! Norms, embeddings and the LM head are replicated. A rank's shard is itself a model of
//! `heads / n` query heads, `kv / n` KV heads and `ffn / n` MLP width per layer, so every
//! single-GPU kernel runs it unchanged; only the two products that end in an all-reduce
//! differ (the residual is added by rank 0 alone, so that the sum holds it once).
//!
//! The order is the contract: a rank's q rows come KV head by KV head in the placement's
//! order (index order within the rank), each KV head's `group` query heads together, and
//! the output projection's columns follow the same order, so that local query head `i`
//! belongs to local KV head `i / group` as in the unsplit model. [`gather_rows_cols`] is
//! the host's definition of the slicing the GPU's gather kernel performs.

use crate::model::GpuConfig;
use crate::{CudaError, Result};

/// Which rows and columns of each of a layer's matrices one rank keeps (indices into the
/// unsplit matrix, in the rank's order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerShard {
    /// The rank's KV heads (global indices).
    pub kv_heads: Vec<usize>,
    /// Rows of the stacked q/k/v projection.
    pub qkv_rows: Vec<u32>,
    /// Columns of the output projection (its query heads' dimensions).
    pub o_cols: Vec<u32>,
    /// Rows of the stacked gate/up projection.
    pub gate_up_rows: Vec<u32>,
    /// Columns of the down projection.
    pub down_cols: Vec<u32>,
}

/// The shape of a rank's shard holding `kv_heads` KV heads per layer (with their query
/// heads) and `1 / world` of the MLP width: a model of its own.
pub fn shard_config(c: &GpuConfig, kv_heads: usize, world: usize) -> Result<GpuConfig> {
    if world == 0 || !c.ffn.is_multiple_of(world) || kv_heads == 0 || kv_heads > c.n_kv_heads {
        return Err(CudaError::Input(format!(
            "a shard of {kv_heads} of the model's {} KV heads over {world} GPUs (which must divide its MLP width {})",
            c.n_kv_heads, c.ffn
        )));
    }
    let group = c.n_heads / c.n_kv_heads;
    Ok(GpuConfig { n_heads: kv_heads * group, n_kv_heads: kv_heads, ffn: c.ffn / world, ..c.clone() })
}

/// The rows and columns rank `rank` of `world` keeps of one layer holding `kv_heads`
/// (global KV head indices, distinct).
pub fn layer_shard(c: &GpuConfig, kv_heads: &[usize], rank: usize, world: usize) -> Result<LayerShard> {
    let local = shard_config(c, kv_heads.len(), world)?;
    let distinct = kv_heads.iter().collect::<std::collections::BTreeSet<_>>().len() == kv_heads.len();
    if rank >= world || !distinct || kv_heads.iter().any(|&h| h >= c.n_kv_heads) {
        return Err(CudaError::Input(format!("rank {rank} of {world} cannot hold KV heads {kv_heads:?} of {}", c.n_kv_heads)));
    }
    let (d, group) = (c.head_dim, c.n_heads / c.n_kv_heads);
    let block = |first_row: usize| (first_row..first_row + d).map(|r| r as u32);
    let query_heads: Vec<usize> = kv_heads.iter().flat_map(|&k| k * group..(k + 1) * group).collect();
    let mut qkv_rows: Vec<u32> = query_heads.iter().flat_map(|&q| block(q * d)).collect();
    qkv_rows.extend(kv_heads.iter().flat_map(|&k| block((c.n_heads + k) * d)));
    qkv_rows.extend(kv_heads.iter().flat_map(|&k| block((c.n_heads + c.n_kv_heads + k) * d)));
    let o_cols = query_heads.iter().flat_map(|&q| block(q * d)).collect();
    let width = local.ffn;
    let slice = |first: usize| (first + rank * width..first + (rank + 1) * width).map(|r| r as u32);
    let gate_up_rows = slice(0).chain(slice(c.ffn)).collect();
    let down_cols = slice(0).collect();
    Ok(LayerShard { kv_heads: kv_heads.to_vec(), qkv_rows, o_cols, gate_up_rows, down_cols })
}

/// `out[i][j] = m[rows[i]][cols[j]]` of a row-major matrix of `width` columns (every row,
/// or every column, where `rows` or `cols` is `None`): what the GPU's gather does.
pub fn gather_rows_cols<T: Copy>(m: &[T], width: usize, rows: Option<&[u32]>, cols: Option<&[u32]>) -> Vec<T> {
    let all_rows: Vec<u32>;
    let rows = match rows {
        Some(r) => r,
        None => {
            all_rows = (0..(m.len() / width) as u32).collect();
            &all_rows
        }
    };
    let mut out = Vec::with_capacity(rows.len() * cols.map_or(width, <[u32]>::len));
    for &r in rows {
        let row = &m[r as usize * width..][..width];
        match cols {
            Some(cols) => out.extend(cols.iter().map(|&c| row[c as usize])),
            None => out.extend_from_slice(row),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> GpuConfig {
        GpuConfig {
            n_layers: 1,
            hidden: 8,
            n_heads: 8,
            n_kv_heads: 4,
            head_dim: 64,
            ffn: 12,
            vocab: 10,
            eps: 1e-5,
            inv_freq: vec![1.0; 32],
            half_split: false,
        }
    }

    #[test]
    fn every_row_and_column_is_kept_by_exactly_one_rank() {
        let c = config();
        let placements = [vec![vec![0, 3], vec![1, 2]], vec![vec![0, 1], vec![2, 3]]];
        for heads in placements {
            let shards: Vec<LayerShard> = (0..2).map(|r| layer_shard(&c, &heads[r], r, 2).expect("shard")).collect();
            let union = |f: &dyn Fn(&LayerShard) -> &Vec<u32>| {
                let mut all: Vec<u32> = shards.iter().flat_map(|s| f(s).clone()).collect();
                all.sort();
                all
            };
            assert_eq!(union(&|s| &s.qkv_rows), (0..(c.qkv_dim()) as u32).collect::<Vec<_>>());
            assert_eq!(union(&|s| &s.o_cols), (0..(c.n_heads * c.head_dim) as u32).collect::<Vec<_>>());
            assert_eq!(union(&|s| &s.gate_up_rows), (0..(2 * c.ffn) as u32).collect::<Vec<_>>());
            assert_eq!(union(&|s| &s.down_cols), (0..c.ffn as u32).collect::<Vec<_>>());
            for s in &shards {
                // Local query head i belongs to local KV head i / group, as in one GPU's model.
                let group = c.n_heads / c.n_kv_heads;
                for (i, block) in s.o_cols.chunks(c.head_dim).enumerate() {
                    let global_query = block[0] as usize / c.head_dim;
                    assert_eq!(global_query / group, s.kv_heads[i / group]);
                }
                assert_eq!(s.qkv_rows.len(), shard_config(&c, 2, 2).expect("config").qkv_dim());
            }
        }
    }

    #[test]
    fn shards_that_do_not_divide_or_do_not_fit_are_refused() {
        let c = config();
        assert!(shard_config(&c, 2, 5).is_err(), "5 does not divide the MLP width 12");
        assert!(shard_config(&c, 2, 0).is_err());
        assert!(shard_config(&c, 0, 2).is_err(), "no heads");
        assert!(shard_config(&c, 5, 2).is_err(), "more heads than the model");
        assert_eq!(shard_config(&c, 3, 3).expect("uneven").n_heads, 6, "3 KV heads of 2 query heads each");
        assert!(layer_shard(&c, &[0, 0], 0, 2).is_err(), "a head twice");
        assert!(layer_shard(&c, &[0, 4], 0, 2).is_err(), "a head outside the model");
        assert!(layer_shard(&c, &[0, 1], 2, 2).is_err(), "a rank outside the world");
    }

    #[test]
    fn gather_picks_rows_and_columns_in_the_order_given() {
        let m: Vec<u32> = (0..12).collect(); // 3 x 4
        assert_eq!(gather_rows_cols(&m, 4, Some(&[2, 0]), None), vec![8, 9, 10, 11, 0, 1, 2, 3]);
        assert_eq!(gather_rows_cols(&m, 4, None, Some(&[3, 1])), vec![3, 1, 7, 5, 11, 9]);
        assert_eq!(gather_rows_cols(&m, 4, Some(&[1]), Some(&[0, 2])), vec![4, 6]);
    }
}
