//! A layer's caches and the hybrid attention over them; a sequence's layers.

use crate::cache::{HeadCache, RetrievalHead, StreamingHead};
use crate::sim::KvSim;
use duo_core::cache_spec::{CachePlan, HeadKind, LayerCacheSpec};
use duo_kernels::attention::{attend_heads, HeadJob, KeySegment, KvElem, Positions, QueryBlock, Visibility};
use half::f16;

/// How streaming heads see a prompt processed in chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefillMode {
    /// The Λ mask (`j < sink || i - j < recent`, causal) from the first token: a
    /// streaming head never holds more than `sink + recent + chunk` entries and its
    /// prefill work is linear in the length.
    #[default]
    Lambda,
    /// The DuoAttention reference: the first chunk is dense on every head; later chunks
    /// see the sinks and recent window of earlier chunks plus the whole current chunk.
    Reference,
}

impl std::str::FromStr for PrefillMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lambda" => Ok(Self::Lambda),
            "reference" => Ok(Self::Reference),
            _ => Err(format!("unknown prefill mode `{s}` (expected `lambda` or `reference`)")),
        }
    }
}

/// Bytes held by a cache, split by head kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvBytes {
    /// Held by retrieval heads.
    pub retrieval: usize,
    /// Held by streaming heads.
    pub streaming: usize,
}

impl KvBytes {
    /// Both kinds together.
    pub fn total(&self) -> usize {
        self.retrieval + self.streaming
    }
}

/// The caches of one layer, one per KV head.
#[derive(Debug, Clone)]
pub struct LayerKv {
    spec: LayerCacheSpec,
    /// Every head in the retrieval heads' element type (streaming heads too, unless they
    /// have their own, `streaming`).
    heads: LayerHeads,
    /// The streaming heads in their own element type (`--kv-dtype-streaming`), at their
    /// positions (the retrieval positions of this set, and the streaming ones of `heads`,
    /// are never used).
    streaming: Option<LayerHeads>,
    /// A simulated 4-bit cache's rounding ([`KvSim`]), if any.
    sim: Option<KvSim>,
}

/// A layer's heads in the element type its spec asks for: 4 bytes `f32`, 2 bytes `f16`, 1
/// byte `i8` (with a scale per row).
#[derive(Debug, Clone)]
enum LayerHeads {
    F32(Vec<HeadCache<f32>>),
    F16(Vec<HeadCache<f16>>),
    I8(Vec<HeadCache<i8>>),
}

/// Every head of `spec` (streaming heads that `holds_streaming` says another set holds
/// allocate nothing).
fn new_heads<E: KvElem>(spec: &LayerCacheSpec, holds_streaming: bool) -> Vec<HeadCache<E>> {
    spec.kinds
        .iter()
        .map(|k| match k {
            HeadKind::Retrieval => HeadCache::Retrieval(RetrievalHead::new(spec.head_dim)),
            HeadKind::Streaming if holds_streaming => HeadCache::Streaming(StreamingHead::new(spec.head_dim, spec.window)),
            HeadKind::Streaming => HeadCache::Streaming(StreamingHead::unallocated(spec.head_dim, spec.window)),
        })
        .collect()
}

/// Bytes held by the heads of `heads` of kind `only` (or all) under `spec`.
fn heads_bytes<E: KvElem>(spec: &LayerCacheSpec, heads: &[HeadCache<E>], only: Option<HeadKind>) -> KvBytes {
    let mut b = KvBytes::default();
    for h in heads {
        match h {
            HeadCache::Retrieval(_) if only != Some(HeadKind::Streaming) => b.retrieval += spec.bytes_per_head(h.len()),
            HeadCache::Streaming(_) if only != Some(HeadKind::Retrieval) => b.streaming += spec.bytes_per_streaming_head(h.len()),
            _ => {}
        }
    }
    b
}

/// Heads for `spec` in elements of `bits` (32 `f32`, 16 `f16`, 8 `i8` with a scale per row).
///
/// # Panics
/// On another element size (the plans of the CPU backend are 32, 16 or 8 bits).
fn layer_heads(spec: &LayerCacheSpec, bits: usize, holds_streaming: bool) -> LayerHeads {
    match bits {
        32 => LayerHeads::F32(new_heads(spec, holds_streaming)),
        16 => LayerHeads::F16(new_heads(spec, holds_streaming)),
        8 => LayerHeads::I8(new_heads(spec, holds_streaming)),
        b => panic!("a CPU cache holds 32-bit (f32), 16-bit (f16) or 8-bit (int8) elements, not {b}-bit ones"),
    }
}

impl LayerHeads {
    fn lens(&self) -> Vec<usize> {
        match self {
            LayerHeads::F32(h) => h.iter().map(HeadCache::len).collect(),
            LayerHeads::F16(h) => h.iter().map(HeadCache::len).collect(),
            LayerHeads::I8(h) => h.iter().map(HeadCache::len).collect(),
        }
    }

    fn bytes(&self, spec: &LayerCacheSpec, only: Option<HeadKind>) -> KvBytes {
        match self {
            LayerHeads::F32(h) => heads_bytes(spec, h, only),
            LayerHeads::F16(h) => heads_bytes(spec, h, only),
            LayerHeads::I8(h) => heads_bytes(spec, h, only),
        }
    }

    fn append(&mut self, spec: &LayerCacheSpec, k: &[f32], v: &[f32], first_position: usize, only: Option<HeadKind>) {
        match self {
            LayerHeads::F32(h) => append_chunk(spec, h, k, v, first_position, only),
            LayerHeads::F16(h) => append_chunk(spec, h, k, v, first_position, only),
            LayerHeads::I8(h) => append_chunk(spec, h, k, v, first_position, only),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attend(&mut self, spec: &LayerCacheSpec, q: &[f32], k: &[f32], v: &[f32], first_position: usize, n_heads: usize, mode: PrefillMode, sim: Option<KvSim>, only: Option<HeadKind>) -> Vec<f32> {
        match self {
            LayerHeads::F32(h) => attend_layer(spec, h, q, k, v, first_position, n_heads, mode, sim, only),
            LayerHeads::F16(h) => attend_layer(spec, h, q, k, v, first_position, n_heads, mode, sim, only),
            LayerHeads::I8(h) => attend_layer(spec, h, q, k, v, first_position, n_heads, mode, sim, only),
        }
    }
}

fn reserve_heads<E: KvElem>(heads: &mut [HeadCache<E>], tokens: usize) {
    for head in heads {
        if let HeadCache::Retrieval(h) = head {
            h.reserve_total(tokens);
        }
    }
}

impl LayerKv {
    /// Empty caches following `spec`: `f32` elements for 32 bits per element, `f16` for 16,
    /// `i8` rows with a scale each for 8.
    ///
    /// # Panics
    /// On another element size (the plans of the CPU backend are 32, 16 or 8 bits).
    pub fn new(spec: LayerCacheSpec) -> Self {
        // A second set only where this layer has streaming heads of another type.
        let split = spec.streaming_differs() && spec.n_streaming() > 0;
        let heads = layer_heads(&spec, spec.bits_per_element, !split);
        let streaming = split.then(|| layer_heads(&spec, spec.streaming_bits_per_element, true));
        Self { spec, heads, streaming, sim: None }
    }

    /// The spec this layer was built from.
    pub fn spec(&self) -> &LayerCacheSpec {
        &self.spec
    }

    /// Tokens held by each KV head.
    pub fn head_lens(&self) -> Vec<usize> {
        let main = self.heads.lens();
        match &self.streaming {
            None => main,
            Some(s) => main.into_iter().zip(s.lens()).zip(&self.spec.kinds).map(|((m, s), k)| if *k == HeadKind::Streaming { s } else { m }).collect(),
        }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> KvBytes {
        match &self.streaming {
            None => self.heads.bytes(&self.spec, None),
            Some(s) => {
                let (r, st) = (self.heads.bytes(&self.spec, Some(HeadKind::Retrieval)), s.bytes(&self.spec, Some(HeadKind::Streaming)));
                KvBytes { retrieval: r.retrieval, streaming: st.streaming }
            }
        }
    }

    fn reserve(&mut self, tokens: usize) {
        match &mut self.heads {
            LayerHeads::F32(h) => reserve_heads(h, tokens),
            LayerHeads::F16(h) => reserve_heads(h, tokens),
            LayerHeads::I8(h) => reserve_heads(h, tokens),
        }
    }

    /// Caches `n` tokens of seeded random keys and values at `first_position..` without
    /// attending (what a prefill would leave, for decode measurements at lengths whose prefill
    /// would take too long), in chunks of 1,024.
    pub fn fill_synthetic(&mut self, first_position: usize, n: usize, seed: u64) {
        let width = self.spec.kinds.len() * self.spec.head_dim;
        for start in (0..n).step_by(1024) {
            let t = 1024.min(n - start);
            let s = seed.wrapping_mul(0x2545_f491_4f6c_dd1d).wrapping_add(start as u64);
            let (k, v) = (synthetic_values(s, t * width), synthetic_values(!s, t * width));
            match &mut self.streaming {
                None => self.heads.append(&self.spec, &k, &v, first_position + start, None),
                Some(st) => {
                    self.heads.append(&self.spec, &k, &v, first_position + start, Some(HeadKind::Retrieval));
                    st.append(&self.spec, &k, &v, first_position + start, Some(HeadKind::Streaming));
                }
            }
        }
    }

    /// Hybrid attention for a chunk of `t` tokens at `first_position..`, then caches
    /// the chunk. `q` is `[t, n_heads * head_dim]` and `k`, `v` are
    /// `[t, n_kv_heads * head_dim]`, all after RoPE. Returns `[t, n_heads * head_dim]`.
    pub fn attend(&mut self, q: &[f32], k: &[f32], v: &[f32], first_position: usize, n_heads: usize, mode: PrefillMode) -> Vec<f32> {
        let rounded;
        let (k, v) = match self.sim {
            Some(sim) => {
                let retrieval: Vec<bool> = self.spec.kinds.iter().map(|k| *k == HeadKind::Retrieval).collect();
                let (mut k, mut v) = (k.to_vec(), v.to_vec());
                sim.round_chunk(&mut k, &mut v, &retrieval, self.spec.head_dim);
                rounded = (k, v);
                (&rounded.0[..], &rounded.1[..])
            }
            None => (k, v),
        };
        match &mut self.streaming {
            None => self.heads.attend(&self.spec, q, k, v, first_position, n_heads, mode, self.sim, None),
            Some(s) => {
                // Two passes over disjoint heads (each leaves the others' outputs zero); a
                // layer of streaming heads only (the layer layout) takes one.
                let mut out = s.attend(&self.spec, q, k, v, first_position, n_heads, mode, self.sim, Some(HeadKind::Streaming));
                if self.spec.n_retrieval() > 0 {
                    let r = self.heads.attend(&self.spec, q, k, v, first_position, n_heads, mode, self.sim, Some(HeadKind::Retrieval));
                    for (o, x) in out.iter_mut().zip(r) {
                        *o += x;
                    }
                }
                out
            }
        }
    }
}

/// [`LayerKv::attend`] over heads of element type `E` (only those of kind `only`, if given:
/// the others are neither attended, written nor appended to, and their outputs stay zero). A
/// streaming head's chunk segment is the chunk rounded to `E` too, so a query sees the chunk's
/// keys as later queries will see them from the cache.
#[allow(clippy::too_many_arguments)]
fn attend_layer<E: KvElem>(spec: &LayerCacheSpec, heads: &mut [HeadCache<E>], q: &[f32], k: &[f32], v: &[f32], first_position: usize, n_heads: usize, mode: PrefillMode, sim: Option<KvSim>, only: Option<HeadKind>) -> Vec<f32> {
    let take_retrieval = only != Some(HeadKind::Streaming);
    let take_streaming = only != Some(HeadKind::Retrieval);
    let hd = spec.head_dim;
    let n_kv = heads.len();
    let kv_stride = n_kv * hd;
    let q_stride = n_heads * hd;
    let t = k.len() / kv_stride;
    let group = n_heads / n_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    // Retrieval heads cache the chunk first and then attend causally over the cache.
    if take_retrieval {
        let before: Vec<usize> = heads.iter().map(HeadCache::len).collect();
        append_chunk(spec, heads, k, v, first_position, Some(HeadKind::Retrieval));
        for (head, before) in heads.iter_mut().zip(before) {
            let HeadCache::Retrieval(h) = head else { continue };
            // (Never an int8 cache: `duo eval` refuses simulating one, as it would round twice.)
            if let Some(sim) = sim.filter(|s| s.by_channels() && !E::ROW_SCALED) {
                // The blocks this append completed (or, lagged, the ones before them), rounded
                // as a per-channel scheme holds them.
                let from = (before / crate::sim::CHANNEL_BLOCK).saturating_sub(1) * crate::sim::CHANNEL_BLOCK;
                let mut keys: Vec<f32> = h.keys[from * hd..].iter().map(|e| e.to_f32()).collect();
                sim.round_blocks(&mut keys, before - from, hd);
                for (e, x) in h.keys[from * hd..].iter_mut().zip(keys) {
                    *e = E::from_f32(x);
                }
            }
        }
    }
    let window = spec.window;
    // The chunk as the cache will hold it (borrowed for f32), for streaming heads.
    let any_streaming = take_streaming && heads.iter().any(|h| matches!(h, HeadCache::Streaming(_)));
    let ((kc, kcs), (vc, vcs)) = if any_streaming { (chunk_as::<E>(k, t, n_kv, hd), chunk_as::<E>(v, t, n_kv, hd)) } else { (chunk_as::<E>(&[], 0, n_kv, hd), chunk_as::<E>(&[], 0, n_kv, hd)) };

    // A decode step (one position) attends once per KV head for all the query heads that
    // share it, so each cached key and value is read once for the group (each head's rows keep
    // the bits they get alone); a chunk attends once per query head over its positions.
    let grouped = t == 1 && group > 1;
    let mut job_ids = Vec::with_capacity(n_heads);
    let out_heads = {
        let mut jobs = Vec::with_capacity(n_heads);
        for job in 0..if grouped { n_kv } else { n_heads } {
            let g = if grouped { job } else { job / group };
            if !(if matches!(heads[g], HeadCache::Retrieval(_)) { take_retrieval } else { take_streaming }) {
                continue;
            }
            job_ids.push(job);
            let (g, queries) = if grouped {
                (job, QueryBlock { queries: &q[job * group * hd..(job + 1) * group * hd], row_stride: hd, first_position, shared_position: true })
            } else {
                (job / group, QueryBlock { queries: &q[job * hd..(t - 1) * q_stride + job * hd + hd], row_stride: q_stride, first_position, shared_position: false })
            };
            let (segments, visibility) = match &heads[g] {
                HeadCache::Retrieval(h) => (
                    vec![KeySegment { keys: &h.keys, values: &h.values, row_stride: hd, positions: Positions::Contiguous(0), cached: true, key_scales: &h.key_scales, value_scales: &h.value_scales }],
                    Visibility::Causal,
                ),
                HeadCache::Streaming(h) => {
                    let chunk = KeySegment {
                        keys: &kc[g * hd..(t - 1) * kv_stride + g * hd + hd],
                        values: &vc[g * hd..(t - 1) * kv_stride + g * hd + hd],
                        row_stride: kv_stride,
                        positions: Positions::Contiguous(first_position),
                        cached: false,
                        key_scales: head_scales(&kcs, g),
                        value_scales: head_scales(&vcs, g),
                    };
                    let sink = KeySegment { keys: &h.sink_keys, values: &h.sink_values, row_stride: hd, positions: Positions::Contiguous(0), cached: true, key_scales: &h.sink_key_scales, value_scales: &h.sink_value_scales };
                    let ring = KeySegment { keys: &h.ring_keys, values: &h.ring_values, row_stride: hd, positions: Positions::List(&h.ring_positions), cached: true, key_scales: &h.ring_key_scales, value_scales: &h.ring_value_scales };
                    let vis = match mode {
                        PrefillMode::Lambda => Visibility::Lambda { sink: window.sink, recent: window.recent },
                        PrefillMode::Reference => Visibility::CachedAndCausal,
                    };
                    (vec![sink, ring, chunk], vis)
                }
            };
            jobs.push(HeadJob { queries, segments, visibility });
        }
        attend_heads(&jobs, hd, scale)
    };
    // Streaming heads cache the chunk after attending (they may drop part of it).
    if take_streaming {
        append_chunk(spec, heads, k, v, first_position, Some(HeadKind::Streaming));
    }
    let mut out = vec![0.0f32; t * q_stride];
    if grouped {
        // One position: job g's rows are query heads g * group.. in order.
        for (&g, o) in job_ids.iter().zip(&out_heads) {
            out[g * group * hd..][..group * hd].copy_from_slice(o);
        }
    } else {
        for (&qh, o) in job_ids.iter().zip(&out_heads) {
            for r in 0..t {
                out[r * q_stride + qh * hd..][..hd].copy_from_slice(&o[r * hd..][..hd]);
            }
        }
    }
    out
    }

/// Appends a chunk's keys and values (`[t, n_kv * head_dim]`, at `first_position..`) to the
/// heads of kind `only` (or all), without attending: what [`attend_layer`] caches.
fn append_chunk<E: KvElem>(spec: &LayerCacheSpec, heads: &mut [HeadCache<E>], k: &[f32], v: &[f32], first_position: usize, only: Option<HeadKind>) {
    let hd = spec.head_dim;
    let kv_stride = heads.len() * hd;
    let t = k.len() / kv_stride;
    for (g, head) in heads.iter_mut().enumerate() {
        match head {
            HeadCache::Retrieval(h) if only != Some(HeadKind::Streaming) => {
                h.reserve(t);
                for r in 0..t {
                    h.append(&k[r * kv_stride + g * hd..], &v[r * kv_stride + g * hd..]);
                }
            }
            HeadCache::Streaming(h) if only != Some(HeadKind::Retrieval) => {
                for r in 0..t {
                    h.append(&k[r * kv_stride + g * hd..], &v[r * kv_stride + g * hd..], first_position + r);
                }
            }
            _ => {}
        }
    }
}

/// Seeded pseudo-random values in [-1, 1) (splitmix64): synthetic keys and values.
fn synthetic_values(seed: u64, count: usize) -> Vec<f32> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Head `g`'s row scales of [`chunk_as`]'s (none for elements without).
fn head_scales(s: &[Vec<f32>], g: usize) -> &[f32] {
    s.get(g).map_or(&[], |x| x.as_slice())
}

/// `x` (`t` rows of `n_kv` heads of `hd`) as a cache of `E` holds it: its elements (borrowed
/// for `f32`) and, for row-scaled elements, each head's row scales (`[n_kv][t]`; else none).
fn chunk_as<E: KvElem>(x: &[f32], t: usize, n_kv: usize, hd: usize) -> (std::borrow::Cow<'_, [E]>, Vec<Vec<f32>>) {
    if !E::ROW_SCALED {
        return (E::from_f32_slice(x), Vec::new());
    }
    let mut codes = Vec::with_capacity(x.len());
    let mut scales = vec![Vec::with_capacity(t); n_kv];
    for r in 0..t {
        for (g, s) in scales.iter_mut().enumerate() {
            s.push(E::encode_row(&x[(r * n_kv + g) * hd..][..hd], &mut codes));
        }
    }
    (std::borrow::Cow::Owned(codes), scales)
}

/// The caches of one sequence: one [`LayerKv`] per layer, plus bookkeeping.
#[derive(Debug, Clone)]
pub struct SequenceKv {
    layers: Vec<LayerKv>,
    tokens: usize,
    peak: KvBytes,
    mode: PrefillMode,
}

impl SequenceKv {
    /// Empty caches for a plan.
    pub fn new(plan: &CachePlan, mode: PrefillMode) -> Self {
        Self { layers: plan.layers.iter().cloned().map(LayerKv::new).collect(), tokens: 0, peak: KvBytes::default(), mode }
    }

    /// The same caches rounding what they hold as the 4-bit scheme `sim` would
    /// ([`KvSim`]; `None`: exact).
    pub fn with_sim(mut self, sim: Option<KvSim>) -> Self {
        for l in &mut self.layers {
            l.sim = sim;
        }
        self
    }

    /// Tokens processed so far (the next token's position).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The prefill mode.
    pub fn mode(&self) -> PrefillMode {
        self.mode
    }

    /// One layer's caches.
    pub fn layer_mut(&mut self, l: usize) -> &mut LayerKv {
        &mut self.layers[l]
    }

    /// The layers.
    pub fn layers(&self) -> &[LayerKv] {
        &self.layers
    }

    /// Reserves room for `tokens` tokens in every retrieval cache at once, so a sequence
    /// whose length is known up front allocates its KV memory once.
    pub fn reserve(&mut self, tokens: usize) {
        for layer in &mut self.layers {
            layer.reserve(tokens);
        }
    }

    /// Pretends `n` more tokens were prefilled: every layer caches seeded random keys and
    /// values for them ([`LayerKv::fill_synthetic`]), and the count advances.
    pub fn fill_synthetic(&mut self, n: usize, seed: u64) {
        let first = self.tokens;
        for (l, layer) in self.layers.iter_mut().enumerate() {
            layer.reserve(first + n);
            layer.fill_synthetic(first, n, seed ^ (l as u64) << 32);
        }
        self.advance(n);
    }

    /// Records that a chunk of `t` tokens went through every layer.
    pub fn advance(&mut self, t: usize) {
        self.tokens += t;
        let now = self.bytes();
        self.peak.retrieval = self.peak.retrieval.max(now.retrieval);
        self.peak.streaming = self.peak.streaming.max(now.streaming);
    }

    /// Bytes held now.
    pub fn bytes(&self) -> KvBytes {
        self.layers.iter().map(LayerKv::bytes).fold(KvBytes::default(), |a, b| KvBytes {
            retrieval: a.retrieval + b.retrieval,
            streaming: a.streaming + b.streaming,
        })
    }

    /// The most bytes held after any chunk.
    pub fn peak_bytes(&self) -> KvBytes {
        self.peak
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duo_core::cache_spec::Window;
    use duo_core::pattern::HeadPattern;
    use duo_kernels::attention::reference_attention;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, rng: &mut impl Rng) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect()
    }

    /// Dense attention of the whole sequence with an explicit mask per KV head kind:
    /// what the chunked, cached computation must reproduce.
    fn dense_oracle(q: &[f32], k: &[f32], v: &[f32], n_heads: usize, kinds: &[HeadKind], hd: usize, mask: &dyn Fn(HeadKind, usize, usize) -> bool) -> Vec<f32> {
        let n_kv = kinds.len();
        let t = k.len() / (n_kv * hd);
        let mut out = vec![0.0; t * n_heads * hd];
        for qh in 0..n_heads {
            let g = qh / (n_heads / n_kv);
            for i in 0..t {
                // Build the visible rows explicitly and run the f64 oracle on them.
                let rows: Vec<usize> = (0..t).filter(|&j| mask(kinds[g], i, j)).collect();
                let kk: Vec<f32> = rows.iter().flat_map(|&j| k[j * n_kv * hd + g * hd..][..hd].to_vec()).collect();
                let vv: Vec<f32> = rows.iter().flat_map(|&j| v[j * n_kv * hd + g * hd..][..hd].to_vec()).collect();
                let pos: Vec<usize> = rows.clone();
                let seg = KeySegment { keys: &kk, values: &vv, row_stride: hd, positions: Positions::List(&pos), cached: true, key_scales: &[], value_scales: &[] };
                let qb = QueryBlock { queries: &q[i * n_heads * hd + qh * hd..][..hd], row_stride: hd, first_position: i, shared_position: false };
                let mut o = vec![0.0; hd];
                reference_attention(qb, &[seg], Visibility::CachedAndCausal, hd, 1.0 / (hd as f32).sqrt(), &mut o, hd);
                out[i * n_heads * hd + qh * hd..][..hd].copy_from_slice(&o);
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn run_chunked(pattern: &HeadPattern, window: Window, mode: PrefillMode, chunk: usize, q: &[f32], k: &[f32], v: &[f32], n_heads: usize, hd: usize) -> (Vec<f32>, SequenceKv) {
        run_chunked_bytes(pattern, window, mode, chunk, q, k, v, n_heads, hd, 4)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_chunked_bytes(pattern: &HeadPattern, window: Window, mode: PrefillMode, chunk: usize, q: &[f32], k: &[f32], v: &[f32], n_heads: usize, hd: usize, bytes: usize) -> (Vec<f32>, SequenceKv) {
        run_chunked_plan(&CachePlan::new(pattern, hd, bytes, window), mode, chunk, q, k, v, n_heads, hd)
    }

    fn run_chunked_plan(plan: &CachePlan, mode: PrefillMode, chunk: usize, q: &[f32], k: &[f32], v: &[f32], n_heads: usize, hd: usize) -> (Vec<f32>, SequenceKv) {
        let mut seq = SequenceKv::new(plan, mode);
        let n_kv = plan.layers[0].kinds.len();
        let t = k.len() / (n_kv * hd);
        let mut out = Vec::new();
        let mut s = 0;
        while s < t {
            let e = (s + chunk).min(t);
            let o = seq.layer_mut(0).attend(&q[s * n_heads * hd..e * n_heads * hd], &k[s * n_kv * hd..e * n_kv * hd], &v[s * n_kv * hd..e * n_kv * hd], s, n_heads, mode);
            seq.advance(e - s);
            out.extend(o);
            s = e;
        }
        (out, seq)
    }

    fn rel(a: &[f32], b: &[f32]) -> f32 {
        let n: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>().sqrt();
        n / b.iter().map(|y| y * y).sum::<f32>().sqrt()
    }

    #[test]
    fn chunked_hybrid_attention_equals_dense_masked_attention() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let hd = 16;
        let window = Window::new(3, 11).unwrap();
        // (query heads, kv heads): MHA, GQA 2:1, GQA 3:1.
        for &(n_heads, n_kv) in &[(2usize, 2usize), (4, 2), (6, 2)] {
            let pattern = HeadPattern::from_rows(vec![(0..n_kv).map(|g| g % 2 == 0).collect()]).unwrap();
            let kinds: Vec<HeadKind> = pattern.layer(0).iter().map(|&r| if r { HeadKind::Retrieval } else { HeadKind::Streaming }).collect();
            for &t in &[1usize, 13, 47, 101] {
                let q = random(t * n_heads * hd, &mut rng);
                let k = random(t * n_kv * hd, &mut rng);
                let v = random(t * n_kv * hd, &mut rng);
                let lambda = |kind: HeadKind, i: usize, j: usize| j <= i && (kind == HeadKind::Retrieval || j < 3 || i - j < 11);
                let want = dense_oracle(&q, &k, &v, n_heads, &kinds, hd, &lambda);
                for &chunk in &[1usize, 7, 16, 1000] {
                    let (got, seq) = run_chunked(&pattern, window, PrefillMode::Lambda, chunk, &q, &k, &v, n_heads, hd);
                    assert!(rel(&got, &want) < 1e-5, "lambda heads={n_heads}/{n_kv} t={t} chunk={chunk}");
                    let b = seq.bytes();
                    assert_eq!(b.retrieval, (n_kv / 2) * 2 * hd * 4 * t);
                    assert_eq!(b.streaming, (n_kv - n_kv / 2) * 2 * hd * 4 * t.min(14));
                    // Reference mode: a chunk sees all cached sink+recent entries and itself causally.
                    let (got_ref, _) = run_chunked(&pattern, window, PrefillMode::Reference, chunk, &q, &k, &v, n_heads, hd);
                    let reference = |kind: HeadKind, i: usize, j: usize| {
                        if kind == HeadKind::Retrieval || j > i { return j <= i; }
                        let chunk_start = i / chunk * chunk;
                        j >= chunk_start || j < 3 || chunk_start - j <= 11
                    };
                    let want_ref = dense_oracle(&q, &k, &v, n_heads, &kinds, hd, &reference);
                    assert!(rel(&got_ref, &want_ref) < 1e-5, "reference heads={n_heads}/{n_kv} t={t} chunk={chunk}");
                }
            }
        }
    }

    /// One retrieval and one streaming KV head (pattern, kinds, window 3 + 11) and `t` random
    /// tokens of heads of `hd`: queries of `n_heads` heads, then keys and values of the two.
    struct TwoKinds {
        pattern: HeadPattern,
        kinds: [HeadKind; 2],
        window: Window,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
    }

    fn two_kinds(hd: usize, t: usize, n_heads: usize, rng: &mut impl Rng) -> TwoKinds {
        let q = random(t * n_heads * hd, rng);
        let (k, v) = (random(t * 2 * hd, rng), random(t * 2 * hd, rng));
        TwoKinds {
            pattern: HeadPattern::from_rows(vec![vec![true, false]]).unwrap(),
            kinds: [HeadKind::Retrieval, HeadKind::Streaming],
            window: Window::new(3, 11).unwrap(),
            q,
            k,
            v,
        }
    }

    /// What query `i` of a head of `kind` sees of key `j` in [`two_kinds`]'s layer.
    fn two_kinds_visible(kind: HeadKind, i: usize, j: usize) -> bool {
        j <= i && (kind == HeadKind::Retrieval || j < 3 || i - j < 11)
    }

    /// One retrieval and one streaming KV head (GQA 3:1, window 3 + 11) over `t` random tokens
    /// of heads of `hd`, through a cache of `plan`, in decode steps (chunk 1, the ring
    /// overwritten), chunks of 16 and one chunk: each run's output against the dense oracle
    /// over keys and values as `round` holds them, then `check(chunk, sequence, output, the
    /// f32 cache's output)`.
    fn rounded_cache_case(hd: usize, t: usize, seed: u64, plan: impl Fn(&HeadPattern, Window) -> CachePlan, round: impl Fn(Vec<f32>) -> Vec<f32>, check: impl Fn(usize, &SequenceKv, &[f32], &[f32])) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n_heads = 6usize;
        let TwoKinds { pattern, kinds, window, q, k, v } = two_kinds(hd, t, n_heads, &mut rng);
        let lambda = two_kinds_visible;
        let want = dense_oracle(&q, &round(k.clone()), &round(v.clone()), n_heads, &kinds, hd, &lambda);
        let plan = plan(&pattern, window);
        for chunk in [1usize, 16, 1000] {
            let (got, seq) = run_chunked_plan(&plan, PrefillMode::Lambda, chunk, &q, &k, &v, n_heads, hd);
            assert!(rel(&got, &want) < 1e-5, "hd {hd} chunk {chunk}: {}", rel(&got, &want));
            let (f32_out, _) = run_chunked(&pattern, window, PrefillMode::Lambda, chunk, &q, &k, &v, n_heads, hd);
            check(chunk, &seq, &got, &f32_out);
        }
    }

    #[test]
    fn int8_caches_attend_over_their_rounded_rows_and_hold_a_quarter_of_the_bytes_and_a_scale() {
        // Heads of 64 (register tiles in prefill) and 16.
        for (hd, t) in [(64usize, 150usize), (16, 47)] {
            let round = |mut x: Vec<f32>| -> Vec<f32> {
                x.chunks_mut(hd).for_each(duo_kernels::kv8::round_row);
                x
            };
            let plan = |p: &HeadPattern, w: Window| CachePlan::with_bits(p, hd, 8, w).with_row_scales(4);
            rounded_cache_case(hd, t, 9, plan, round, |_, seq, got, f32_out| {
                let b = seq.bytes();
                assert_eq!((b.retrieval, b.streaming), (2 * (hd + 4) * t, 2 * (hd + 4) * t.min(14)), "a byte per element and a 4-byte scale per row");
                // What the heads hold: codes and a scale per row, nothing else.
                let LayerHeads::I8(heads) = &seq.layers()[0].heads else { panic!("an int8 plan makes i8 heads") };
                match (&heads[0], &heads[1]) {
                    (HeadCache::Retrieval(r), HeadCache::Streaming(s)) => {
                        assert_eq!((r.keys.len(), r.values.len(), r.key_scales.len(), r.value_scales.len()), (t * hd, t * hd, t, t));
                        let held = s.len();
                        assert_eq!(held, t.min(14));
                        assert_eq!(s.sink_keys.len() + s.ring_keys.len(), held * hd);
                        assert_eq!((s.sink_key_scales.len() + s.ring_key_scales.len(), s.sink_value_scales.len() + s.ring_value_scales.len()), (held, held));
                    }
                    _ => panic!("head 0 retrieval, head 1 streaming"),
                }
                assert!(rel(got, f32_out) > 1e-5, "the rounding is real");
            });
        }
    }

    #[test]
    fn a_synthetic_fill_caches_what_a_prefill_would_hold_seeded() {
        // Retrieval heads hold every token, streaming heads their window, at the right
        // positions; the same seed gives the same cache (the same output of a decode step), a
        // different one another; values in [-1, 1).
        let pattern = HeadPattern::from_rows(vec![vec![true, false], vec![false, true]]).unwrap();
        let window = Window::new(3, 11).unwrap();
        let hd = 16;
        let plan = CachePlan::new(&pattern, hd, 4, window);
        let step = |seed: u64| {
            let mut seq = SequenceKv::new(&plan, PrefillMode::Lambda);
            seq.fill_synthetic(2500, seed);
            assert_eq!(seq.tokens(), 2500);
            assert_eq!(seq.layers()[0].head_lens(), vec![2500, 14]);
            assert_eq!(seq.layers()[1].head_lens(), vec![14, 2500]);
            let q = vec![0.5f32; 2 * hd];
            let (k, v) = (vec![0.1f32; 2 * hd], vec![0.2f32; 2 * hd]);
            seq.layer_mut(0).attend(&q, &k, &v, 2500, 2, PrefillMode::Lambda)
        };
        assert_eq!(step(5), step(5));
        assert_ne!(step(5), step(6));
        let mut a = SequenceKv::new(&plan, PrefillMode::Lambda);
        a.fill_synthetic(1500, 9);
        let LayerHeads::F32(heads) = &a.layers()[0].heads else { panic!("f32 heads") };
        let (HeadCache::Retrieval(r), HeadCache::Streaming(st)) = (&heads[0], &heads[1]) else { panic!("kinds") };
        assert_eq!(r.keys.len(), 1500 * hd);
        assert!(r.keys.iter().all(|x| (-1.0..1.0).contains(x)) && r.keys.iter().any(|x| *x != r.keys[0]));
        assert_eq!(st.positions_in_order(), [0, 1, 2].into_iter().chain(1489..1500).collect::<Vec<_>>());
        // Streaming heads of their own type (int8 beside f32): the fill reaches both sets.
        let mixed = CachePlan::new(&pattern, hd, 4, window).with_streaming(8, 4);
        let mut m = SequenceKv::new(&mixed, PrefillMode::Lambda);
        m.fill_synthetic(700, 9);
        assert_eq!(m.layers()[0].head_lens(), vec![700, 14]);
        assert_eq!(m.bytes().streaming, 2 * 2 * (hd + 4) * 14, "two int8 streaming heads of 14 rows");
        let Some(LayerHeads::I8(sh)) = &m.layers()[0].streaming else { panic!("an int8 streaming set") };
        let HeadCache::Streaming(s8) = &sh[1] else { panic!("head 1 streams") };
        assert_eq!((s8.ring_keys.len(), s8.ring_key_scales.len()), (11 * hd, 11));
    }

    #[test]
    fn streaming_heads_may_keep_their_own_element_type() {
        // int8 retrieval heads beside exact (f32) streaming heads, and the reverse: each kind
        // attends over its keys and values as its own type holds them, and its bytes are its
        // type's.
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let (hd, t, n_heads, n_kv) = (16usize, 60usize, 4usize, 2usize);
        let TwoKinds { pattern, kinds, window, q, k, v } = two_kinds(hd, t, n_heads, &mut rng);
        let lambda = two_kinds_visible;
        // Rows of head `g` (of 2) rounded as int8 rows.
        let round_head = |x: &[f32], g: usize| -> Vec<f32> {
            let mut x = x.to_vec();
            for (i, row) in x.chunks_mut(hd).enumerate() {
                if i % n_kv == g {
                    duo_kernels::kv8::round_row(row);
                }
            }
            x
        };
        for (int8_head, plan) in [
            (0usize, CachePlan::with_bits(&pattern, hd, 8, window).with_row_scales(4).with_streaming(32, 0)),
            (1, CachePlan::with_bits(&pattern, hd, 32, window).with_streaming(8, 4)),
        ] {
            let want = dense_oracle(&q, &round_head(&k, int8_head), &round_head(&v, int8_head), n_heads, &kinds, hd, &lambda);
            for chunk in [1usize, 7, 1000] {
                let (got, seq) = run_chunked_plan(&plan, PrefillMode::Lambda, chunk, &q, &k, &v, n_heads, hd);
                assert!(rel(&got, &want) < 1e-5, "int8 head {int8_head}, chunk {chunk}: {}", rel(&got, &want));
                let b = seq.bytes();
                let (r_row, s_row) = if int8_head == 0 { (hd + 4, 4 * hd) } else { (4 * hd, hd + 4) };
                assert_eq!((b.retrieval, b.streaming), (2 * r_row * t, 2 * s_row * 14), "int8 head {int8_head}, chunk {chunk}");
                assert_eq!(seq.layers()[0].head_lens(), vec![t, 14]);
            }
        }
    }

    #[test]
    fn f16_caches_attend_over_the_rounded_keys_and_hold_half_the_bytes() {
        // Heads of 64 (the register-tiled prefill path) and 16.
        for (hd, t) in [(64usize, 150usize), (16, 47)] {
            let round = |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|v| half::f16::from_f32(v).to_f32()).collect() };
            rounded_cache_case(hd, t, 6, |p, w| CachePlan::new(p, hd, 2, w), round, |_, seq, got, f32_out| {
                let b = seq.bytes();
                assert_eq!((b.retrieval, b.streaming), (2 * hd * 2 * t, 2 * hd * 2 * t.min(14)), "half the bytes of f32");
                // And not the unrounded cache's result (the rounding is real).
                assert!(rel(got, f32_out) > 1e-6);
            });
        }
    }

    #[test]
    fn a_simulated_4_bit_cache_attends_over_what_its_scheme_holds() {
        use duo_kernels::kv4;
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let (hd, n_heads, n_kv, t) = (16usize, 4usize, 2usize, 150usize);
        let TwoKinds { pattern, kinds, window, q, k, v } = two_kinds(hd, t, n_heads, &mut rng);
        let lambda = two_kinds_visible;
        let run = |sim: KvSim, chunk: usize| {
            let mut seq = SequenceKv::new(&CachePlan::new(&pattern, hd, 4, window), PrefillMode::Lambda).with_sim(Some(sim));
            let mut out = Vec::new();
            for s in (0..t).step_by(chunk) {
                let e = (s + chunk).min(t);
                out.extend(seq.layer_mut(0).attend(&q[s * n_heads * hd..e * n_heads * hd], &k[s * n_kv * hd..e * n_kv * hd], &v[s * n_kv * hd..e * n_kv * hd], s, n_heads, PrefillMode::Lambda));
                seq.advance(e - s);
            }
            out
        };
        let row = |r: usize, g: usize| r * n_kv * hd + g * hd..r * n_kv * hd + (g + 1) * hd;
        // Rows in a Hadamard basis (the GPU's int4): every key and value row, whatever the chunks.
        let (mut k1, mut v1) = (k.clone(), v.clone());
        for r in 0..t {
            for g in 0..n_kv {
                kv4::round_rows_turned(&mut k1[row(r, g)], hd);
                kv4::round_rows(&mut v1[row(r, g)], hd);
            }
        }
        let want = dense_oracle(&q, &k1, &v1, n_heads, &kinds, hd, &lambda);
        for chunk in [1usize, 16, 1000] {
            assert!(rel(&run(KvSim::RowsTurned, chunk), &want) < 1e-5, "rows turned, chunk {chunk}");
        }
        // Lagged channels in one chunk: the retrieval head's first block of 64 keys by
        // channels (the second waits for a third), its values by rows; the streaming head exact.
        let (mut k2, mut v2) = (k.clone(), v.clone());
        let mut block: Vec<f32> = (0..64).flat_map(|r| k[row(r, 0)].to_vec()).collect();
        kv4::round_channels(&mut block, hd);
        for r in 0..t {
            if r < 64 {
                k2[row(r, 0)].copy_from_slice(&block[r * hd..(r + 1) * hd]);
            }
            kv4::round_rows(&mut v2[row(r, 0)], hd);
        }
        let want = dense_oracle(&q, &k2, &v2, n_heads, &kinds, hd, &lambda);
        let got = run(KvSim::ChannelsLagged, 1000);
        assert!(rel(&got, &want) < 1e-5, "{}", rel(&got, &want));
        let exact = dense_oracle(&q, &k, &v, n_heads, &kinds, hd, &lambda);
        assert!(rel(&got, &exact) > 1e-4, "the rounding is real");
    }

    #[test]
    fn all_retrieval_equals_full_attention() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (hd, n_heads, n_kv, t) = (8, 4, 2, 40);
        let q = random(t * n_heads * hd, &mut rng);
        let k = random(t * n_kv * hd, &mut rng);
        let v = random(t * n_kv * hd, &mut rng);
        let full = HeadPattern::all_retrieval(1, n_kv);
        let (a, _) = run_chunked(&full, Window::new(2, 4).unwrap(), PrefillMode::Lambda, 40, &q, &k, &v, n_heads, hd);
        let (b, _) = run_chunked(&full, Window::new(2, 4).unwrap(), PrefillMode::Reference, 9, &q, &k, &v, n_heads, hd);
        let kinds = [HeadKind::Retrieval; 2];
        let want = dense_oracle(&q, &k, &v, n_heads, &kinds, hd, &|_, i, j| j <= i);
        assert!(rel(&a, &want) < 1e-5 && rel(&b, &want) < 1e-5);
    }
}
