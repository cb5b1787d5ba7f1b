//! Structured output: generation constrained to a grammar (OpenAI's `response_format`
//! `json_object` and `json_schema`) through llguidance. Before each sampled token the
//! constraint sets every token the grammar cannot accept next to `-inf`; after it, the
//! constraint advances by the chosen token. When the grammar is complete only
//! end-of-sequence remains allowed, so the text ends exactly at the end of the JSON value.
//!
//! The grammar engine needs each token's bytes: they come from the model's own tokenizer
//! (serialised to its `tokenizer.json` form, whatever file it was loaded from).

use crate::error::{EngineError, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;

/// What the output must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Structured {
    /// Any JSON object.
    JsonObject,
    /// A JSON value matching this JSON Schema (its text).
    JsonSchema(String),
}

impl Structured {
    fn grammar(&self) -> Result<TopLevelGrammar> {
        let schema = match self {
            Structured::JsonObject => serde_json::json!({"type": "object"}),
            Structured::JsonSchema(text) => serde_json::from_str(text).map_err(|e| bad(format!("the JSON schema is not JSON: {e}")))?,
        };
        Ok(TopLevelGrammar::from_json_schema(schema))
    }
}

fn bad(reason: String) -> EngineError {
    EngineError::InvalidParameter { name: "response_format", reason }
}

/// Builds constraints for one model's vocabulary (the token trie is built once).
pub struct ConstraintFactory {
    factory: Arc<ParserFactory>,
}

impl ConstraintFactory {
    /// For `tokenizer`'s tokens in a model of `vocab_size` ids ending turns with `eos`.
    pub fn new(tokenizer: &duo_model::TextTokenizer, vocab_size: usize, eos: u32) -> Result<Self> {
        let json: serde_json::Value = serde_json::from_str(&tokenizer.to_json()?).map_err(|e| EngineError::Backend(format!("the tokenizer's JSON: {e}")))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| EngineError::Backend(format!("token bytes: {e}")))?;
        words.resize(vocab_size.max(words.len()), Vec::new());
        let trie = TokTrie::from(&TokRxInfo::new(words.len() as u32, eos), &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| EngineError::Backend(format!("grammar engine: {e}")))?;
        factory.quiet();
        Ok(Self { factory: Arc::new(factory) })
    }

    /// A fresh constraint for `what`; an invalid schema is an error naming `response_format`.
    pub fn constraint(&self, what: &Structured) -> Result<Constraint> {
        let parser = self.factory.create_parser(what.grammar()?).map_err(|e| bad(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(bad(e));
        }
        Ok(Constraint { matcher })
    }
}

/// One generation's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Self { matcher: self.matcher.deep_clone() }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    /// Sets the logits of tokens the grammar does not allow next to `-inf`.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| EngineError::Backend(format!("grammar: {e}")))?;
        for (id, l) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(id as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances over the chosen token.
    pub fn advance(&mut self, token: u32) -> Result<()> {
        if self.matcher.is_stopped() {
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| EngineError::Backend(format!("grammar: {e}")))
    }
}
