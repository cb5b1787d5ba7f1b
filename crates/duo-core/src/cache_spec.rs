//! Per-layer KV cache specs: each layer says, as data, how many KV heads keep a full
//! cache and how many keep `sink + recent` entries, and can report its memory need at
//! any sequence length. The engine sums the specs to plan memory before allocating.
//!
//! The formula (DuoAttention, ALGORITHM.md §1), per layer and sequence:
//! `2 * head_dim * bytes * (n_retrieval * T + n_streaming * min(T, sink + recent))`.

use crate::error::{CoreError, Result};
use crate::pattern::HeadPattern;
use serde::Serialize;

/// The cache kind of one KV head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    /// Full KV cache: attends to every earlier token.
    Retrieval,
    /// Attention sinks plus a recent window: constant-size cache.
    Streaming,
}

/// The streaming window: the first `sink` tokens and the last `recent` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Window {
    /// Attention-sink tokens kept from the start of the sequence.
    pub sink: usize,
    /// Most recent tokens kept (the current token included).
    pub recent: usize,
}

impl Window {
    /// Checks the window is usable (`recent >= 1`).
    pub fn new(sink: usize, recent: usize) -> Result<Self> {
        if recent == 0 {
            return Err(CoreError::InvalidSetting { name: "recent", value: "0".into(), expected: "at least 1" });
        }
        Ok(Self { sink, recent })
    }

    /// Entries a streaming head holds once the sequence is long.
    pub fn capacity(&self) -> usize {
        self.sink + self.recent
    }

    /// Whether a streaming head's query at position `i` sees the key at position `j`: the Λ
    /// rule, [`lambda_sees`].
    pub fn sees(&self, i: usize, j: usize) -> bool {
        lambda_sees(self.sink, self.recent, i, j)
    }
}

/// The Λ visibility rule of streaming heads (ALGORITHM.md §1), written once for every
/// implementation (CPU kernels, GPU kernels' references, identification): the query at `i`
/// sees the key at `j` when it is not in the future and is one of the first `sink` tokens
/// or among the `recent` most recent (the query itself included).
#[inline]
pub fn lambda_sees(sink: usize, recent: usize, i: usize, j: usize) -> bool {
    j <= i && (j < sink || i - j < recent)
}

/// What one layer's cache holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerCacheSpec {
    /// Kind of each KV head, in head order.
    pub kinds: Vec<HeadKind>,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Bits per stored element (32 for f32, 16 for f16/bf16, 8 for fp8/int8, 4 for int4).
    pub bits_per_element: usize,
    /// Bytes of scales per cached row (one position of one head, keys or values): 4 for a
    /// quantised cache's row scale word, else 0.
    pub scale_bytes_per_row: usize,
    /// The streaming heads' own bits per element (`--kv-dtype-streaming`; else the same).
    pub streaming_bits_per_element: usize,
    /// The streaming heads' scale bytes per row, likewise.
    pub streaming_scale_bytes_per_row: usize,
    /// The streaming window.
    pub window: Window,
}

impl LayerCacheSpec {
    /// Retrieval KV heads in this layer.
    pub fn n_retrieval(&self) -> usize {
        self.kinds.iter().filter(|k| **k == HeadKind::Retrieval).count()
    }

    /// Streaming KV heads in this layer.
    pub fn n_streaming(&self) -> usize {
        self.kinds.len() - self.n_retrieval()
    }

    /// Bytes of keys plus values for one retrieval head holding `entries` tokens.
    pub fn bytes_per_head(&self, entries: usize) -> usize {
        2 * (self.head_dim * self.bits_per_element / 8 + self.scale_bytes_per_row) * entries
    }

    /// Bytes of keys plus values for one streaming head holding `entries` tokens.
    pub fn bytes_per_streaming_head(&self, entries: usize) -> usize {
        2 * (self.head_dim * self.streaming_bits_per_element / 8 + self.streaming_scale_bytes_per_row) * entries
    }

    /// Whether streaming heads store another element type than retrieval heads.
    pub fn streaming_differs(&self) -> bool {
        (self.streaming_bits_per_element, self.streaming_scale_bytes_per_row) != (self.bits_per_element, self.scale_bytes_per_row)
    }

    /// Bytes held by the retrieval heads after `tokens` tokens.
    pub fn retrieval_bytes(&self, tokens: usize) -> usize {
        self.n_retrieval() * self.bytes_per_head(tokens)
    }

    /// Bytes held by the streaming heads after `tokens` tokens.
    pub fn streaming_bytes(&self, tokens: usize) -> usize {
        self.n_streaming() * self.bytes_per_streaming_head(tokens.min(self.window.capacity()))
    }
}

/// The cache specs of a whole model: one per layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CachePlan {
    /// One spec per layer.
    pub layers: Vec<LayerCacheSpec>,
}

impl CachePlan {
    /// Builds the plan for a head pattern whose cache stores elements of `bytes_per_element`.
    pub fn new(pattern: &HeadPattern, head_dim: usize, bytes_per_element: usize, window: Window) -> Self {
        Self::with_bits(pattern, head_dim, 8 * bytes_per_element, window)
    }

    /// Builds the plan for elements of `bits_per_element` (int4: 4).
    pub fn with_bits(pattern: &HeadPattern, head_dim: usize, bits_per_element: usize, window: Window) -> Self {
        let layers = (0..pattern.n_layers())
            .map(|l| LayerCacheSpec {
                kinds: pattern
                    .layer(l)
                    .iter()
                    .map(|&r| if r { HeadKind::Retrieval } else { HeadKind::Streaming })
                    .collect(),
                head_dim,
                bits_per_element,
                scale_bytes_per_row: 0,
                streaming_bits_per_element: bits_per_element,
                streaming_scale_bytes_per_row: 0,
                window,
            })
            .collect();
        Self { layers }
    }

    /// The same plan for a cache that also keeps `bytes` of scales per row (fp8, int8,
    /// int4: 4).
    pub fn with_row_scales(mut self, bytes: usize) -> Self {
        for l in &mut self.layers {
            l.scale_bytes_per_row = bytes;
            l.streaming_scale_bytes_per_row = bytes;
        }
        self
    }

    /// The same plan with the streaming heads in elements of `bits` and `scale_bytes` per row
    /// (`--kv-dtype-streaming`: their window is small, so an exact one costs little).
    pub fn with_streaming(mut self, bits: usize, scale_bytes: usize) -> Self {
        for l in &mut self.layers {
            l.streaming_bits_per_element = bits;
            l.streaming_scale_bytes_per_row = scale_bytes;
        }
        self
    }

    /// Bytes held by retrieval heads over all layers after `tokens` tokens.
    pub fn retrieval_bytes(&self, tokens: usize) -> usize {
        self.layers.iter().map(|l| l.retrieval_bytes(tokens)).sum()
    }

    /// Bytes held by streaming heads over all layers after `tokens` tokens.
    pub fn streaming_bytes(&self, tokens: usize) -> usize {
        self.layers.iter().map(|l| l.streaming_bytes(tokens)).sum()
    }

    /// Total KV bytes after `tokens` tokens.
    pub fn total_bytes(&self, tokens: usize) -> usize {
        self.retrieval_bytes(tokens) + self.streaming_bytes(tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_matches_the_paper_and_streaming_saturates() {
        let pattern = HeadPattern::from_rows(vec![vec![true, false, false], vec![false, false, false]]).unwrap();
        let plan = CachePlan::new(&pattern, 64, 4, Window::new(64, 256).unwrap());
        // 1 retrieval head, 5 streaming heads, f32.
        assert_eq!(plan.retrieval_bytes(1000), 2 * 64 * 4 * 1000);
        assert_eq!(plan.streaming_bytes(1000), 5 * 2 * 64 * 4 * 320);
        assert_eq!(plan.streaming_bytes(100), 5 * 2 * 64 * 4 * 100);
        assert_eq!(plan.streaming_bytes(8192), plan.streaming_bytes(320));
        assert_eq!(plan.total_bytes(10), 6 * 2 * 64 * 4 * 10);
        assert!(Window::new(4, 0).is_err());
        // Λ: sinks 0..2 and the 3 most recent, never the future.
        let w = Window::new(2, 3).unwrap();
        let seen: Vec<usize> = (0..10).filter(|&j| w.sees(7, j)).collect();
        assert_eq!(seen, vec![0, 1, 5, 6, 7]);
        assert!(!w.sees(3, 4) && w.sees(0, 0));
    }

    #[test]
    fn a_byte_cache_counts_its_row_scales() {
        // fp8/int8: one byte per element and a 4-byte scale per row (keys and values each).
        let pattern = HeadPattern::from_rows(vec![vec![true, false]]).unwrap();
        let plan = CachePlan::new(&pattern, 128, 1, Window::new(64, 256).unwrap()).with_row_scales(4);
        assert_eq!(plan.retrieval_bytes(1000), 2 * (128 + 4) * 1000);
        assert_eq!(plan.streaming_bytes(1000), 2 * (128 + 4) * 320);
        let bf16 = CachePlan::new(&pattern, 128, 2, Window::new(64, 256).unwrap());
        assert!(plan.total_bytes(100_000) < bf16.total_bytes(100_000) * 53 / 100, "about half of bf16, scales included");
        // int4: half a byte per element and a 4-byte step and minimum per row.
        let int4 = CachePlan::with_bits(&pattern, 128, 4, Window::new(64, 256).unwrap()).with_row_scales(4);
        assert_eq!(int4.retrieval_bytes(1000), 2 * (64 + 4) * 1000);
        assert_eq!(int4.streaming_bytes(100), 2 * (64 + 4) * 100);
    }
}
