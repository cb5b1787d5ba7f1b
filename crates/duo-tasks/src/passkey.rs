//! Multi-passkey retrieval samples (DuoAttention's identification data, ALGORITHM.md §2).
//!
//! A sample is a haystack with `passkeys` needles at sorted depths, each "Remember this
//! sequence of words, it's the {ordinal} passkey to the vault: {words}" wrapped in blank
//! lines, followed by one question per needle, "Based on the content of the book, what is
//! the {ordinal} passkey to the vault?\nPasskey: {words}". Identification takes its loss
//! over the whole question-and-answer section; evaluation (one needle) scores the answer.
//!
//! Passkey words are tokenized one word at a time (with their leading space), so the
//! answer span of every word is an exact token range: evaluation can give the first K
//! words as a hint and score the rest.

use crate::{Haystack, Result, TaskError};
use duo_model::TextTokenizer;
use rand::rngs::StdRng;
use rand::Rng;
use std::ops::Range;

/// The 26 NATO spelling-alphabet words passkeys are drawn from.
pub const NATO: [&str; 26] = [
    "Alfa", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel", "India", "Juliett", "Kilo", "Lima", "Mike",
    "November", "Oscar", "Papa", "Quebec", "Romeo", "Sierra", "Tango", "Uniform", "Victor", "Whiskey", "Xray", "Yankee",
    "Zulu",
];

/// "first", "second", ... ("11th" and on past ten).
pub fn ordinal(i: usize) -> String {
    const WORDS: [&str; 10] = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"];
    match WORDS.get(i) {
        Some(w) => (*w).to_string(),
        None => format!("{}th", i + 1),
    }
}

/// The shape of a passkey task.
#[derive(Debug, Clone, PartialEq)]
pub struct PasskeySpec {
    /// Needles (and questions) per sample. Identification: 10.
    pub passkeys: usize,
    /// Words per passkey. Identification: 32.
    pub words: usize,
    /// Depths are drawn uniformly from this range (fractions of the haystack).
    pub depth_range: (f64, f64),
}

impl Default for PasskeySpec {
    fn default() -> Self {
        Self { passkeys: 10, words: 32, depth_range: (0.05, 0.95) }
    }
}

/// One question and its answer inside a sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The passkey's words.
    pub words: Vec<&'static str>,
    /// Token range of each word of the answer (contiguous, in order).
    pub word_spans: Vec<Range<usize>>,
    /// Where the needle sits in the sample (token range).
    pub needle: Range<usize>,
}

impl Answer {
    /// Token range of the whole answer.
    pub fn span(&self) -> Range<usize> {
        let start = self.word_spans.first().map_or(0, |r| r.start);
        start..self.word_spans.last().map_or(start, |r| r.end)
    }
}

/// A built sample.
#[derive(Debug, Clone, PartialEq)]
pub struct PasskeySample {
    /// The whole token sequence (BOS first when the tokenizer uses one).
    pub ids: Vec<u32>,
    /// The question-and-answer section: identification's loss positions.
    pub qa: Range<usize>,
    /// The answers, in needle order.
    pub answers: Vec<Answer>,
    /// The needles' depths (fractions of the haystack), sorted.
    pub depths: Vec<f64>,
}

impl PasskeySpec {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        let (lo, hi) = self.depth_range;
        if self.passkeys == 0 || self.words == 0 {
            return Err(TaskError::Invalid("a passkey task needs at least one passkey of at least one word".into()));
        }
        if !(0.0..=1.0).contains(&lo) || !(0.0..=1.0).contains(&hi) || lo > hi {
            return Err(TaskError::Invalid(format!("depth range {lo}..{hi} must lie in [0, 1] and be ordered")));
        }
        Ok(())
    }

    /// A sample of exactly `length` tokens with depths drawn from `depth_range`.
    pub fn sample(&self, tokenizer: &TextTokenizer, haystack: &Haystack, length: usize, rng: &mut StdRng) -> Result<PasskeySample> {
        self.validate()?;
        let (lo, hi) = self.depth_range;
        let mut depths: Vec<f64> = (0..self.passkeys).map(|_| if hi > lo { rng.gen_range(lo..hi) } else { lo }).collect();
        depths.sort_by(f64::total_cmp);
        self.sample_at(tokenizer, haystack, length, &depths, rng)
    }

    /// A sample of exactly `length` tokens with the needles at the given depths
    /// (one per passkey, each in [0, 1]; sorted here).
    pub fn sample_at(
        &self,
        tokenizer: &TextTokenizer,
        haystack: &Haystack,
        length: usize,
        depths: &[f64],
        rng: &mut StdRng,
    ) -> Result<PasskeySample> {
        self.validate()?;
        if depths.len() != self.passkeys || depths.iter().any(|d| !(0.0..=1.0).contains(d)) {
            return Err(TaskError::Invalid(format!("need {} depths in [0, 1], got {depths:?}", self.passkeys)));
        }
        let mut depths = depths.to_vec();
        depths.sort_by(f64::total_cmp);
        let passkeys: Vec<Vec<&'static str>> =
            (0..self.passkeys).map(|_| (0..self.words).map(|_| NATO[rng.gen_range(0..NATO.len())]).collect()).collect();
        let words: Vec<Vec<Vec<u32>>> = passkeys
            .iter()
            .map(|p| p.iter().map(|w| tokenizer.encode(&format!(" {w}"), false)).collect::<std::result::Result<_, _>>())
            .collect::<std::result::Result<_, _>>()?;
        let needle_heads: Vec<Vec<u32>> = (0..self.passkeys)
            .map(|i| tokenizer.encode(&format!("\n\nRemember this sequence of words, it's the {} passkey to the vault:", ordinal(i)), false))
            .collect::<std::result::Result<_, _>>()?;
        let needle_tail = tokenizer.encode("\n\n", false)?;
        let questions: Vec<Vec<u32>> = (0..self.passkeys)
            .map(|i| {
                tokenizer.encode(
                    &format!("\n\nBased on the content of the book, what is the {} passkey to the vault?\nPasskey:", ordinal(i)),
                    false,
                )
            })
            .collect::<std::result::Result<_, _>>()?;
        let bos: Vec<u32> = tokenizer.encode("", true)?;
        let answer_tokens: usize = words.iter().map(|w| w.iter().map(Vec::len).sum::<usize>()).sum();
        let needed = bos.len()
            + needle_heads.iter().map(Vec::len).sum::<usize>()
            + needle_tail.len() * self.passkeys
            + questions.iter().map(Vec::len).sum::<usize>()
            + 2 * answer_tokens;
        if needed >= length {
            return Err(TaskError::TooShort { length, needed });
        }
        let hay = haystack.tokens(tokenizer, length - needed, rng)?;
        let cuts: Vec<usize> = depths.iter().map(|d| ((d * hay.len() as f64).round() as usize).min(hay.len())).collect();

        let mut ids = bos;
        let mut needles = Vec::with_capacity(self.passkeys);
        let mut prev = 0;
        for (i, &cut) in cuts.iter().enumerate() {
            ids.extend_from_slice(&hay[prev..cut]);
            prev = cut;
            let start = ids.len();
            ids.extend_from_slice(&needle_heads[i]);
            for w in &words[i] {
                ids.extend_from_slice(w);
            }
            ids.extend_from_slice(&needle_tail);
            needles.push(start..ids.len());
        }
        ids.extend_from_slice(&hay[prev..]);
        let qa_start = ids.len();
        let mut answers = Vec::with_capacity(self.passkeys);
        for (i, needle) in needles.into_iter().enumerate() {
            ids.extend_from_slice(&questions[i]);
            let mut word_spans = Vec::with_capacity(self.words);
            for w in &words[i] {
                let s = ids.len();
                ids.extend_from_slice(w);
                word_spans.push(s..ids.len());
            }
            answers.push(Answer { words: passkeys[i].clone(), word_spans, needle });
        }
        debug_assert_eq!(ids.len(), length);
        Ok(PasskeySample { qa: qa_start..ids.len(), ids, answers, depths })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A word-level tokenizer that knows the NATO words and a few others; everything else
    /// is `<unk>`. Enough to check the assembly of samples.
    pub(crate) fn word_tokenizer() -> TextTokenizer {
        let words: Vec<&str> = ["<unk>", "<s>", "Passkey", ":", "?", ",", "."].into_iter().chain(NATO).collect();
        TextTokenizer::word_level(&words, "<unk>", "<s>").expect("tokenizer")
    }

    #[test]
    fn samples_have_exact_length_spans_and_answers() {
        let tok = word_tokenizer();
        let spec = PasskeySpec::default();
        let s = spec.sample(&tok, &Haystack::Generated, 4000, &mut StdRng::seed_from_u64(3)).expect("sample");
        assert_eq!(s.ids.len(), 4000);
        assert_eq!(s.ids[0], 1, "BOS first");
        assert_eq!(s.qa.end, 4000);
        assert_eq!(s.answers.len(), 10);
        assert!(s.depths.windows(2).all(|w| w[0] <= w[1]));
        for a in &s.answers {
            assert_eq!(a.words.len(), 32);
            // Each answer word is its own NATO token, and the same words sit inside the needle.
            let answer_ids: Vec<u32> = a.span().map(|p| s.ids[p]).collect();
            let expected: Vec<u32> = a.words.iter().map(|w| 7 + NATO.iter().position(|n| n == w).expect("nato") as u32).collect();
            assert_eq!(answer_ids, expected);
            let needle = &s.ids[a.needle.clone()];
            assert!(needle.windows(expected.len()).any(|w| w == expected.as_slice()));
            assert!(a.needle.end <= s.qa.start && a.span().start >= s.qa.start);
        }
        // Needles appear in order.
        assert!(s.answers.windows(2).all(|w| w[0].needle.end <= w[1].needle.start));
    }

    #[test]
    fn samples_are_seeded() {
        let tok = word_tokenizer();
        let spec = PasskeySpec { passkeys: 2, words: 5, ..Default::default() };
        let a = spec.sample(&tok, &Haystack::Generated, 500, &mut StdRng::seed_from_u64(9)).expect("a");
        let b = spec.sample(&tok, &Haystack::Generated, 500, &mut StdRng::seed_from_u64(9)).expect("b");
        let c = spec.sample(&tok, &Haystack::Generated, 500, &mut StdRng::seed_from_u64(10)).expect("c");
        assert_eq!(a, b);
        assert_ne!(a.answers, c.answers);
    }

    #[test]
    fn fixed_depths_place_the_needle() {
        let tok = word_tokenizer();
        let spec = PasskeySpec { passkeys: 1, words: 4, ..Default::default() };
        let mut rng = StdRng::seed_from_u64(1);
        let early = spec.sample_at(&tok, &Haystack::Generated, 1000, &[0.0], &mut rng).expect("early");
        let late = spec.sample_at(&tok, &Haystack::Generated, 1000, &[1.0], &mut rng).expect("late");
        assert_eq!(early.answers[0].needle.start, 1);
        assert_eq!(late.answers[0].needle.end, late.qa.start);
    }

    #[test]
    fn too_short_and_bad_settings_are_errors() {
        let tok = word_tokenizer();
        let spec = PasskeySpec::default();
        let mut rng = StdRng::seed_from_u64(1);
        assert!(matches!(spec.sample(&tok, &Haystack::Generated, 100, &mut rng), Err(TaskError::TooShort { .. })));
        let bad = PasskeySpec { depth_range: (0.9, 0.1), ..Default::default() };
        assert!(matches!(bad.sample(&tok, &Haystack::Generated, 5000, &mut rng), Err(TaskError::Invalid(_))));
        assert!(spec.sample_at(&tok, &Haystack::Generated, 5000, &[0.5], &mut rng).is_err());
    }
}
