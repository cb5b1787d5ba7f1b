//! Turning sampled tokens into streamed text: stop strings are cut, and text is handed
//! out only once it can no longer change (a partial UTF-8 character, or a tail that may
//! still become a stop string, is held back). `duo generate` and the server share it, so
//! both stream exactly the same text.

use crate::error::Result;
use duo_model::TextTokenizer;

/// What one new token did to the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextStep {
    /// Newly stable text (may be empty).
    pub delta: String,
    /// A stop string appeared: the text is final (the stop string cut).
    pub stopped: bool,
}

/// The text of a completion as its tokens arrive.
#[derive(Debug, Clone)]
pub struct TextStream {
    stop: Vec<String>,
    tokens: Vec<u32>,
    text: String,
    emitted: usize,
}

impl TextStream {
    /// A stream that stops at any of `stop`.
    pub fn new(stop: Vec<String>) -> Self {
        Self { stop, tokens: Vec::new(), text: String::new(), emitted: 0 }
    }

    /// Adds one token and returns the text that became stable.
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<TextStep> {
        self.tokens.push(id);
        self.text = tokenizer.decode(&self.tokens)?;
        if let Some(cut) = self.stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.text.truncate(cut);
            let delta = self.take_rest();
            return Ok(TextStep { delta, stopped: true });
        }
        let hold = self.stop.iter().map(|s| longest_prefix_suffix(&self.text, s)).max().unwrap_or(0);
        let mut stable = self.text.len() - hold;
        while stable > self.emitted && (!self.text.is_char_boundary(stable) || self.text[..stable].ends_with('\u{FFFD}')) {
            stable -= 1;
        }
        let mut delta = String::new();
        if stable > self.emitted {
            delta = self.text[self.emitted..stable].to_string();
            self.emitted = stable;
        }
        Ok(TextStep { delta, stopped: false })
    }

    /// Hands out whatever is still held back (at the end of generation).
    pub fn take_rest(&mut self) -> String {
        let start = self.emitted.min(self.text.len());
        let rest = self.text[start..].to_string();
        self.emitted = self.text.len();
        rest
    }

    /// The whole text so far (stop string cut).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Tokens pushed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .find(|&n| n <= text.len() && text.is_char_boundary(text.len() - n) && stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_prefix_hold_back() {
        assert_eq!(longest_prefix_suffix("hello wor", "world"), 3);
        assert_eq!(longest_prefix_suffix("hello", "xyz"), 0);
        assert_eq!(longest_prefix_suffix("ab", "abc"), 2);
    }
}
