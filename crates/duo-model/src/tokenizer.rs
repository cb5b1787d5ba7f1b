//! Tokenizers: Hugging Face `tokenizer.json` through the `tokenizers` crate, and the two
//! vocabulary kinds GGUF files embed, rebuilt as `tokenizers` models:
//!
//! * `gpt2` — byte-level BPE with merges; the pre-tokenizer regex is chosen from
//!   `tokenizer.ggml.pre` (`smollm`/`gpt-2`, `llama-bpe`, `qwen2`);
//! * `llama` — SentencePiece BPE with scores: merges are derived from the scores (the
//!   higher the merged piece's score, the earlier the merge), with byte fallback and the
//!   `▁` space marker.

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, MetaValue};
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer plus the special tokens the engine needs.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// The same tokenizer with special tokens matched as plain text (for message contents).
    literal: Tokenizer,
    /// Start-of-sequence token, if the model uses one.
    pub bos_token: Option<(u32, String)>,
    /// End-of-sequence token.
    pub eos_token: Option<(u32, String)>,
    /// Whether a plain (non-chat) prompt starts with BOS.
    pub add_bos: bool,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("vocab", &self.inner.get_vocab_size(true)).finish()
    }
}

fn tk_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl TextTokenizer {
    fn assemble(inner: Tokenizer, bos_token: Option<(u32, String)>, eos_token: Option<(u32, String)>, add_bos: bool) -> Self {
        let mut literal = inner.clone();
        literal.set_encode_special_tokens(true);
        Self { inner, literal, bos_token, eos_token, add_bos }
    }

    /// Token ids of a rendered conversation: the template's pieces with its special markers
    /// recognised, message contents as plain text (a user who types `<|im_start|>` gets the
    /// characters, not the control token; Hugging Face's `split_special_tokens`).
    pub fn encode_chat(&self, pieces: &[crate::template::Piece]) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for p in pieces {
            let enc = match p {
                crate::template::Piece::Template(t) => self.inner.encode(t.as_str(), false),
                crate::template::Piece::Content(t) => self.literal.encode(t.as_str(), false),
            }
            .map_err(tk_err)?;
            ids.extend_from_slice(enc.get_ids());
        }
        Ok(ids)
    }

    /// The tokenizer in Hugging Face's `tokenizer.json` form (for grammar engines that need
    /// every token's bytes).
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(tk_err)
    }

    /// Encodes text; special-token text (`<|im_start|>`) becomes its token.
    /// Adds BOS first when `add_bos` is set and the text does not already start with it.
    pub fn encode(&self, text: &str, with_bos: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tk_err)?;
        let mut ids = enc.get_ids().to_vec();
        if with_bos && self.add_bos {
            if let Some((bos, _)) = &self.bos_token {
                if ids.first() != Some(bos) {
                    ids.insert(0, *bos);
                }
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tk_err)
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json`.
    pub fn save_json(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(tk_err)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The text of one token (for diagnostics).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// A word-level tokenizer over `words` (whitespace-split; token id = position in
    /// `words`; anything else becomes `unk`), with `bos` added to plain prompts. Built in
    /// memory: for tests and tools that need a tiny, exactly predictable vocabulary.
    pub fn word_level(words: &[&str], unk: &str, bos: &str) -> Result<Self> {
        let vocab: serde_json::Map<String, serde_json::Value> = words.iter().enumerate().map(|(i, w)| (w.to_string(), serde_json::json!(i))).collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": unk}
        });
        let inner: Tokenizer = json.to_string().parse().map_err(tk_err)?;
        let bos_token = inner.token_to_id(bos).map(|id| (id, bos.to_string()));
        if bos_token.is_none() {
            return Err(ModelError::Tokenizer(format!("`{bos}` is not one of the words")));
        }
        Ok(Self::assemble(inner, bos_token, None, true))
    }

    /// Loads `tokenizer.json` (and special tokens from `tokenizer_config.json`).
    pub fn from_hf_folder(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let token = |k: &str| -> Option<(u32, String)> {
            let s = match cfg.get(k)? {
                serde_json::Value::String(s) => s.clone(),
                v => v.get("content")?.as_str()?.to_string(),
            };
            Some((inner.token_to_id(&s)?, s))
        };
        let add_bos = cfg.get("add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);
        let (bos, eos) = (token("bos_token"), token("eos_token"));
        Ok(Self::assemble(inner, bos, eos, add_bos))
    }

    /// Rebuilds the tokenizer embedded in a GGUF file.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let strings = |key: &str| -> Result<Vec<String>> {
            let arr = g.meta(key).and_then(MetaValue::as_array).ok_or_else(|| ModelError::Tokenizer(format!("GGUF has no `{key}` array")))?;
            arr.iter().map(|v| v.as_str().map(str::to_owned).ok_or_else(|| ModelError::Tokenizer(format!("`{key}` holds a non-string")))).collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<u64> = g
            .meta("tokenizer.ggml.token_type")
            .and_then(MetaValue::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_else(|| vec![1; tokens.len()]);
        let kind = g.meta("tokenizer.ggml.model").and_then(MetaValue::as_str).unwrap_or("");
        let mut tok = match kind {
            "gpt2" => {
                let merges = strings("tokenizer.ggml.merges")?;
                let pre = g.meta("tokenizer.ggml.pre").and_then(MetaValue::as_str).unwrap_or("default");
                gpt2_tokenizer(&tokens, &merges, pre)?
            }
            "llama" => {
                let scores: Vec<f64> = g
                    .meta("tokenizer.ggml.scores")
                    .and_then(MetaValue::as_array)
                    .ok_or_else(|| ModelError::Tokenizer("SentencePiece vocabulary without scores".into()))?
                    .iter()
                    .map(|v| v.as_f64().unwrap_or(0.0))
                    .collect();
                spm_tokenizer(&tokens, &scores, &types)?
            }
            other => return Err(ModelError::Unsupported(format!("tokenizer model `{other}` (supported: gpt2, llama)"))),
        };
        // Control (3) and user-defined (4) tokens are matched as whole strings.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(s, &t)| AddedToken::from(s.clone(), t == 3))
            .collect();
        tok.add_special_tokens(specials).map_err(tk_err)?;
        let id = |k: &str| g.meta(k).and_then(MetaValue::as_u64).map(|v| v as u32).and_then(|i| tokens.get(i as usize).map(|s| (i, s.clone())));
        let add_bos = g
            .meta("tokenizer.ggml.add_bos_token")
            .map(|v| matches!(v, MetaValue::Bool(true)))
            .unwrap_or(kind == "llama");
        let (bos, eos) = (id("tokenizer.ggml.bos_token_id"), id("tokenizer.ggml.eos_token_id"));
        Ok(Self::assemble(tok, bos, eos, add_bos))
    }
}

fn vocab_map(tokens: &[String]) -> tokenizers::models::bpe::Vocab {
    // Later duplicates must not shadow earlier ids.
    let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(i as u32);
    }
    vocab
}

fn gpt2_tokenizer(tokens: &[String], merges: &[String], pre: &str) -> Result<Tokenizer> {
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| ModelError::Tokenizer(format!("merge `{m}` is not two tokens"))))
        .collect::<Result<_>>()?;
    let bpe = BPE::builder().vocab_and_merges(vocab_map(tokens), merges).build().map_err(tk_err)?;
    let mut tok = Tokenizer::new(bpe);
    let pre_tok: PreTokenizerWrapper = match pre {
        "smollm" => PreSequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
        "gpt-2" | "gpt2" | "default" => ByteLevel::new(false, true, true).into(),
        "llama-bpe" | "llama3" | "qwen2" => {
            let re = if pre == "qwen2" { QWEN2_REGEX } else { LLAMA3_REGEX };
            let split = Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false).map_err(tk_err)?;
            PreSequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
        }
        other => return Err(ModelError::Unsupported(format!("GGUF pre-tokenizer `{other}` (supported: smollm, gpt-2, llama-bpe, qwen2)"))),
    };
    tok.with_pre_tokenizer(Some(pre_tok));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tok)
}

fn spm_tokenizer(tokens: &[String], scores: &[f64], types: &[u64]) -> Result<Tokenizer> {
    if scores.len() != tokens.len() {
        return Err(ModelError::Tokenizer(format!("{} scores for {} tokens", scores.len(), tokens.len())));
    }
    let vocab = vocab_map(tokens);
    // Every split of a normal piece into two pieces of the vocabulary is a merge;
    // SentencePiece applies the merge whose result scores highest first.
    let mut merges: Vec<(f64, u32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types.get(id).copied().unwrap_or(1) != 1 {
            continue;
        }
        let chars: Vec<usize> = piece.char_indices().map(|(i, _)| i).skip(1).collect();
        for &cut in &chars {
            if let (Some(&a), Some(&b)) = (vocab.get(&piece[..cut]), vocab.get(&piece[cut..])) {
                merges.push((scores[id], a, b, id as u32));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.3.cmp(&y.3)).then(x.1.cmp(&y.1)));
    let merges: Vec<(String, String)> = merges.into_iter().map(|(_, a, b, _)| (tokens[a as usize].clone(), tokens[b as usize].clone())).collect();
    let unk = tokens.iter().position(|t| t == "<unk>").map(|_| "<unk>".to_string());
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(u) = unk {
        builder = builder.unk_token(u);
    }
    let mut tok = Tokenizer::new(builder.build().map_err(tk_err)?);
    let norm: Vec<NormalizerWrapper> = vec![Prepend::new("▁".into()).into(), Replace::new(" ", "▁").map_err(tk_err)?.into()];
    tok.with_normalizer(Some(tokenizers::normalizers::Sequence::new(norm))).map_err(tk_err)?;
    let dec: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ").map_err(tk_err)?.into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
        Strip::new(' ', 1, 0).into(),
    ];
    tok.with_decoder(Some(DecoderSequence::new(dec)));
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spm_vocabulary_merges_by_score_with_byte_fallback() {
        // A tiny SentencePiece vocabulary: <unk>, <s>, </s>, 256 byte tokens, pieces.
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2u64, 3, 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
        }
        for p in ["▁", "h", "e", "l", "o", "▁h", "he", "ll", "▁he", "llo", "▁hello"] {
            tokens.push(p.into());
            types.push(1);
        }
        let scores: Vec<f64> = (0..tokens.len()).map(|i| if i < 259 { 0.0 } else { i as f64 }).collect();
        let tok = spm_tokenizer(&tokens, &scores, &types).unwrap();
        let id = |s: &str| tokens.iter().position(|t| t == s).unwrap() as u32;
        let enc = tok.encode("hello", false).unwrap();
        assert_eq!(enc.get_ids(), &[id("▁hello")]);
        // "hex": "▁he" + "x" (not in vocab -> byte fallback 0x78).
        let enc = tok.encode("hex", false).unwrap();
        assert_eq!(enc.get_ids(), &[id("▁he"), id("<0x78>")]);
        let text = tok.decode(enc.get_ids(), true).unwrap();
        assert_eq!(text, "hex");
    }

    #[test]
    fn gpt2_vocabulary_with_smollm_digits() {
        // Byte-level BPE: "Ġ" is the byte-level space. Digits are split one by one.
        let tokens: Vec<String> = ["a", "b", "Ġ", "1", "2", "ab", "Ġab", "12"].iter().map(|s| s.to_string()).collect();
        let merges: Vec<String> = ["a b", "Ġ ab", "1 2"].iter().map(|s| s.to_string()).collect();
        let tok = gpt2_tokenizer(&tokens, &merges, "smollm").unwrap();
        let enc = tok.encode("ab ab12", false).unwrap();
        // "12" must not merge: the smollm pre-tokenizer isolates each digit.
        assert_eq!(enc.get_ids(), &[5, 6, 3, 4]);
        let plain = gpt2_tokenizer(&tokens, &merges, "gpt-2").unwrap();
        assert_eq!(plain.encode("ab12", false).unwrap().get_ids(), &[5, 7]);
        assert_eq!(tok.decode(&[5, 6, 3, 4], true).unwrap(), "ab ab12");
        assert!(gpt2_tokenizer(&tokens, &merges, "mystery").is_err());
    }
}
