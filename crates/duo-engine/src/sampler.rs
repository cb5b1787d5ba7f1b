//! Token sampling: the logits are first adjusted (OpenAI's `logit_bias`, presence and
//! frequency penalties over the tokens generated so far, and the multiplicative repetition
//! penalty over prompt and generated tokens, as vLLM applies them); then greedy at
//! temperature 0, otherwise temperature, top-k, top-p and min-p filters and a draw from a
//! seeded generator (same seed, same text).

use crate::error::{EngineError, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling and stopping parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the `k` most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (1: off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0: off).
    pub min_p: f32,
    /// Seed of the generator.
    pub seed: u64,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Generation stops when the text contains one of these (the stop string is cut).
    pub stop: Vec<String>,
    /// Subtracted once from the logit of every token already generated, in [-2, 2].
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of every token already generated, in [-2, 2].
    pub frequency_penalty: f32,
    /// Divides positive and multiplies negative logits of tokens in the prompt or generated,
    /// in (0, 2]; 1 is off.
    pub repetition_penalty: f32,
    /// Added to the logits of these token ids, each in [-100, 100].
    pub logit_bias: Vec<(u32, f32)>,
    /// Output constrained to a grammar (structured output), if any.
    pub structured: Option<crate::constraint::Structured>,
    /// Keep generating past end-of-sequence tokens until `max_tokens` (vLLM's `ignore_eos`,
    /// for benchmarks).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
            max_tokens: 128,
            stop: Vec::new(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            structured: None,
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Checks every value, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |name, reason: String| Err(EngineError::InvalidParameter { name, reason });
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            return bad("temperature", format!("{} is not between 0 and 100", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} is not in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("{} is not in [0, 1]", self.min_p));
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1".into());
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop", "stop strings must not be empty".into());
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(v.is_finite() && (-2.0..=2.0).contains(&v)) {
                return bad(name, format!("{v} is not between -2 and 2"));
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 2.0) {
            return bad("repetition_penalty", format!("{} is not in (0, 2]", self.repetition_penalty));
        }
        if let Some((id, b)) = self.logit_bias.iter().find(|(_, b)| !(b.is_finite() && (-100.0..=100.0).contains(b))) {
            return bad("logit_bias", format!("the bias {b} of token {id} is not between -100 and 100"));
        }
        Ok(())
    }

    /// Checks the token ids the parameters name (`logit_bias`) against a vocabulary of
    /// `vocab` tokens.
    pub fn check_vocab(&self, vocab: usize) -> Result<()> {
        match self.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
            Some((id, _)) => Err(EngineError::InvalidParameter { name: "logit_bias", reason: format!("token id {id} is outside the vocabulary of {vocab}") }),
            None => Ok(()),
        }
    }

    /// Whether the logits are adjusted before sampling.
    fn adjusts(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0 || !self.logit_bias.is_empty()
    }
}

/// A sampler with its own seeded generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each token was generated (kept only when a penalty needs it).
    generated: std::collections::HashMap<u32, u32>,
    /// Tokens of the prompt (for the repetition penalty).
    prompt: std::collections::HashSet<u32>,
    /// The grammar the output must follow, if any.
    constraint: Option<crate::constraint::Constraint>,
}

impl Sampler {
    /// A sampler for validated parameters.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self { params, rng, generated: Default::default(), prompt: Default::default(), constraint: None })
    }

    /// Constrains the output to a grammar.
    pub fn with_constraint(mut self, constraint: Option<crate::constraint::Constraint>) -> Self {
        self.constraint = constraint;
        self
    }

    /// The prompt the generation continues (the repetition penalty covers its tokens).
    pub fn with_prompt(mut self, prompt: &[u32]) -> Self {
        if self.params.repetition_penalty != 1.0 {
            self.prompt = prompt.iter().copied().collect();
        }
        self
    }

    /// `logits` after the bias and penalties (a copy; the raw logits stay what logprobs report).
    fn adjusted(&self, logits: &[f32]) -> Vec<f32> {
        let p = &self.params;
        let mut out = logits.to_vec();
        for &(id, b) in &p.logit_bias {
            if let Some(l) = out.get_mut(id as usize) {
                *l += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &id in self.prompt.iter().chain(self.generated.keys()) {
                if let Some(l) = out.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
            // A token in both the prompt and the output was penalised twice: undo once.
            for &id in self.generated.keys().filter(|id| self.prompt.contains(id)) {
                if let Some(l) = out.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l * p.repetition_penalty } else { *l / p.repetition_penalty };
                }
            }
        }
        for (&id, &n) in &self.generated {
            if let Some(l) = out.get_mut(id as usize) {
                *l -= p.presence_penalty + p.frequency_penalty * n as f32;
            }
        }
        out
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token from raw logits (and remembers it for the penalties and the
    /// grammar). Errors only when a grammar constraint fails.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if !self.params.adjusts() && self.constraint.is_none() {
            return Ok(self.draw(logits));
        }
        let mut adjusted = if self.params.adjusts() { self.adjusted(logits) } else { logits.to_vec() };
        if let Some(c) = &mut self.constraint {
            c.mask(&mut adjusted)?;
        }
        let id = self.draw(&adjusted);
        if self.params.adjusts() {
            *self.generated.entry(id).or_insert(0) += 1;
        }
        if let Some(c) = &mut self.constraint {
            c.advance(id)?;
        }
        Ok(id)
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        if (p.top_k == 0 || p.top_k >= logits.len()) && p.top_p >= 1.0 && p.min_p == 0.0 {
            // No filter: the whole softmax, drawn in two passes over the logits without
            // building it (allocating megabytes per token costs more than the arithmetic),
            // a block of weights at a time so that the exponentials vectorise.
            let inv_t = 1.0 / p.temperature as f64;
            let m = logits.iter().fold(f32::NEG_INFINITY, |a, &l| a.max(l)) as f64 * inv_t;
            const BLOCK: usize = 512;
            let mut w = [0.0f64; BLOCK];
            let fill = |block: &[f32], w: &mut [f64; BLOCK]| -> f64 {
                for (w, &l) in w.iter_mut().zip(block) {
                    *w = exp_nonpositive(l as f64 * inv_t - m);
                }
                let mut part = [0.0f64; 4];
                for (i, &x) in w[..block.len()].iter().enumerate() {
                    part[i % 4] += x;
                }
                part.iter().sum()
            };
            let z: f64 = logits.chunks(BLOCK).map(|b| fill(b, &mut w)).sum();
            let mut u = self.rng.gen::<f64>() * z;
            // The first token whose cumulative weight exceeds u (strictly: a token of weight
            // 0, such as one a grammar masked, is never drawn, even for u = 0).
            for (b, block) in logits.chunks(BLOCK).enumerate() {
                let mass = fill(block, &mut w);
                if u >= mass {
                    u -= mass;
                    continue;
                }
                for (i, &x) in w[..block.len()].iter().enumerate() {
                    if u < x {
                        return (b * BLOCK + i) as u32;
                    }
                    u -= x;
                }
            }
            return argmax(logits);
        }
        let probs = self.kept(logits, false);
        let mut u: f64 = self.rng.gen::<f64>();
        for &(id, p) in &probs {
            if u < p {
                return id;
            }
            u -= p;
        }
        probs.last().map(|x| x.0).unwrap_or_else(|| argmax(logits))
    }

    /// The distribution after temperature and filters, most likely first (ties: lower id
    /// first), summing to 1.
    pub fn filtered_probs(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        self.kept(logits, true)
    }

    /// The tokens the filters keep with their probabilities, summing to 1: most likely first
    /// where a filter needs that order (top-k, top-p, min-p) or `sorted` asks for it, else in
    /// id order. A draw walks them either way, so the distribution is the same; what this
    /// avoids is sorting the whole vocabulary for every sampled token (about 6 ms for
    /// Llama-3's 128,256 tokens on the 2-core build machine, once per row and step).
    fn kept(&self, logits: &[f32], sorted: bool) -> Vec<(u32, f64)> {
        let p = &self.params;
        let t = p.temperature.max(1e-6) as f64;
        let desc = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let mut in_order = false;
        // (token, probability) of the candidates, normalised over them.
        let mut cand: Vec<(u32, f64)> = if p.top_k > 0 && p.top_k < logits.len() {
            // The k most likely in O(vocab), then sorted: the set and order a full sort gives.
            let mut cand: Vec<(u32, f64)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l as f64 / t)).collect();
            cand.select_nth_unstable_by(p.top_k - 1, desc);
            cand.truncate(p.top_k);
            cand.sort_by(desc);
            in_order = true;
            let m = cand[0].1;
            let z: f64 = cand.iter().map(|c| exp_nonpositive(c.1 - m)).sum();
            cand.iter().map(|&(i, s)| (i, exp_nonpositive(s - m) / z)).collect()
        } else {
            // The whole vocabulary, one plain array at a time so that the loops vectorise.
            let m = logits.iter().fold(f64::NEG_INFINITY, |a, &l| a.max(l as f64 / t));
            let weights: Vec<f64> = logits.iter().map(|&l| exp_nonpositive(l as f64 / t - m)).collect();
            let z: f64 = weights.iter().sum();
            // Tokens no filter can keep are never paired: below min_p times the best (whose
            // weight is 1), or, with top-p, below (1 - top_p) / vocab: all such tokens
            // together weigh less than the tail top-p drops, so none can be in the nucleus.
            let mut floor = 0.0f64;
            if p.min_p > 0.0 {
                floor = floor.max(p.min_p as f64 / z);
            }
            if p.top_p < 1.0 {
                floor = floor.max((1.0 - p.top_p as f64) / logits.len() as f64 * (1.0 - 1e-9));
            }
            weights.iter().enumerate().filter(|&(_, &w)| w / z >= floor).map(|(i, &w)| (i as u32, w / z)).collect()
        };
        if p.min_p > 0.0 {
            // The most likely token's probability is exp(0) / z.
            let best = cand.iter().map(|c| c.1).fold(0.0, f64::max);
            let floor = best * p.min_p as f64;
            cand.retain(|c| c.1 >= floor);
        }
        if p.top_p < 1.0 {
            // The smallest most-likely-first prefix reaching top_p: sort only a growing head
            // of the candidates (the nucleus is usually a few hundred tokens) until it does.
            let mut head = 1024.min(cand.len());
            loop {
                if !in_order {
                    if head < cand.len() {
                        cand.select_nth_unstable_by(head - 1, desc);
                    }
                    cand[..head].sort_by(desc);
                }
                let mut acc = 0.0;
                let reached = cand[..head].iter().position(|c| {
                    acc += c.1;
                    acc >= p.top_p as f64
                });
                match reached {
                    Some(i) => {
                        cand.truncate(i + 1);
                        in_order = true;
                        break;
                    }
                    None if head == cand.len() => {
                        in_order = true;
                        break;
                    }
                    None => head = (head * 8).min(cand.len()),
                }
            }
        }
        if sorted && !in_order {
            cand.sort_by(desc);
        }
        let z: f64 = cand.iter().map(|c| c.1).sum();
        cand.iter().map(|&(i, q)| (i, q / z)).collect()
    }
}

/// `e^x` for `x <= 0` in `f64`, to about 1e-15 relative, without branches or calls so
/// that a loop over the vocabulary vectorises (the standard library's `exp` is a call per
/// element: most of a sampled token's time with a 128K vocabulary). Below -700 (a masked
/// token's `-inf` included) it is exactly 0.
#[inline(always)]
fn exp_nonpositive(x: f64) -> f64 {
    let below = x < -700.0;
    let x = x.clamp(-700.0, 0.0);
    let n = (x * std::f64::consts::LOG2_E).round_ties_even();
    // x - n ln2 in two steps (ln2's high part has trailing zero bits, so n * HI is exact).
    let r = x - n * 0.693_147_180_369_123_8 - n * 1.908_214_929_270_587_7e-10;
    // Taylor series to r^13 / 13! on |r| <= ln2 / 2: truncation below 2e-16.
    let mut q = INV_FACTORIALS[13];
    for c in INV_FACTORIALS[..13].iter().rev() {
        q = q * r + c;
    }
    // 2^n from its exponent bits: n + 1023 is in [2, 1023], read as an integer from the
    // low mantissa bits of n + 1023 + 2^52.
    let bits = ((n + 1023.0 + 4_503_599_627_370_496.0).to_bits() & 0x7ff) << 52;
    if below {
        0.0
    } else {
        q * f64::from_bits(bits)
    }
}

/// `1 / k!` for `k` in 0..=13.
const INV_FACTORIALS: [f64; 14] = [
    1.0,
    1.0,
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
    1.0 / 40_320.0,
    1.0 / 362_880.0,
    1.0 / 3_628_800.0,
    1.0 / 39_916_800.0,
    1.0 / 479_001_600.0,
    1.0 / 6_227_020_800.0,
];

/// The parity oracle of [`Sampler::filtered_probs`]: the filters as first written, every
/// logit scaled, the whole vocabulary sorted, then cut (and the baseline of
/// `examples/sampler_speed.rs`).
pub fn reference_filtered_probs(p: &SamplingParams, logits: &[f32]) -> Vec<(u32, f64)> {
    let t = p.temperature.max(1e-6) as f64;
    let mut cand: Vec<(u32, f64)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l as f64 / t)).collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if p.top_k > 0 {
        cand.truncate(p.top_k);
    }
    let m = cand[0].1;
    let z: f64 = cand.iter().map(|c| (c.1 - m).exp()).sum();
    for c in cand.iter_mut() {
        c.1 = (c.1 - m).exp() / z;
    }
    if p.min_p > 0.0 {
        let floor = cand[0].1 * p.min_p as f64;
        cand.retain(|c| c.1 >= floor);
    }
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        if let Some(i) = cand.iter().position(|c| {
            acc += c.1;
            acc >= p.top_p as f64
        }) {
            cand.truncate(i + 1);
        }
    }
    let z: f64 = cand.iter().map(|c| c.1).sum();
    cand.iter().map(|&(i, q)| (i, q / z)).collect()
}

/// Index of the largest logit (the first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(f: impl FnOnce(&mut SamplingParams)) -> Sampler {
        let mut p = SamplingParams { temperature: 1.0, ..Default::default() };
        f(&mut p);
        Sampler::new(p).unwrap()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]).unwrap(), 1);
    }

    #[test]
    fn filters_cut_the_distribution() {
        let logits = [0.0f32, 1.0, 2.0, 3.0];
        assert_eq!(sampler(|p| p.top_k = 2).filtered_probs(&logits).iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 2]);
        // Softmax of [0,1,2,3]: 0.032, 0.087, 0.237, 0.644. top_p 0.8 keeps 3 and 2.
        assert_eq!(sampler(|p| p.top_p = 0.8).filtered_probs(&logits).len(), 2);
        // min_p 0.3: keep tokens with p >= 0.193: 3 and 2.
        assert_eq!(sampler(|p| p.min_p = 0.3).filtered_probs(&logits).len(), 2);
        let probs = sampler(|_| {}).filtered_probs(&logits);
        assert!((probs.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((probs[0].1 - 0.6439).abs() < 1e-3);
    }

    #[test]
    fn the_sampler_exp_matches_std() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -700.0 * i as f64 / 200_000.0;
            let (a, b) = (exp_nonpositive(x), x.exp());
            if b > 1e-300 {
                worst = worst.max(((a - b) / b).abs());
            }
        }
        assert!(worst < 1e-14, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-1000.0), 0.0);
        assert_eq!(exp_nonpositive(f64::NEG_INFINITY), 0.0);
    }

    /// An unfiltered draw over a vocabulary of several blocks: one token holds half the
    /// mass (its logit ln 1999 against 1,999 zeros), the rest spreads over every block.
    #[test]
    fn unfiltered_draws_cover_every_block_in_proportion() {
        let mut logits = vec![0.0f32; 2000];
        logits[1500] = (1999.0f32).ln();
        // A masked token (a grammar's -inf) has weight 0 and is never drawn.
        logits[0] = f32::NEG_INFINITY;
        let mut s = sampler(|p| p.seed = 9);
        let draws: Vec<u32> = (0..4000).map(|_| s.sample(&logits).unwrap()).collect();
        let half = draws.iter().filter(|&&d| d == 1500).count() as f64 / 4000.0;
        assert!((half - 0.5).abs() < 0.04, "{half}");
        for block in 0..4 {
            assert!(draws.iter().any(|&d| d != 1500 && d as usize / 512 == block), "block {block} never drawn");
        }
        assert!(draws.iter().all(|&d| d < 2000 && d != 0));
    }

    /// The filters without a full sort keep the same tokens in the same order with the same
    /// probabilities as sorting everything, on peaked and on flat distributions (a flat one
    /// makes top-p need most of the vocabulary), with repeated logits (ties by id).
    #[test]
    fn filters_without_a_full_sort_match_the_full_sort() {
        let mut x = 12345u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 10_000) as f32 / 10_000.0
        };
        for (vocab, spread) in [(5_000usize, 12.0f32), (5_000, 0.5), (300, 3.0), (20_000, 8.0)] {
            let logits: Vec<f32> = (0..vocab).map(|i| if i % 97 == 0 { 1.0 } else { next() * spread }).collect();
            for (top_k, top_p, min_p, temperature) in [(0, 1.0, 0.0, 1.0), (40, 1.0, 0.0, 0.7), (0, 0.9, 0.0, 1.0), (0, 0.999, 0.0, 1.3), (0, 1.0, 0.05, 1.0), (50, 0.8, 0.1, 1.0), (0, 0.95, 0.01, 0.8), (vocab + 5, 0.5, 0.0, 1.0)] {
                let params = SamplingParams { temperature, top_k, top_p, min_p, ..Default::default() };
                let want = reference_filtered_probs(&params, &logits);
                let got = Sampler::new(params.clone()).unwrap().filtered_probs(&logits);
                assert_eq!(got.len(), want.len(), "{params:?}, vocab {vocab}");
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(g.0, w.0, "{params:?}, vocab {vocab}");
                    assert!((g.1 - w.1).abs() < 1e-12, "{params:?}: {g:?} vs {w:?}");
                }
            }
        }
    }

    #[test]
    fn same_seed_same_draws_and_frequencies_follow_probabilities() {
        let logits = [0.0f32, 1.0, 2.0, 3.0];
        let draws = |seed| {
            let mut s = sampler(|p| p.seed = seed);
            (0..4000).map(|_| s.sample(&logits).unwrap()).collect::<Vec<u32>>()
        };
        let a = draws(5);
        assert_eq!(a, draws(5));
        assert_ne!(a, draws(6));
        let frac3 = a.iter().filter(|&&x| x == 3).count() as f64 / a.len() as f64;
        assert!((frac3 - 0.644).abs() < 0.03, "{frac3}");
    }

    #[test]
    fn invalid_parameters_are_named() {
        for (f, name) in [
            (Box::new(|p: &mut SamplingParams| p.temperature = -1.0) as Box<dyn Fn(&mut SamplingParams)>, "temperature"),
            (Box::new(|p: &mut SamplingParams| p.top_p = 0.0), "top_p"),
            (Box::new(|p: &mut SamplingParams| p.min_p = 2.0), "min_p"),
            (Box::new(|p: &mut SamplingParams| p.max_tokens = 0), "max_tokens"),
            (Box::new(|p: &mut SamplingParams| p.temperature = f32::NAN), "temperature"),
        ] {
            let mut p = SamplingParams::default();
            f(&mut p);
            let e = Sampler::new(p).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
    }
}

#[cfg(test)]
mod penalty_tests {
    use super::*;

    fn greedy(extra: impl FnOnce(&mut SamplingParams)) -> Sampler {
        let mut p = SamplingParams::default();
        extra(&mut p);
        Sampler::new(p).expect("valid")
    }

    #[test]
    fn logit_bias_moves_the_choice() {
        let logits = [1.0f32, 3.0, 2.0];
        assert_eq!(greedy(|_| {}).sample(&logits).unwrap(), 1);
        assert_eq!(greedy(|p| p.logit_bias = vec![(2, 1.5)]).sample(&logits).unwrap(), 2);
        assert_eq!(greedy(|p| p.logit_bias = vec![(1, -100.0)]).sample(&logits).unwrap(), 2, "a ban");
    }

    #[test]
    fn presence_and_frequency_penalties_follow_what_was_generated() {
        let logits = [0.0f32, 2.0, 1.5];
        // Presence 1: after token 1 once, its logit drops to 1.0 < 1.5.
        let mut s = greedy(|p| p.presence_penalty = 1.0);
        assert_eq!((s.sample(&logits).unwrap(), s.sample(&logits).unwrap()), (1, 2));
        // Frequency 0.3: 2.0 - 0.3 = 1.7 still wins, after twice 1.4 loses.
        let mut s = greedy(|p| p.frequency_penalty = 0.3);
        assert_eq!([s.sample(&logits).unwrap(), s.sample(&logits).unwrap(), s.sample(&logits).unwrap()], [1, 1, 2]);
        // Negative values encourage repeats.
        let mut s = greedy(|p| p.presence_penalty = -1.0);
        assert_eq!([s.sample(&[2.0, 1.9]).unwrap(), s.sample(&[1.9, 2.0]).unwrap()], [0, 0]);
    }

    #[test]
    fn repetition_penalty_covers_the_prompt_and_divides_or_multiplies() {
        let logits = [1.0f32, 1.8, -0.5];
        let s = greedy(|p| p.repetition_penalty = 2.0).with_prompt(&[1, 2]);
        let a = s.adjusted(&logits);
        assert_eq!(a, vec![1.0, 0.9, -1.0], "positive divided, negative multiplied, others untouched");
        let mut s = s;
        assert_eq!(s.sample(&logits).unwrap(), 0);
        // Token 0 now generated once too: penalised once, not twice.
        assert_eq!(s.adjusted(&logits)[0], 0.5);
    }

    #[test]
    fn penalty_ranges_are_checked_by_name() {
        for (p, name) in [
            (SamplingParams { presence_penalty: 2.5, ..Default::default() }, "presence_penalty"),
            (SamplingParams { frequency_penalty: f32::NAN, ..Default::default() }, "frequency_penalty"),
            (SamplingParams { repetition_penalty: 0.0, ..Default::default() }, "repetition_penalty"),
            (SamplingParams { logit_bias: vec![(3, 101.0)], ..Default::default() }, "logit_bias"),
        ] {
            assert!(matches!(p.validate(), Err(EngineError::InvalidParameter { name: n, .. }) if n == name), "{name}");
        }
    }
}
