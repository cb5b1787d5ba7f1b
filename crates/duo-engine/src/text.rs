//! Turning sampled tokens into streamed text: stop strings are cut, and text is handed
//! out only once it can no longer change (a partial UTF-8 character, or a tail that may
//! still become a stop string, is held back). `duo generate` and the server share it, so
//! both stream exactly the same text.
//!
//! Decoding is incremental, so a long completion costs the same per token as a short one:
//! only the tokens since the last complete piece of text are decoded again, together with
//! the piece before them (`prefix_offset..read_offset`), because tokenizers decode a token
//! differently at the start of a text (a SentencePiece word marker loses its space).

use crate::error::Result;
use crate::session::FinishReason;
use duo_model::TextTokenizer;

/// What one new token did to the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextStep {
    /// Newly stable text (may be empty).
    pub delta: String,
    /// A stop string appeared: the text is final (the stop string cut).
    pub stopped: bool,
}

/// What a sampled token did to a completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Newly stable text; `None` for an end-of-sequence token, which is not part of the
    /// completion.
    pub delta: Option<String>,
    /// Set when the completion ends with this token.
    pub finish: Option<FinishReason>,
}

/// The text of a completion as its tokens arrive.
#[derive(Debug, Clone)]
pub struct TextStream {
    stop: Vec<String>,
    tokens: Vec<u32>,
    /// Decoded text of `tokens[..read_offset]` (stop string cut once found).
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    /// Tokens before this one are in `text` and are not decoded again.
    prefix_offset: usize,
    /// Tokens before this one are in `text`.
    read_offset: usize,
    /// A stop string was found; the text is final.
    stopped: bool,
}

impl TextStream {
    /// A stream that stops at any of `stop`.
    pub fn new(stop: Vec<String>) -> Self {
        Self { stop, tokens: Vec::new(), text: String::new(), emitted: 0, prefix_offset: 0, read_offset: 0, stopped: false }
    }

    /// Takes one sampled token: an end-of-sequence token ends the completion; any other is
    /// added, and the completion ends at a stop string or after `max_tokens` tokens. The
    /// one decision shared by `duo generate` and the batching engine.
    pub fn accept(&mut self, tokenizer: &TextTokenizer, id: u32, eos: &[u32], max_tokens: usize) -> Result<Accepted> {
        if eos.contains(&id) {
            return Ok(Accepted { delta: None, finish: Some(FinishReason::Stop) });
        }
        let step = self.push(tokenizer, id)?;
        let finish = if step.stopped {
            Some(FinishReason::Stop)
        } else if self.tokens.len() >= max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        Ok(Accepted { delta: Some(step.delta), finish })
    }

    /// Adds one token and returns the text that became stable.
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<TextStep> {
        self.tokens.push(id);
        self.decode_new(tokenizer, false)?;
        if let Some(cut) = self.stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.text.truncate(cut);
            self.stopped = true;
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

    /// Appends the text of the tokens since `read_offset` once it is complete (does not end
    /// in a partial character), or unconditionally with `flush`.
    fn decode_new(&mut self, tokenizer: &TextTokenizer, flush: bool) -> Result<()> {
        if self.read_offset == self.tokens.len() {
            return Ok(());
        }
        let before = tokenizer.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let now = tokenizer.decode(&self.tokens[self.prefix_offset..])?;
        let complete = now.len() > before.len() && !now.ends_with('\u{FFFD}');
        if !(complete || flush) {
            return Ok(());
        }
        match now.strip_prefix(before.as_str()) {
            Some(new) => self.text.push_str(new),
            // A tokenizer whose text of a window is not a prefix of the longer window's:
            // decode everything (correct, just slower).
            None => self.text = tokenizer.decode(&self.tokens)?,
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        Ok(())
    }

    /// Hands out whatever is still held back (at the end of generation).
    pub fn finish(&mut self, tokenizer: &TextTokenizer) -> Result<String> {
        if !self.stopped {
            self.decode_new(tokenizer, true)?;
        }
        Ok(self.take_rest())
    }

    /// Hands out the stable text not yet handed out.
    fn take_rest(&mut self) -> String {
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
