//! Evaluation grids: context lengths × needle depths × attention methods.
//!
//! Every cell builds one prompt (seeded by the cell, so every method sees the same
//! prompt), prefills it once, and scores it twice from the same cache:
//! - **teacher-forced**: the answer is fed token by token; the score is the fraction of
//!   answer tokens after the first that are the model's top-1 prediction;
//! - **generation**: the first `hint_words` words of the answer are appended to the prompt
//!   and the rest is generated greedily; the score compares words (passkey: position by
//!   position; needle: fraction of the needle's words found).
//!
//! Results are appended to a JSON-lines file as each cell finishes; a rerun skips the
//! cells already there, so an interrupted grid resumes where it stopped.

pub mod store;
pub mod summary;

use duo_core::pattern::Layout;
use duo_engine::{Method, MethodSpec, Runner};
use duo_model::TextTokenizer;
use duo_tasks::{Haystack, PasskeySpec};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

/// Errors of evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Invalid settings.
    #[error("{0}")]
    Invalid(String),
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] duo_engine::EngineError),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] duo_model::ModelError),
    /// The prompt could not be built.
    #[error(transparent)]
    Task(#[from] duo_tasks::TaskError),
    /// A results file could not be read or written.
    #[error("{path}: {reason}")]
    Store {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, EvalError>;

/// A method of the comparison, by the name the grid records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalMethod {
    /// Full attention.
    Full,
    /// DuoAttention pattern, head layout.
    Duo,
    /// The layer layout (ZigzagAttention).
    Layer,
    /// StreamingLLM: every head sink + recent.
    Streaming,
    /// Seeded random heads, as many per layer as the duo pattern keeps.
    Random,
}

impl EvalMethod {
    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            EvalMethod::Full => "full",
            EvalMethod::Duo => "duo",
            EvalMethod::Layer => "layer",
            EvalMethod::Streaming => "streaming",
            EvalMethod::Random => "random",
        }
    }

    /// Parses a comma-separated list (`full,duo,layer,streaming,random`).
    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        s.split(',')
            .map(|m| match m.trim() {
                "full" => Ok(EvalMethod::Full),
                "duo" => Ok(EvalMethod::Duo),
                "layer" => Ok(EvalMethod::Layer),
                "streaming" => Ok(EvalMethod::Streaming),
                "random" => Ok(EvalMethod::Random),
                other => Err(EvalError::Invalid(format!("unknown method `{other}`; use full, duo, layer, streaming, random"))),
            })
            .collect()
    }

    /// The engine's method spec for this method, from the shared settings `base`
    /// (pattern, sparsity, window, seed, prefill). `layer_pattern` overrides the
    /// pattern of the layer method.
    pub fn spec(self, base: &MethodSpec, layer_pattern: Option<&PathBuf>) -> MethodSpec {
        let mut s = base.clone();
        match self {
            EvalMethod::Full => s.method = Method::Full,
            EvalMethod::Streaming => s.method = Method::Streaming,
            EvalMethod::Duo => {
                s.method = Method::Duo;
                s.layout = Layout::Head;
            }
            EvalMethod::Layer => {
                s.method = Method::Duo;
                s.layout = Layout::Layer;
                if let Some(p) = layer_pattern {
                    s.pattern = Some(duo_engine::PatternSource::Path(p.clone()));
                }
            }
            EvalMethod::Random => {
                s.method = Method::Random;
                s.layout = Layout::Head;
            }
        }
        s
    }
}

/// What the grid asks.
#[derive(Debug, Clone)]
pub enum Task {
    /// One passkey of `words` NATO words at the cell's depth (ALGORITHM.md §2 format).
    Passkey {
        /// Words per passkey.
        words: usize,
    },
    /// Needle in a haystack (ALGORITHM.md §6).
    Niah {
        /// The sentence hidden in the haystack.
        needle: String,
        /// The question asked after the haystack.
        question: String,
    },
    /// A RULER-style task (`duo_tasks::ruler`); answers are generated without hints.
    Ruler(duo_tasks::RulerTask),
}

impl Task {
    /// `passkey` or `niah`.
    pub fn name(&self) -> &'static str {
        match self {
            Task::Passkey { .. } => "passkey",
            Task::Niah { .. } => "niah",
            Task::Ruler(t) => t.name(),
        }
    }
}

/// The standard needle (ALGORITHM.md §6).
pub const NEEDLE: &str = "Remember, the best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.";
/// The standard question.
pub const QUESTION: &str = "What is the best thing to do in San Francisco?";

/// A built prompt: what is prefilled, what the answer is.
#[derive(Debug, Clone, PartialEq)]
pub struct CellPrompt {
    /// Tokens prefilled before the answer.
    pub prompt: Vec<u32>,
    /// The expected answer's tokens.
    pub answer: Vec<u32>,
    /// Token ranges of the answer's words (into `answer`).
    pub word_spans: Vec<std::ops::Range<usize>>,
    /// The expected answer's words.
    pub words: Vec<String>,
}

/// One finished cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellResult {
    /// `passkey` or `niah`.
    pub task: String,
    /// Method name.
    pub method: EvalMethod,
    /// Context length in tokens (prompt plus answer).
    pub length: usize,
    /// Needle depth, a fraction of the haystack.
    pub depth: f64,
    /// Generation score in [0, 1].
    pub generation: f64,
    /// Teacher-forced top-1 accuracy of the answer tokens after the first.
    pub teacher_forced: f64,
    /// The generated text (after the hint).
    pub answer: String,
    /// The expected text (after the hint).
    pub expected: String,
    /// Peak KV bytes (retrieval + streaming).
    pub kv_bytes: usize,
    /// Peak KV bytes of full caches.
    pub kv_bytes_retrieval: usize,
    /// Peak KV bytes of streaming caches.
    pub kv_bytes_streaming: usize,
    /// Prefill wall time.
    pub prefill_seconds: f64,
}

/// Grid settings shared by every cell.
#[derive(Debug, Clone)]
pub struct Grid {
    /// The task.
    pub task: Task,
    /// Where needles hide.
    pub haystack: Haystack,
    /// Context lengths in tokens.
    pub lengths: Vec<usize>,
    /// Needle depths in [0, 1].
    pub depths: Vec<f64>,
    /// Answer words given in the prompt before free generation.
    pub hint_words: usize,
    /// Seed of prompt construction.
    pub seed: u64,
}

impl Grid {
    /// Checks lengths and depths against a model's context.
    pub fn validate(&self, context: usize) -> Result<()> {
        if self.lengths.is_empty() || self.depths.is_empty() {
            return Err(EvalError::Invalid("give at least one length and one depth".into()));
        }
        if let Some(l) = self.lengths.iter().find(|&&l| l > context || l < 64) {
            return Err(EvalError::Invalid(format!("length {l} must be between 64 and the model's context of {context}")));
        }
        if let Some(d) = self.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
            return Err(EvalError::Invalid(format!("depth {d} must be in [0, 1]")));
        }
        Ok(())
    }

    fn rng(&self, length: usize, depth: f64) -> StdRng {
        StdRng::seed_from_u64(self.seed ^ (length as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ depth.to_bits().rotate_left(17))
    }

    /// The prompt of a cell: the same for every method.
    pub fn prompt(&self, tok: &TextTokenizer, length: usize, depth: f64) -> Result<CellPrompt> {
        let mut rng = self.rng(length, depth);
        match &self.task {
            Task::Passkey { words } => {
                let spec = PasskeySpec { passkeys: 1, words: *words, depth_range: (depth, depth) };
                let s = spec.sample_at(tok, &self.haystack, length, &[depth], &mut rng)?;
                let a = &s.answers[0];
                let span = a.span();
                let word_spans = a.word_spans.iter().map(|r| r.start - span.start..r.end - span.start).collect();
                Ok(CellPrompt {
                    prompt: s.ids[..span.start].to_vec(),
                    answer: s.ids[span.clone()].to_vec(),
                    word_spans,
                    words: a.words.iter().map(|w| w.to_string()).collect(),
                })
            }
            Task::Niah { needle, question } => niah_prompt(tok, &self.haystack, needle, question, length, depth, &mut rng),
            Task::Ruler(t) => {
                let s = duo_tasks::ruler::build(*t, tok, &self.haystack, length, depth, &mut rng)?;
                Ok(CellPrompt { prompt: s.prompt, answer: s.answer, word_spans: s.answer_spans, words: s.answers })
            }
        }
    }
}

/// Needle prompt: haystack with the needle inserted after the sentence end nearest
/// before the depth, then the question and "Answer:"; the answer is the needle itself.
fn niah_prompt(tok: &TextTokenizer, haystack: &Haystack, needle: &str, question: &str, length: usize, depth: f64, rng: &mut StdRng) -> Result<CellPrompt> {
    let bos = tok.encode("", true)?;
    let needle_ids = tok.encode(&format!(" {needle}"), false)?;
    let question_ids = tok.encode(&format!("\n\nQuestion: {question}\nAnswer:"), false)?;
    let words: Vec<String> = needle.split_whitespace().map(str::to_string).collect();
    let mut answer = Vec::new();
    let mut word_spans = Vec::new();
    for w in &words {
        let ids = tok.encode(&format!(" {w}"), false)?;
        word_spans.push(answer.len()..answer.len() + ids.len());
        answer.extend(ids);
    }
    let fixed = bos.len() + needle_ids.len() + question_ids.len() + answer.len();
    if fixed + 16 > length {
        return Err(EvalError::Invalid(format!("length {length} cannot hold the needle, question and answer ({fixed} tokens)")));
    }
    let hay = haystack.tokens(tok, length - fixed, rng)?;
    let mut cut = ((depth * hay.len() as f64).round() as usize).min(hay.len());
    // Back up to just after a sentence end, at most 200 tokens.
    let floor = cut.saturating_sub(200);
    while cut > floor && cut < hay.len() && cut > 0 {
        let piece = tok.decode(&hay[cut - 1..cut])?;
        if piece.trim_end().ends_with('.') {
            break;
        }
        cut -= 1;
    }
    let mut prompt = bos;
    prompt.extend_from_slice(&hay[..cut]);
    prompt.extend_from_slice(&needle_ids);
    prompt.extend_from_slice(&hay[cut..]);
    prompt.extend_from_slice(&question_ids);
    Ok(CellPrompt { prompt, answer, word_spans, words })
}

/// Scores one cell with one method.
pub fn run_cell(runner: &Runner, grid: &Grid, method: EvalMethod, length: usize, depth: f64, cell: &CellPrompt) -> Result<CellResult> {
    // RULER's answers are generated unaided (a hint would give the first answers away).
    let hint = if matches!(grid.task, Task::Ruler(_)) { 0 } else { grid.hint_words.min(cell.words.len().saturating_sub(1)) };
    let hint_tokens = cell.word_spans.get(hint).map_or(cell.answer.len(), |r| r.start);
    let expected_words: Vec<&str> = cell.words[hint..].iter().map(String::as_str).collect();
    let gen_budget = cell.answer.len() - hint_tokens + 4;
    let mut kv = runner.new_sequence(cell.prompt.len() + cell.answer.len() + gen_budget)?;
    let t0 = Instant::now();
    let logits = runner.prefill(&cell.prompt, kv.as_mut(), |_| {})?;
    let prefill_seconds = t0.elapsed().as_secs_f64();

    // Teacher-forced, from a copy of the prefilled cache.
    let mut tf_kv = kv.fork()?;
    let scored = runner.score_after(tf_kv.as_mut(), &logits, &cell.answer)?;
    let after_first = &scored[1.min(scored.len())..];
    let teacher_forced = if after_first.is_empty() { 0.0 } else { after_first.iter().filter(|t| t.top1).count() as f64 / after_first.len() as f64 };

    // Free generation after the hint.
    let logits = if hint_tokens > 0 {
        runner.extend(kv.as_mut(), &cell.answer[..hint_tokens])?
    } else {
        logits
    };
    let generated = runner.greedy_after(kv.as_mut(), &logits, gen_budget)?;
    let text = runner.engine.tokenizer.decode(&generated)?;
    let expected = expected_words.join(" ");
    let generation = match grid.task {
        Task::Passkey { .. } => duo_tasks::score::passkey_match(&expected_words, &text),
        Task::Niah { .. } => duo_tasks::score::needle_recall(&expected, &text),
        Task::Ruler(_) => duo_tasks::ruler::match_all(&cell.words[hint..], &text),
    };
    let (a, b) = (kv.peak_bytes(), tf_kv.peak_bytes());
    let peak = if a.total() >= b.total() { a } else { b };
    Ok(CellResult {
        task: grid.task.name().into(),
        method,
        length,
        depth,
        generation,
        teacher_forced,
        answer: text,
        expected,
        kv_bytes: peak.total(),
        kv_bytes_retrieval: peak.retrieval,
        kv_bytes_streaming: peak.streaming,
        prefill_seconds,
    })
}
