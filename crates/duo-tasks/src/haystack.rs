//! The text that needles hide in.
//!
//! Either a folder of `.txt` files (the standard needle test uses essays; evaluation reads
//! them from wherever the user keeps them) or duo's own generator: seeded, grammatical
//! but aimless prose about an invented river town, so that identification and the demo
//! need no downloaded corpus. The generator's word lists and templates are duo's own.

use crate::{Result, TaskError};
use duo_model::TextTokenizer;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use std::path::{Path, PathBuf};

/// A source of filler text.
#[derive(Debug, Clone)]
pub enum Haystack {
    /// duo's seeded prose generator.
    Generated,
    /// The concatenated `.txt` files of a folder, in file-name order.
    Corpus {
        /// Where the text came from.
        dir: PathBuf,
        /// The whole text.
        text: String,
    },
}

impl Haystack {
    /// Reads every `.txt` file of `dir` (sorted by name) and joins them with blank lines.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TaskError::Io { path, source }
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "txt"))
            .collect();
        files.sort();
        let mut text = String::new();
        for f in &files {
            let t = std::fs::read_to_string(f).map_err(io(f))?;
            let t = t.trim();
            if !t.is_empty() {
                if !text.is_empty() {
                    text.push_str("\n\n");
                }
                text.push_str(t);
            }
        }
        if text.is_empty() {
            return Err(TaskError::EmptyHaystack(dir.to_path_buf()));
        }
        Ok(Haystack::Corpus { dir: dir.to_path_buf(), text })
    }

    /// A short name for reports: `generated` or the folder.
    pub fn describe(&self) -> String {
        match self {
            Haystack::Generated => "generated".into(),
            Haystack::Corpus { dir, .. } => dir.display().to_string(),
        }
    }

    /// Exactly `n` tokens of filler (no BOS). Generated text is new for every draw of
    /// `rng`; a corpus is read from a random starting paragraph, wrapping around.
    pub fn tokens(&self, tokenizer: &TextTokenizer, n: usize, rng: &mut StdRng) -> Result<Vec<u32>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut chars = n * 6;
        loop {
            let text = match self {
                Haystack::Generated => generate_prose(chars, rng),
                Haystack::Corpus { text, .. } => corpus_window(text, chars, rng),
            };
            let mut ids = tokenizer.encode(&text, false)?;
            if ids.len() >= n {
                ids.truncate(n);
                return Ok(ids);
            }
            chars *= 2;
        }
    }
}

/// `chars` characters of the corpus from a random paragraph start, repeating the corpus
/// as often as needed.
fn corpus_window(text: &str, chars: usize, rng: &mut StdRng) -> String {
    let starts: Vec<usize> =
        std::iter::once(0).chain(text.match_indices("\n\n").map(|(i, _)| i + 2)).filter(|&i| i < text.len()).collect();
    let start = starts[rng.gen_range(0..starts.len())];
    let mut out = String::with_capacity(chars + 64);
    let mut piece = &text[start..];
    while out.len() < chars {
        out.push_str(piece);
        out.push_str("\n\n");
        piece = text;
    }
    out
}

const NAMES: &[&str] = &[
    "Maren", "Tobias", "Ilse", "Corwin", "Odile", "Bram", "Sefa", "Lorcan", "Wren", "Emmet", "Talia", "Isak",
    "Petra", "Anselm", "Noor", "Gideon",
];
const PLACES: &[&str] = &[
    "the ferry landing", "the old mill", "the covered market", "the chapel on the hill", "the boatyard",
    "the reading room", "the orchard", "the tannery lane", "the lock gates", "the bakery by the bridge",
    "the schoolhouse", "the salt warehouse",
];
const THINGS: &[&str] = &[
    "a ledger of river tolls", "a basket of pears", "a broken lantern", "a map of the marshes", "a bundle of letters",
    "a copper kettle", "a set of brass weights", "a coil of tarred rope", "a box of seed potatoes",
    "a fiddle with two strings", "a jar of honey", "a sketch of the weir",
];
const VERBS: &[&str] = &[
    "carried", "mended", "counted", "sold", "borrowed", "painted", "returned", "weighed", "hid", "described",
    "forgot", "admired",
];
const TIMES: &[&str] = &[
    "early in the morning", "after the spring floods", "on market day", "before the frost", "late one evening",
    "during the harvest", "while the bells rang", "in the dry summer", "at the turn of the tide", "on a grey afternoon",
];
const FEELINGS: &[&str] = &[
    "patient", "restless", "cheerful", "doubtful", "stubborn", "generous", "tired", "curious", "careful", "proud",
];
const REMARKS: &[&str] = &[
    "Nobody in town could agree on why this mattered.",
    "The council wrote it down and then lost the page.",
    "It rained, as it usually did, and the river rose a little.",
    "Children followed along, asking questions nobody answered.",
    "Later the story was told differently at every table.",
    "The price of bread did not change that week.",
    "A barge passed slowly, loaded with timber from upstream.",
    "The gulls were louder than usual.",
];

/// Seeded prose of at least `chars` characters, in paragraphs of four to seven sentences.
fn generate_prose(chars: usize, rng: &mut StdRng) -> String {
    let mut out = String::with_capacity(chars + 256);
    while out.len() < chars {
        let sentences = rng.gen_range(4..8);
        for s in 0..sentences {
            if s > 0 {
                out.push(' ');
            }
            out.push_str(&sentence(rng));
        }
        out.push_str("\n\n");
    }
    out
}

fn pick<'a>(rng: &mut StdRng, list: &[&'a str]) -> &'a str {
    list.choose(rng).copied().unwrap_or_default()
}

fn sentence(rng: &mut StdRng) -> String {
    let (a, b) = (pick(rng, NAMES), pick(rng, NAMES));
    match rng.gen_range(0..6) {
        0 => format!("{a} {} {} near {} {}.", pick(rng, VERBS), pick(rng, THINGS), pick(rng, PLACES), pick(rng, TIMES)),
        1 => format!("{} {a} and {b} met at {} and talked about {}.", capitalise(pick(rng, TIMES)), pick(rng, PLACES), pick(rng, THINGS)),
        2 => format!("{a} was {} that day, and {b} noticed it at once.", pick(rng, FEELINGS)),
        3 => format!("At {} there was {}, which {a} {} twice.", pick(rng, PLACES), pick(rng, THINGS), pick(rng, VERBS)),
        4 => pick(rng, REMARKS).to_string(),
        _ => format!("{a} said that {} had been {} ever since {b} {} {}.", pick(rng, PLACES), pick(rng, FEELINGS_PLACE), pick(rng, VERBS), pick(rng, THINGS)),
    }
}

const FEELINGS_PLACE: &[&str] = &["quieter", "busier", "colder", "cleaner", "stranger", "more crowded"];

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn generated_prose_is_seeded_and_long_enough() {
        let a = generate_prose(5000, &mut StdRng::seed_from_u64(7));
        let b = generate_prose(5000, &mut StdRng::seed_from_u64(7));
        let c = generate_prose(5000, &mut StdRng::seed_from_u64(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.len() >= 5000);
        assert!(a.contains("\n\n"));
    }

    #[test]
    fn corpus_windows_start_at_paragraphs_and_wrap() {
        let text = "alpha one\n\nbeta two\n\ngamma three";
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..20 {
            let w = corpus_window(text, 100, &mut rng);
            assert!(w.starts_with("alpha") || w.starts_with("beta") || w.starts_with("gamma"), "{w}");
            assert!(w.len() >= 100);
        }
    }

    #[test]
    fn empty_folder_is_an_error() {
        let dir = std::env::temp_dir().join(format!("duo-empty-haystack-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        assert!(matches!(Haystack::from_dir(&dir), Err(TaskError::EmptyHaystack(_))));
        std::fs::remove_dir_all(&dir).ok();
    }
}
