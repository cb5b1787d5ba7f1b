//! Token sampling: greedy at temperature 0; otherwise temperature, then top-k, top-p
//! and min-p filters, then a draw from a seeded generator (same seed, same text).

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
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: 0, max_tokens: 128, stop: Vec::new() }
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
        Ok(())
    }
}

/// A sampler with its own seeded generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler for validated parameters.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token from raw logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let probs = self.filtered_probs(logits);
        let mut u: f64 = self.rng.gen::<f64>();
        for &(id, p) in &probs {
            u -= p;
            if u <= 0.0 {
                return id;
            }
        }
        probs.last().map(|x| x.0).unwrap_or_else(|| argmax(logits))
    }

    /// The distribution after temperature and filters, most likely first, summing to 1.
    pub fn filtered_probs(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let t = self.params.temperature.max(1e-6) as f64;
        let mut cand: Vec<(u32, f64)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l as f64 / t)).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            cand.truncate(self.params.top_k);
        }
        let m = cand[0].1;
        let mut z = 0.0;
        for c in cand.iter_mut() {
            c.1 = (c.1 - m).exp();
            z += c.1;
        }
        for c in cand.iter_mut() {
            c.1 /= z;
        }
        if self.params.min_p > 0.0 {
            let floor = cand[0].1 * self.params.min_p as f64;
            cand.retain(|c| c.1 >= floor);
        }
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.1;
                if acc >= self.params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
        }
        let z: f64 = cand.iter().map(|c| c.1).sum();
        cand.iter().map(|&(i, p)| (i, p / z)).collect()
    }
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
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
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
    fn same_seed_same_draws_and_frequencies_follow_probabilities() {
        let logits = [0.0f32, 1.0, 2.0, 3.0];
        let draws = |seed| {
            let mut s = sampler(|p| p.seed = seed);
            (0..4000).map(|_| s.sample(&logits)).collect::<Vec<u32>>()
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
