//! RULER-style synthetic tasks (Hsieh et al., 2024), generated and seeded here: the probes
//! long-context users compare engines on, beyond a single passkey.
//!
//! Every task builds a prompt of exactly the requested length (haystack filler around the
//! inserted facts, or a word list for the aggregation tasks), a question, and the expected
//! answers. The answer continuation is the answers joined by ", ", so a cell can score it
//! teacher-forced (top-1 accuracy of its tokens) and by generation (the fraction of the
//! expected answers that appear in the generated text, RULER's "string match all").
//!
//! Tasks: `single-number` and `single-uuid` (one needle), `multi-key` (the asked key among
//! three distractor keys), `multi-value` (four values under one key, all asked),
//! `multi-query` (two of four keys asked), `variable-tracking` (a chain of assignments,
//! every variable holding the value asked), `common-words` (the ten most common words of a
//! list), `frequent-words` (the three most frequent coded words of a Zipf-distributed text).

use crate::haystack::Haystack;
use crate::{Result, TaskError};
use duo_model::TextTokenizer;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

/// One RULER-style task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RulerTask {
    /// One key, a 7-digit number.
    SingleNumber,
    /// One key, a UUID.
    SingleUuid,
    /// The asked key among three distractor keys.
    MultiKey,
    /// Four values of one key, all asked.
    MultiValue,
    /// Four keys, two asked.
    MultiQuery,
    /// A chain of variable assignments.
    VariableTracking,
    /// The ten most common words of a list.
    CommonWords,
    /// The three most frequent coded words.
    FrequentWords,
}

impl RulerTask {
    /// Every task, in the order of tables.
    pub const ALL: [RulerTask; 8] = [
        RulerTask::SingleNumber,
        RulerTask::SingleUuid,
        RulerTask::MultiKey,
        RulerTask::MultiValue,
        RulerTask::MultiQuery,
        RulerTask::VariableTracking,
        RulerTask::CommonWords,
        RulerTask::FrequentWords,
    ];

    /// The task's name on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            RulerTask::SingleNumber => "single-number",
            RulerTask::SingleUuid => "single-uuid",
            RulerTask::MultiKey => "multi-key",
            RulerTask::MultiValue => "multi-value",
            RulerTask::MultiQuery => "multi-query",
            RulerTask::VariableTracking => "variable-tracking",
            RulerTask::CommonWords => "common-words",
            RulerTask::FrequentWords => "frequent-words",
        }
    }

    /// Parses a comma-separated list (`all` for every task).
    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        if s.trim() == "all" {
            return Ok(Self::ALL.to_vec());
        }
        s.split(',')
            .map(|t| {
                Self::ALL.into_iter().find(|x| x.name() == t.trim()).ok_or_else(|| {
                    TaskError::Invalid(format!("unknown RULER task `{}`; use all or {}", t.trim(), Self::ALL.map(RulerTask::name).join(", ")))
                })
            })
            .collect()
    }
}

/// A built task: the prompt, the continuation that answers it and the answers.
#[derive(Debug, Clone, PartialEq)]
pub struct RulerSample {
    /// Tokens before the answer (BOS, context, question, answer prefix).
    pub prompt: Vec<u32>,
    /// The expected continuation: the answers joined by ", ".
    pub answer: Vec<u32>,
    /// Token ranges of each answer within `answer`.
    pub answer_spans: Vec<std::ops::Range<usize>>,
    /// The expected answers.
    pub answers: Vec<String>,
}

const KEYS: &[&str] = &[
    "lantern", "harbour", "violet", "granite", "meadow", "compass", "saffron", "thimble", "orchard", "falcon", "juniper",
    "quartz", "ember", "willow", "cobalt", "pepper", "marble", "tundra", "velvet", "acorn", "beacon", "cypress",
];

const WORDS: &[&str] = &[
    "apple", "river", "stone", "cloud", "bread", "chair", "window", "garden", "candle", "mirror", "basket", "ladder", "pencil",
    "carpet", "button", "bottle", "pillow", "rocket", "saddle", "tunnel", "violin", "wallet", "zipper", "anchor", "blanket",
    "cactus", "donkey", "engine", "feather", "guitar", "hammer", "island", "jacket", "kettle", "lemon", "magnet", "needle",
    "onion", "parrot", "quilt", "ribbon", "spoon", "tiger", "umbrella", "vessel", "walrus", "yogurt", "zebra", "bucket",
    "cherry", "dragon", "eagle", "forest", "glove", "helmet", "igloo", "jungle", "koala", "locket", "mango",
];

fn number(rng: &mut StdRng) -> String {
    rng.gen_range(1_000_000..10_000_000u32).to_string()
}

fn uuid(rng: &mut StdRng) -> String {
    let h = |n: usize, rng: &mut StdRng| (0..n).map(|_| char::from_digit(rng.gen_range(0..16), 16).unwrap_or('0')).collect::<String>();
    format!("{}-{}-{}-{}-{}", h(8, rng), h(4, rng), h(4, rng), h(4, rng), h(12, rng))
}

fn var_name(rng: &mut StdRng) -> String {
    (0..5).map(|_| (b'A' + rng.gen_range(0..26u8)) as char).collect()
}

fn needle(key: &str, value: &str, uuid: bool) -> String {
    let kind = if uuid { "uuid" } else { "number" };
    format!(" One of the special magic {kind}s for {key} is: {value}.")
}

/// Inserts `facts` (already tokenised) into `filler` at fractions `depths` of its length,
/// each just after the nearest earlier sentence end (within 200 tokens).
fn insert(tok: &TextTokenizer, filler: &[u32], facts: &[(f64, Vec<u32>)]) -> Result<Vec<u32>> {
    let mut cuts: Vec<(usize, &Vec<u32>)> = Vec::with_capacity(facts.len());
    for (depth, ids) in facts {
        let mut cut = ((depth * filler.len() as f64).round() as usize).min(filler.len());
        let floor = cut.saturating_sub(200);
        while cut > floor && cut < filler.len() && cut > 0 && !tok.decode(&filler[cut - 1..cut])?.trim_end().ends_with('.') {
            cut -= 1;
        }
        cuts.push((cut, ids));
    }
    cuts.sort_by_key(|c| c.0);
    let mut out = Vec::with_capacity(filler.len() + facts.iter().map(|f| f.1.len()).sum::<usize>());
    let mut at = 0;
    for (cut, ids) in cuts {
        out.extend_from_slice(&filler[at..cut]);
        out.extend_from_slice(ids);
        at = cut;
    }
    out.extend_from_slice(&filler[at..]);
    Ok(out)
}

/// Builds `task` as a prompt of `length` tokens (prompt plus answer) with its main fact at
/// `depth` in [0, 1]; `haystack` is the filler of the retrieval tasks.
pub fn build(task: RulerTask, tok: &TextTokenizer, haystack: &Haystack, length: usize, depth: f64, rng: &mut StdRng) -> Result<RulerSample> {
    let bos = tok.encode("", true)?;
    let mut keys: Vec<&str> = KEYS.to_vec();
    keys.shuffle(rng);
    // (facts with their depths, question with answer prefix, answers)
    let spread = |n: usize, main: f64| -> Vec<f64> {
        (0..n).map(|i| if i == 0 { main } else { (main + i as f64 / n as f64).fract() }).collect()
    };
    let (facts, question, answers): (Vec<(f64, String)>, String, Vec<String>) = match task {
        RulerTask::SingleNumber | RulerTask::SingleUuid => {
            let is_uuid = task == RulerTask::SingleUuid;
            let v = if is_uuid { uuid(rng) } else { number(rng) };
            let kind = if is_uuid { "uuid" } else { "number" };
            (
                vec![(depth, needle(keys[0], &v, is_uuid))],
                format!("\n\nWhat is the special magic {kind} for {} mentioned in the provided text? The special magic {kind} for {} mentioned in the provided text is:", keys[0], keys[0]),
                vec![v],
            )
        }
        RulerTask::MultiKey => {
            let values: Vec<String> = (0..4).map(|_| number(rng)).collect();
            let d = spread(4, depth);
            (
                (0..4).map(|i| (d[i], needle(keys[i], &values[i], false))).collect(),
                format!("\n\nWhat is the special magic number for {} mentioned in the provided text? The special magic number for {} mentioned in the provided text is:", keys[0], keys[0]),
                vec![values[0].clone()],
            )
        }
        RulerTask::MultiValue => {
            let values: Vec<String> = (0..4).map(|_| number(rng)).collect();
            let d = spread(4, depth);
            (
                (0..4).map(|i| (d[i], needle(keys[0], &values[i], false))).collect(),
                format!("\n\nWhat are all the special magic numbers for {} mentioned in the provided text? The special magic numbers for {} mentioned in the provided text are:", keys[0], keys[0]),
                values,
            )
        }
        RulerTask::MultiQuery => {
            let values: Vec<String> = (0..4).map(|_| number(rng)).collect();
            let d = spread(4, depth);
            (
                (0..4).map(|i| (d[i], needle(keys[i], &values[i], false))).collect(),
                format!("\n\nWhat are the special magic numbers for {} and {} mentioned in the provided text? The special magic numbers for {} and {} mentioned in the provided text are:", keys[0], keys[1], keys[0], keys[1]),
                vec![values[0].clone(), values[1].clone()],
            )
        }
        RulerTask::VariableTracking => {
            let value = rng.gen_range(10_000..100_000u32).to_string();
            let names: Vec<String> = (0..4).map(|_| var_name(rng)).collect();
            let d: Vec<f64> = (0..4).map(|i| (depth + i as f64 * 0.15).min(0.98)).collect();
            let mut facts = vec![(d[0], format!(" VAR {} = {value}.", names[0]))];
            for i in 1..4 {
                facts.push((d[i], format!(" VAR {} = VAR {}.", names[i], names[i - 1])));
            }
            (facts, format!("\n\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: According to the chain(s) of variable assignment in the text above, 4 variables are assigned the value {value}, they are:"), names)
        }
        RulerTask::CommonWords | RulerTask::FrequentWords => return aggregation(task, tok, length, rng, &bos),
    };
    let fact_ids: Vec<(f64, Vec<u32>)> = facts.iter().map(|(d, t)| Ok((*d, tok.encode(t, false)?))).collect::<Result<_>>()?;
    let question_ids = tok.encode(&question, false)?;
    let (answer, answer_spans) = answer_tokens(tok, &answers)?;
    let fixed = bos.len() + fact_ids.iter().map(|f| f.1.len()).sum::<usize>() + question_ids.len() + answer.len();
    if fixed + 16 > length {
        return Err(TaskError::TooShort { length, needed: fixed });
    }
    let filler = haystack.tokens(tok, length - fixed, rng)?;
    let mut prompt = bos;
    prompt.extend(insert(tok, &filler, &fact_ids)?);
    prompt.extend(question_ids);
    Ok(RulerSample { prompt, answer, answer_spans, answers })
}

/// The answers as one continuation, " a, b, c", with each answer's token span.
fn answer_tokens(tok: &TextTokenizer, answers: &[String]) -> Result<(Vec<u32>, Vec<std::ops::Range<usize>>)> {
    let mut ids = Vec::new();
    let mut spans = Vec::with_capacity(answers.len());
    for (i, a) in answers.iter().enumerate() {
        let piece = tok.encode(&format!("{}{a}", if i == 0 { " " } else { ", " }), false)?;
        let start = ids.len() + usize::from(i > 0); // the ", " token is not the answer's
        ids.extend(piece);
        spans.push(start.min(ids.len())..ids.len());
    }
    Ok((ids, spans))
}

/// Common-word and frequent-word extraction: the context is the list itself.
fn aggregation(task: RulerTask, tok: &TextTokenizer, length: usize, rng: &mut StdRng, bos: &[u32]) -> Result<RulerSample> {
    let mut vocab: Vec<String> = match task {
        RulerTask::CommonWords => WORDS.iter().map(|w| w.to_string()).collect(),
        _ => (0..200).map(|_| (0..rng.gen_range(4..7)).map(|_| (b'a' + rng.gen_range(0..26u8)) as char).collect()).collect(),
    };
    vocab.shuffle(rng);
    vocab.dedup();
    let top = if task == RulerTask::CommonWords { 10 } else { 3 };
    let answers: Vec<String> = vocab[..top].to_vec();
    let (question, intro) = match task {
        RulerTask::CommonWords => (
            format!("\n\nQuestion: What are the {top} most common words in the above list? Answer: The top {top} words that appear most often in the list are:"),
            "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n",
        ),
        _ => (
            "\n\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text? Answer: According to the coded text above, the three most frequently appeared words are:".to_string(),
            "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words.\n",
        ),
    };
    let (answer, answer_spans) = answer_tokens(tok, &answers)?;
    let head = tok.encode(intro, false)?;
    let q = tok.encode(&question, false)?;
    let budget = length.checked_sub(bos.len() + head.len() + q.len() + answer.len() + 8).filter(|&b| b > 64).ok_or(TaskError::TooShort { length, needed: bos.len() + head.len() + q.len() + answer.len() + 72 })?;
    // Draw words until the budget is used: the answers far more often than the rest
    // (common words: 12 times as often; coded words: a Zipf law with the answers first).
    let weight = |i: usize| -> f64 {
        match task {
            RulerTask::CommonWords => if i < top { 12.0 } else { 1.0 },
            _ => 1.0 / (i as f64 + 1.0).powf(1.4),
        }
    };
    let total: f64 = (0..vocab.len()).map(weight).sum();
    let mut body: Vec<u32> = Vec::new();
    let mut n = 0;
    loop {
        let mut u = rng.gen::<f64>() * total;
        let mut i = 0;
        while i + 1 < vocab.len() && u > weight(i) {
            u -= weight(i);
            i += 1;
        }
        n += 1;
        let item = match task {
            RulerTask::CommonWords => format!("{n}. {}\n", vocab[i]),
            _ => format!(" {} ....", vocab[i]),
        };
        let ids = tok.encode(&item, false)?;
        if body.len() + ids.len() > budget {
            break;
        }
        body.extend(ids);
    }
    let mut prompt = bos.to_vec();
    prompt.extend(head);
    prompt.extend(body);
    // Pad to the exact length with a harmless separator.
    let pad = tok.encode("\n", false)?;
    while prompt.len() + q.len() + answer.len() < length && !pad.is_empty() {
        prompt.extend_from_slice(&pad[..1]);
    }
    prompt.extend(q);
    Ok(RulerSample { prompt, answer, answer_spans, answers })
}

/// Fraction of `answers` found in `generated` (case-insensitive), RULER's "string match all".
pub fn match_all(answers: &[String], generated: &str) -> f64 {
    if answers.is_empty() {
        return 0.0;
    }
    let g = generated.to_lowercase();
    answers.iter().filter(|a| g.contains(&a.to_lowercase())).count() as f64 / answers.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn names_round_trip_and_scores_count_answers() {
        assert_eq!(RulerTask::parse_list("all").unwrap().len(), 8);
        assert_eq!(RulerTask::parse_list("multi-key, common-words").unwrap(), vec![RulerTask::MultiKey, RulerTask::CommonWords]);
        assert!(RulerTask::parse_list("nope").unwrap_err().to_string().contains("single-number"));
        let a = vec!["1234567".to_string(), "7654321".into()];
        assert_eq!(match_all(&a, "It is 1234567 and then 7654321."), 1.0);
        assert_eq!(match_all(&a, "1234567"), 0.5);
        let mut rng = StdRng::seed_from_u64(1);
        let u = uuid(&mut rng);
        assert_eq!((u.len(), u.matches('-').count()), (36, 4));
        assert_eq!(number(&mut rng).len(), 7);
    }
}
