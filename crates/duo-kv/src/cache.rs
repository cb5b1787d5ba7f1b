//! The two per-head caches, over `f32`, `f16` or `i8` elements ([`KvElem`]): keys and values
//! arrive as `f32` and are rounded once, when cached (`i8` rows with a scale each, kept beside
//! the rows: empty for the other types).

use duo_core::cache_spec::Window;
use duo_kernels::attention::KvElem;

/// A full cache: every token's key and value, in position order.
#[derive(Debug, Clone, Default)]
pub struct RetrievalHead<E: KvElem = f32> {
    head_dim: usize,
    /// Keys, `[len, head_dim]`.
    pub keys: Vec<E>,
    /// Values, `[len, head_dim]`.
    pub values: Vec<E>,
    /// Each key row's scale (row-scaled elements only, else empty).
    pub key_scales: Vec<f32>,
    /// Each value row's scale, likewise.
    pub value_scales: Vec<f32>,
}

impl<E: KvElem> RetrievalHead<E> {
    /// An empty cache for heads of `head_dim`.
    pub fn new(head_dim: usize) -> Self {
        Self { head_dim, keys: Vec::new(), values: Vec::new(), key_scales: Vec::new(), value_scales: Vec::new() }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.keys.len() / self.head_dim
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Appends one token.
    pub fn append(&mut self, key: &[f32], value: &[f32]) {
        let ks = E::encode_row(&key[..self.head_dim], &mut self.keys);
        let vs = E::encode_row(&value[..self.head_dim], &mut self.values);
        if E::ROW_SCALED {
            self.key_scales.push(ks);
            self.value_scales.push(vs);
        }
    }

    /// Makes the capacity at least `tokens` tokens in total, in one exact allocation.
    pub fn reserve_total(&mut self, tokens: usize) {
        let want = tokens * self.head_dim;
        self.keys.reserve_exact(want.saturating_sub(self.keys.len()));
        self.values.reserve_exact(want.saturating_sub(self.values.len()));
        if E::ROW_SCALED {
            self.key_scales.reserve_exact(tokens.saturating_sub(self.key_scales.len()));
            self.value_scales.reserve_exact(tokens.saturating_sub(self.value_scales.len()));
        }
    }

    /// Capacity in tokens (allocated, not necessarily filled).
    pub fn capacity(&self) -> usize {
        self.keys.capacity() / self.head_dim
    }

    /// Reserves room for `tokens` more tokens (amortised: capacity at least doubles).
    pub fn reserve(&mut self, tokens: usize) {
        self.keys.reserve(tokens * self.head_dim);
        self.values.reserve(tokens * self.head_dim);
        if E::ROW_SCALED {
            self.key_scales.reserve(tokens);
            self.value_scales.reserve(tokens);
        }
    }
}

/// A constant-size cache: the first `sink` tokens, then a ring of the last `recent`.
#[derive(Debug, Clone)]
pub struct StreamingHead<E: KvElem = f32> {
    head_dim: usize,
    window: Window,
    /// Sink keys, `[<= sink, head_dim]`, positions `0..`.
    pub sink_keys: Vec<E>,
    /// Sink values.
    pub sink_values: Vec<E>,
    /// Ring keys, `[<= recent, head_dim]`, in slot order.
    pub ring_keys: Vec<E>,
    /// Ring values.
    pub ring_values: Vec<E>,
    /// Absolute position held in each ring slot.
    pub ring_positions: Vec<usize>,
    /// Row scales (row-scaled elements only, else empty): sink keys, sink values, ring keys,
    /// ring values, row by row as the rows above.
    pub sink_key_scales: Vec<f32>,
    /// See `sink_key_scales`.
    pub sink_value_scales: Vec<f32>,
    /// See `sink_key_scales`.
    pub ring_key_scales: Vec<f32>,
    /// See `sink_key_scales`.
    pub ring_value_scales: Vec<f32>,
    /// Slot the next token overwrites once the ring is full.
    next_slot: usize,
}

impl<E: KvElem> StreamingHead<E> {
    /// An empty cache.
    pub fn new(head_dim: usize, window: Window) -> Self {
        Self {
            head_dim,
            window,
            sink_keys: Vec::with_capacity(window.sink * head_dim),
            sink_values: Vec::with_capacity(window.sink * head_dim),
            ring_keys: Vec::with_capacity(window.recent * head_dim),
            ring_values: Vec::with_capacity(window.recent * head_dim),
            ring_positions: Vec::with_capacity(window.recent),
            sink_key_scales: Vec::new(),
            sink_value_scales: Vec::new(),
            ring_key_scales: Vec::new(),
            ring_value_scales: Vec::new(),
            next_slot: 0,
        }
    }

    /// An empty cache that allocates nothing until it is appended to (a head whose rows
    /// another set of heads holds, `--kv-dtype-streaming`).
    pub fn unallocated(head_dim: usize, window: Window) -> Self {
        Self {
            head_dim,
            window,
            sink_keys: Vec::new(),
            sink_values: Vec::new(),
            ring_keys: Vec::new(),
            ring_values: Vec::new(),
            ring_positions: Vec::new(),
            sink_key_scales: Vec::new(),
            sink_value_scales: Vec::new(),
            ring_key_scales: Vec::new(),
            ring_value_scales: Vec::new(),
            next_slot: 0,
        }
    }

    /// Tokens held (sinks plus ring).
    pub fn len(&self) -> usize {
        self.sink_len() + self.ring_positions.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sink tokens held.
    pub fn sink_len(&self) -> usize {
        self.sink_keys.len() / self.head_dim
    }

    /// Appends the token at `position`: into the sinks while they are not full, else
    /// into the ring, overwriting its oldest slot once it holds `recent` tokens.
    pub fn append(&mut self, key: &[f32], value: &[f32], position: usize) {
        let hd = self.head_dim;
        let (key, value) = (&key[..hd], &value[..hd]);
        let scaled = E::ROW_SCALED;
        if self.sink_len() < self.window.sink {
            let (ks, vs) = (E::encode_row(key, &mut self.sink_keys), E::encode_row(value, &mut self.sink_values));
            if scaled {
                self.sink_key_scales.push(ks);
                self.sink_value_scales.push(vs);
            }
        } else if self.ring_positions.len() < self.window.recent {
            let (ks, vs) = (E::encode_row(key, &mut self.ring_keys), E::encode_row(value, &mut self.ring_values));
            if scaled {
                self.ring_key_scales.push(ks);
                self.ring_value_scales.push(vs);
            }
            self.ring_positions.push(position);
        } else {
            let s = self.next_slot;
            let ks = E::encode_into(key, &mut self.ring_keys[s * hd..(s + 1) * hd]);
            let vs = E::encode_into(value, &mut self.ring_values[s * hd..(s + 1) * hd]);
            if scaled {
                self.ring_key_scales[s] = ks;
                self.ring_value_scales[s] = vs;
            }
            self.ring_positions[s] = position;
            self.next_slot = (s + 1) % self.window.recent;
        }
    }

    /// Positions held, sinks first, then the ring from oldest to newest.
    pub fn positions_in_order(&self) -> Vec<usize> {
        let mut out: Vec<usize> = (0..self.sink_len()).collect();
        let n = self.ring_positions.len();
        let oldest = if n < self.window.recent { 0 } else { self.next_slot };
        out.extend((0..n).map(|k| self.ring_positions[(oldest + k) % n]));
        out
    }
}

/// One KV head's cache, of either kind.
#[derive(Debug, Clone)]
pub enum HeadCache<E: KvElem = f32> {
    /// Full cache.
    Retrieval(RetrievalHead<E>),
    /// Sink + ring.
    Streaming(StreamingHead<E>),
}

impl<E: KvElem> HeadCache<E> {
    /// Tokens held.
    pub fn len(&self) -> usize {
        match self {
            HeadCache::Retrieval(h) => h.len(),
            HeadCache::Streaming(h) => h.len(),
        }
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(p: usize) -> [f32; 2] {
        [p as f32, -(p as f32)]
    }

    #[test]
    fn ring_contents_after_each_append() {
        // sink 2, recent 3: the buffer contents spelled out after every token.
        let mut h: StreamingHead = StreamingHead::new(2, Window::new(2, 3).unwrap());
        let expected: [(&[usize], &[usize], &[f32]); 8] = [
            // (positions in order, ring slots' positions, ring keys' first column by slot)
            (&[0], &[], &[]),
            (&[0, 1], &[], &[]),
            (&[0, 1, 2], &[2], &[2.0]),
            (&[0, 1, 2, 3], &[2, 3], &[2.0, 3.0]),
            (&[0, 1, 2, 3, 4], &[2, 3, 4], &[2.0, 3.0, 4.0]),
            (&[0, 1, 3, 4, 5], &[5, 3, 4], &[5.0, 3.0, 4.0]),
            (&[0, 1, 4, 5, 6], &[5, 6, 4], &[5.0, 6.0, 4.0]),
            (&[0, 1, 5, 6, 7], &[5, 6, 7], &[5.0, 6.0, 7.0]),
        ];
        for (p, (order, slots, ring_first)) in expected.iter().enumerate() {
            h.append(&row(p), &row(p + 100), p);
            assert_eq!(h.positions_in_order(), *order, "after position {p}");
            assert_eq!(h.ring_positions, *slots, "slots after position {p}");
            let firsts: Vec<f32> = h.ring_keys.chunks(2).map(|r| r[0]).collect();
            assert_eq!(firsts, *ring_first, "ring keys after position {p}");
            let vfirsts: Vec<f32> = h.ring_values.chunks(2).map(|r| r[0] - 100.0).collect();
            assert_eq!(vfirsts, *ring_first, "ring values after position {p}");
            assert!(h.len() <= 5);
        }
        assert_eq!(h.sink_keys, vec![0.0, -0.0, 1.0, -1.0]);
    }

    #[test]
    fn zero_sink_is_a_pure_ring() {
        let mut h: StreamingHead = StreamingHead::new(2, Window::new(0, 2).unwrap());
        for p in 0..5 {
            h.append(&row(p), &row(p), p);
        }
        assert_eq!(h.positions_in_order(), vec![3, 4]);
        assert_eq!(h.sink_len(), 0);
    }

    #[test]
    fn reserve_total_allocates_once() {
        let mut h: RetrievalHead = RetrievalHead::new(2);
        h.reserve_total(10);
        let cap = h.capacity();
        assert!(cap >= 10);
        let ptr = h.keys.as_ptr();
        for p in 0..10 {
            h.append(&row(p), &row(p));
        }
        assert_eq!(h.keys.as_ptr(), ptr, "no reallocation within the reserved length");
        assert_eq!(h.capacity(), cap);
    }

    #[test]
    fn f16_heads_round_once_when_caching() {
        let mut h: RetrievalHead<half::f16> = RetrievalHead::new(2);
        h.append(&[1.0, 0.1], &[65504.0, -3.0e-8]);
        assert_eq!(h.keys, vec![half::f16::from_f32(1.0), half::f16::from_f32(0.1)]);
        assert_eq!(h.keys[1].to_f32(), 0.099_975_586, "0.1 to the nearest half");
        assert_eq!(h.values[0].to_f32(), 65504.0);
        let mut s: StreamingHead<half::f16> = StreamingHead::new(1, Window::new(1, 1).unwrap());
        for p in 0..3 {
            s.append(&[p as f32 + 0.25], &[-(p as f32)], p);
        }
        assert_eq!(s.sink_keys[0].to_f32(), 0.25);
        assert_eq!((s.ring_keys[0].to_f32(), s.ring_positions[0]), (2.25, 2));
    }

    #[test]
    fn int8_heads_keep_a_scale_per_row_beside_their_codes() {
        let mut h: RetrievalHead<i8> = RetrievalHead::new(2);
        h.append(&[1.27, -0.5], &[0.0, 0.0]);
        assert_eq!((h.keys.clone(), h.key_scales.clone()), (vec![127, -50], vec![0.01]));
        assert_eq!((h.values.clone(), h.value_scales.clone()), (vec![0, 0], vec![1.0]), "a row of zeros: scale 1");
        let mut s: StreamingHead<i8> = StreamingHead::new(1, Window::new(1, 2).unwrap());
        for p in 0..5 {
            s.append(&[p as f32 + 1.0], &[-(p as f32) - 1.0], p);
        }
        // Sink: position 0; ring slots after positions 3 and 4 overwrote 1 and 2.
        assert_eq!((s.sink_keys.clone(), s.sink_key_scales.clone()), (vec![127], vec![1.0 / 127.0]));
        assert_eq!(s.ring_positions, vec![3, 4]);
        assert_eq!(s.ring_key_scales, vec![4.0 / 127.0, 5.0 / 127.0]);
        assert_eq!((s.ring_values.clone(), s.ring_value_scales.clone()), (vec![-127, -127], vec![4.0 / 127.0, 5.0 / 127.0]));
    }

    #[test]
    fn retrieval_keeps_everything_in_order() {
        let mut h: RetrievalHead = RetrievalHead::new(2);
        for p in 0..4 {
            h.append(&row(p), &row(p));
        }
        assert_eq!(h.len(), 4);
        assert_eq!(h.keys, vec![0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0]);
    }
}
