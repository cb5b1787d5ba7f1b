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
