//! A quantised KV cache simulated on the CPU, for accuracy studies: the cache still holds
//! `f32` (or `f16`; never int8, which `duo eval` refuses) elements, but every key and value is
//! rounded as a scheme would hold it (4-bit ones: [`duo_kernels::kv4`]; 8-bit keys:
//! [`duo_kernels::kv8`]; fp8: [`duo_kernels::fp8`], the GPU's rows and, since session 25,
//! its keys in a Hadamard basis), so the passkey and needle grids can compare schemes before
//! one is built into the GPU's kernels. No memory is saved. `duo eval` takes the scheme from the
//! environment variable `DUO_SIMULATE_KV` (refusing a bad value, and the GPU); nothing
//! else simulates.

use duo_kernels::kv4;

/// The environment variable that turns the simulation on.
pub const ENV: &str = "DUO_SIMULATE_KV";

/// Positions per block of per-channel key groups ([`KvSim::Channels`]).
pub const CHANNEL_BLOCK: usize = 64;

/// Which 4-bit scheme the cache's rounding follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvSim {
    /// Keys and values per row (one position of one head), as they are.
    Rows,
    /// Values per row; keys per row in a Hadamard basis: the GPU's `--kv-dtype int4` (whose
    /// decode kernel applies step and minimum to the scores in f32 rather than rounding each
    /// key to f16: a difference of half an f16 ulp per key).
    RowsTurned,
    /// [`KvSim::RowsTurned`] for retrieval heads, streaming heads exact: the GPU's int4 with
    /// its streaming window kept in 16 bits (`--kv-dtype int4 --kv-dtype-streaming bf16`).
    RowsTurnedExactStreaming,
    /// KIVI: a retrieval head's keys per channel over each complete block of
    /// [`CHANNEL_BLOCK`] positions (the partial last block exact), streaming heads' keys as
    /// [`KvSim::RowsTurned`]; values per row.
    Channels,
    /// [`KvSim::Channels`] with streaming heads exact (a streaming window kept in 16 bits
    /// beside 4-bit retrieval heads).
    ChannelsExactStreaming,
    /// Values per row, keys exact: how much of the loss is the values'.
    ValuesOnly,
    /// [`KvSim::ChannelsExactStreaming`], with a block's keys rounded only once the next
    /// block is complete too (64 to 127 recent positions exact, as KIVI's residual).
    ChannelsLagged,
    /// Keys in 8 bits per row (`amax / 127`, the GPU's int8), values in 4 bits per row.
    Keys8Values4,
    /// [`KvSim::Keys8Values4`] for retrieval heads, streaming heads exact.
    Keys8Values4ExactStreaming,
    /// Keys as [`KvSim::Keys8Values4`]; values in 4 bits per group of this many values (a
    /// step and minimum per group: 16 or 32) instead of per row: whether full attention's
    /// loss with k8v4 is the values' row-wide step.
    Keys8ValueGroups(usize),
    /// Values per row; keys in a Hadamard basis per group of this many values (a step and
    /// minimum per group: 16 or 32), the group-wise asymmetric scheme at a finer grain than
    /// the row.
    GroupsTurned(usize),
    /// Keys as the GPU's fp8 rows (e4m3 with a power-of-two row scale), values in 4 bits per
    /// row: a mixed cache whose keys the faster fp8 decode path would read.
    Fp8KeysValues4,
    /// Keys in 6 bits per row (`amax / 31`, symmetric, ties to even), values in 4 bits per
    /// row: between the int8 keys that meet the accuracy bound and the int4 ones that do not,
    /// at 0.66 of int8-keys-int4-values' bytes per token.
    Keys6Values4,
    /// Keys and values as the GPU's fp8 rows (e4m3, a power-of-two scale per row): the
    /// simulation of `--kv-dtype fp8`, to compare the turned form below against.
    Fp8Rows,
    /// Values as [`KvSim::Fp8Rows`]; keys as fp8 rows in a Hadamard basis: whether spreading
    /// a key's few large (RoPE's slow) channels over all of them takes back fp8's loss. An
    /// e4m3 value keeps 3 mantissa bits whatever its size, so turning cannot shrink the
    /// relative error of one element; it evens out the products q_i k_i, and a score's error
    /// (the sum of their independent errors) is smallest when no few products dominate it.
    Fp8RowsTurned,
    /// Keys as [`KvSim::Fp8RowsTurned`], values exact: how much of turned fp8's remaining
    /// loss is the values'.
    Fp8KeysTurned,
}

impl std::str::FromStr for KvSim {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "int4-rows" => Ok(KvSim::Rows),
            "int4-rows-turned" => Ok(KvSim::RowsTurned),
            "int4-rows-turned-exact-streaming" => Ok(KvSim::RowsTurnedExactStreaming),
            "int4-channels" => Ok(KvSim::Channels),
            "int4-channels-exact-streaming" => Ok(KvSim::ChannelsExactStreaming),
            "int4-values" => Ok(KvSim::ValuesOnly),
            "int4-channels-lagged" => Ok(KvSim::ChannelsLagged),
            "int8-keys-int4-values" => Ok(KvSim::Keys8Values4),
            "int8-keys-int4-values-exact-streaming" => Ok(KvSim::Keys8Values4ExactStreaming),
            "int8-keys-int4-values-g16" => Ok(KvSim::Keys8ValueGroups(16)),
            "int8-keys-int4-values-g32" => Ok(KvSim::Keys8ValueGroups(32)),
            "int4-g16-turned" => Ok(KvSim::GroupsTurned(16)),
            "int4-g32-turned" => Ok(KvSim::GroupsTurned(32)),
            "fp8-keys-int4-values" => Ok(KvSim::Fp8KeysValues4),
            "int6-keys-int4-values" => Ok(KvSim::Keys6Values4),
            "fp8-rows" => Ok(KvSim::Fp8Rows),
            "fp8-rows-turned" => Ok(KvSim::Fp8RowsTurned),
            "fp8-keys-turned" => Ok(KvSim::Fp8KeysTurned),
            _ => Err(format!("{ENV}={s}: expected int4-rows, int4-rows-turned, int4-rows-turned-exact-streaming, int4-channels, int4-channels-exact-streaming, int4-channels-lagged, int4-values, int8-keys-int4-values, int8-keys-int4-values-exact-streaming, int8-keys-int4-values-g16, int8-keys-int4-values-g32, int4-g16-turned, int4-g32-turned, fp8-keys-int4-values, int6-keys-int4-values, fp8-rows, fp8-rows-turned or fp8-keys-turned")),
        }
    }
}

impl KvSim {
    /// Whether retrieval heads' keys are rounded by channel blocks once cached.
    pub fn by_channels(self) -> bool {
        matches!(self, KvSim::Channels | KvSim::ChannelsExactStreaming | KvSim::ChannelsLagged)
    }

    /// Whether the scheme turns rows by a Hadamard transform somewhere (which takes a
    /// power-of-two `head_dim`: [`KvSim::check_head_dim`]).
    pub fn turns(self) -> bool {
        matches!(self, KvSim::RowsTurned | KvSim::RowsTurnedExactStreaming | KvSim::Channels | KvSim::GroupsTurned(_) | KvSim::Fp8RowsTurned | KvSim::Fp8KeysTurned)
    }

    /// Refuses a scheme that turns rows for heads of `head_dim` that is not a power of two
    /// (the Walsh-Hadamard transform's length), before any rounding would panic.
    pub fn check_head_dim(self, head_dim: usize) -> Result<(), String> {
        if self.turns() && !head_dim.is_power_of_two() {
            return Err(format!("{ENV}={self:?} turns rows by a Hadamard transform, which needs heads of a power-of-two size, not {head_dim}"));
        }
        Ok(())
    }

    /// Whether streaming heads are left exact (a 16-bit streaming window).
    pub fn streaming_exact(self) -> bool {
        matches!(self, KvSim::RowsTurnedExactStreaming | KvSim::ChannelsExactStreaming | KvSim::ChannelsLagged | KvSim::Keys8Values4ExactStreaming)
    }

    /// The scheme `DUO_SIMULATE_KV` asks for (`None` when unset or empty).
    pub fn from_env() -> Result<Option<KvSim>, String> {
        match std::env::var(ENV) {
            Ok(s) if !s.is_empty() => s.parse().map(Some),
            _ => Ok(None),
        }
    }

    /// Rounds a chunk's keys (`retrieval[g]`: whether KV head `g` is a retrieval head) and
    /// values, rows of `heads * head_dim`, as they will be cached: every value row; keys
    /// by rows, except a retrieval head's under the channel schemes (rounded by blocks once
    /// cached, [`KvSim::round_blocks`]); a streaming head's rows not at all where
    /// [`KvSim::streaming_exact`].
    pub fn round_chunk(self, k: &mut [f32], v: &mut [f32], retrieval: &[bool], head_dim: usize) {
        for (g, &is_retrieval) in retrieval.iter().cycle().take(k.len() / head_dim).enumerate() {
            let at = g * head_dim..(g + 1) * head_dim;
            if self.streaming_exact() && !is_retrieval {
                continue;
            }
            match self {
                KvSim::Keys8ValueGroups(group) => kv4::round_groups(&mut v[at.clone()], head_dim, group),
                KvSim::Fp8Rows | KvSim::Fp8RowsTurned => duo_kernels::fp8::round_row(&mut v[at.clone()]),
                KvSim::Fp8KeysTurned => {}
                _ => kv4::round_rows(&mut v[at.clone()], head_dim),
            }
            match self {
                KvSim::Rows => kv4::round_rows(&mut k[at], head_dim),
                KvSim::RowsTurned | KvSim::RowsTurnedExactStreaming => kv4::round_rows_turned(&mut k[at], head_dim),
                KvSim::Channels if !is_retrieval => kv4::round_rows_turned(&mut k[at], head_dim),
                KvSim::Keys8Values4 | KvSim::Keys8Values4ExactStreaming | KvSim::Keys8ValueGroups(_) => duo_kernels::kv8::round_row(&mut k[at]),
                KvSim::GroupsTurned(group) => kv4::round_groups_turned(&mut k[at], head_dim, group),
                KvSim::Fp8KeysValues4 => duo_kernels::fp8::round_row(&mut k[at]),
                KvSim::Keys6Values4 => duo_kernels::kv8::round_row_levels(&mut k[at], 31),
                KvSim::Fp8Rows => duo_kernels::fp8::round_row(&mut k[at]),
                KvSim::Fp8RowsTurned | KvSim::Fp8KeysTurned => duo_kernels::fp8::round_row_turned(&mut k[at]),
                KvSim::Channels | KvSim::ChannelsExactStreaming | KvSim::ChannelsLagged | KvSim::ValuesOnly => {}
            }
        }
    }

    /// Under the channel schemes, rounds the blocks of a retrieval head's keys (`keys`, rows
    /// of `head_dim`) that the last append completed (those past the first `before` rows;
    /// lagged, the blocks before them).
    pub fn round_blocks(self, keys: &mut [f32], before: usize, head_dim: usize) {
        if !self.by_channels() {
            return;
        }
        let lag = usize::from(self == KvSim::ChannelsLagged);
        let rows = keys.len() / head_dim;
        for b in (before / CHANNEL_BLOCK).saturating_sub(lag)..(rows / CHANNEL_BLOCK).saturating_sub(lag) {
            kv4::round_channels(&mut keys[b * CHANNEL_BLOCK * head_dim..(b + 1) * CHANNEL_BLOCK * head_dim], head_dim);
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_bad_ones_are_refused_by_name() {
        assert_eq!("int4-channels".parse::<KvSim>(), Ok(KvSim::Channels));
        assert!("int3".parse::<KvSim>().unwrap_err().contains("int4-rows-turned"));
        assert_eq!("int4-g16-turned".parse::<KvSim>(), Ok(KvSim::GroupsTurned(16)));
        assert_eq!("fp8-keys-int4-values".parse::<KvSim>(), Ok(KvSim::Fp8KeysValues4));
        assert_eq!("int6-keys-int4-values".parse::<KvSim>(), Ok(KvSim::Keys6Values4));
        assert_eq!("int8-keys-int4-values-g32".parse::<KvSim>(), Ok(KvSim::Keys8ValueGroups(32)));
        // Turning schemes need power-of-two heads; the others take any.
        assert!(KvSim::Fp8RowsTurned.check_head_dim(96).unwrap_err().contains("96"));
        assert!(KvSim::RowsTurned.check_head_dim(80).is_err());
        assert_eq!(KvSim::Fp8RowsTurned.check_head_dim(64), Ok(()));
        assert_eq!(KvSim::Keys8Values4.check_head_dim(96), Ok(()));
        assert_eq!(KvSim::Fp8Rows.check_head_dim(80), Ok(()));
    }

    #[test]
    fn a_scheme_turns_rows_exactly_when_it_says_so() {
        // What `turns` claims (and check_head_dim refuses on) is what round_chunk does: the
        // Hadamard transform, the only part that needs a power-of-two row, panics on rows of
        // 96 values; every other rounding takes them. Both head kinds, so that a scheme that
        // turns only streaming heads (Channels) is caught too.
        let all = [
            KvSim::Rows, KvSim::RowsTurned, KvSim::RowsTurnedExactStreaming, KvSim::Channels, KvSim::ChannelsExactStreaming,
            KvSim::ValuesOnly, KvSim::ChannelsLagged, KvSim::Keys8Values4, KvSim::Keys8Values4ExactStreaming,
            KvSim::Keys8ValueGroups(16), KvSim::Keys8ValueGroups(32), KvSim::GroupsTurned(16), KvSim::GroupsTurned(32),
            KvSim::Fp8KeysValues4, KvSim::Keys6Values4, KvSim::Fp8Rows, KvSim::Fp8RowsTurned, KvSim::Fp8KeysTurned,
        ];
        let hd = 96;
        let rows: Vec<f32> = (0..2 * hd).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let panicked: Vec<bool> = all
            .iter()
            .map(|&sim| {
                let (mut k, mut v) = (rows.clone(), rows.clone());
                std::panic::catch_unwind(move || sim.round_chunk(&mut k, &mut v, &[true, false], hd)).is_err()
            })
            .collect();
        std::panic::set_hook(hook);
        for (sim, turned) in all.iter().zip(panicked) {
            assert_eq!(sim.turns(), turned, "{sim:?}");
        }
    }

    #[test]
    fn value_groups_round_values_closer_and_keys_as_int8_rows() {
        let hd = 64;
        // Rows with one large channel each, so that a row-wide step is coarse.
        let rows: Vec<f32> = (0..hd * 20).map(|i| if i % hd == (i / hd) % hd { 9.0 } else { ((i * 7919 % 1000) as f32 / 500.0) - 1.0 }).collect();
        let err = |a: &[f32]| a.iter().zip(&rows).map(|(x, y)| (x - y) * (x - y)).sum::<f32>();
        let retrieval = [true];
        let (mut k_rows, mut v_rows) = (rows.clone(), rows.clone());
        KvSim::Keys8Values4.round_chunk(&mut k_rows, &mut v_rows, &retrieval, hd);
        let (mut k_groups, mut v_groups) = (rows.clone(), rows.clone());
        KvSim::Keys8ValueGroups(32).round_chunk(&mut k_groups, &mut v_groups, &retrieval, hd);
        assert_eq!(k_groups, k_rows, "keys round as int8 rows in both");
        assert!(err(&v_groups) < err(&v_rows) * 0.8, "groups {} vs rows {}", err(&v_groups), err(&v_rows));
        assert_ne!(v_groups, rows, "values are rounded");
    }

    #[test]
    fn fp8_keys_turned_score_closer_where_query_and_key_share_a_large_channel() {
        let hd = 64;
        // Rows whose channels 3 and 35 are large (as RoPE's slow channels are in queries and
        // keys alike), the rest uniform in (-1, 1). (The rounding errors must be as
        // independent as real data's: with a few repeated values they line up with the
        // query's signs and add coherently in either basis.)
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let keys: Vec<f32> = (0..hd * 40).map(|j| if matches!(j % hd, 3 | 35) { 15.5 + 7.5 * uniform() } else { uniform() }).collect();
        let query: Vec<f32> = (0..hd).map(|i| if matches!(i, 3 | 35) { 10.0 } else { 0.5 * uniform() }).collect();
        let score_err = |k: &[f32]| {
            k.chunks(hd).zip(keys.chunks(hd)).map(|(a, b)| {
                let d: f32 = a.iter().zip(b).zip(&query).map(|((x, y), q)| (x - y) * q).sum();
                d * d
            }).sum::<f32>()
        };
        let (mut k_plain, mut v_plain) = (keys.clone(), keys.clone());
        KvSim::Fp8Rows.round_chunk(&mut k_plain, &mut v_plain, &[true], hd);
        let (mut k_turned, mut v_turned) = (keys.clone(), keys.clone());
        KvSim::Fp8RowsTurned.round_chunk(&mut k_turned, &mut v_turned, &[true], hd);
        assert_eq!(v_turned, v_plain, "values round as fp8 rows in both");
        assert_ne!(v_plain, keys, "and are rounded");
        assert!(score_err(&k_turned) < score_err(&k_plain) * 0.5, "turned {} vs plain {}", score_err(&k_turned), score_err(&k_plain));
        assert_eq!("fp8-rows-turned".parse::<KvSim>(), Ok(KvSim::Fp8RowsTurned));
        let (mut k_only, mut v_exact) = (keys.clone(), keys.clone());
        KvSim::Fp8KeysTurned.round_chunk(&mut k_only, &mut v_exact, &[true], hd);
        assert_eq!((k_only, v_exact), (k_turned, keys.clone()), "fp8-keys-turned: the same keys, exact values");
    }

    #[test]
    fn only_complete_blocks_are_rounded_and_each_once() {
        let hd = 4;
        let keys: Vec<f32> = (0..(2 * CHANNEL_BLOCK + 10) * hd).map(|i| (i * 7919 % 1000) as f32 / 997.0).collect();
        let mut got = keys.clone();
        KvSim::Channels.round_blocks(&mut got, CHANNEL_BLOCK - 3, hd);
        let first = CHANNEL_BLOCK * hd;
        assert_ne!(got[..first], keys[..first], "block 0 completed by this append: rounded");
        assert_ne!(got[first..2 * first], keys[first..2 * first], "block 1 as well");
        assert_eq!(got[2 * first..], keys[2 * first..], "the partial block stays exact");
        let again = got.clone();
        KvSim::Channels.round_blocks(&mut got, 2 * CHANNEL_BLOCK + 10, hd);
        assert_eq!(got, again);
        KvSim::Rows.round_blocks(&mut got, 0, hd);
        assert_eq!(got, again, "row schemes round at append, not here");
    }
}
