//! Models from the Hugging Face hub: `--model hf:ORG/NAME[@REVISION][:FILE.gguf]`.
//!
//! Downloads go through the `hf-hub` crate, so files land in the standard hub cache
//! (`$HF_HOME/hub`, else `~/.cache/huggingface/hub`), are shared with Python tools, and
//! are fetched only once; `HF_ENDPOINT` and a saved token are honoured. A repository is
//! either a safetensors folder (`config.json`, `tokenizer.json`, `tokenizer_config.json`,
//! one `model.safetensors` or the shards listed in `model.safetensors.index.json`) or,
//! when a `.gguf` file is named, that single file.

use crate::error::{ModelError, Result};
use std::path::PathBuf;

/// A model on the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    /// `ORG/NAME`.
    pub repo: String,
    /// Branch, tag or commit (`main` when not given).
    pub revision: String,
    /// A single GGUF file inside the repository, if one is named.
    pub gguf: Option<String>,
}

impl HubModel {
    /// Parses `ORG/NAME[@REVISION][:FILE.gguf]` (without the `hf:` prefix).
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |why: &str| ModelError::Fetch(format!("`hf:{spec}`: {why}; expected hf:ORG/NAME[@REVISION][:FILE.gguf]"));
        let (repo_rev, gguf) = match spec.split_once(':') {
            Some((r, f)) if f.ends_with(".gguf") && !f.contains("..") => (r, Some(f.to_string())),
            Some(_) => return Err(bad("only a .gguf file may be named after `:`")),
            None => (spec, None),
        };
        let (repo, revision) = match repo_rev.split_once('@') {
            Some((_, v)) if v.split('/').any(|p| p.is_empty() || p == "." || p == "..") => return Err(bad("bad revision")),
            Some((r, v)) => (r, v.to_string()),
            None => (repo_rev, "main".to_string()),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        let valid = |p: &str| !p.is_empty() && p != "." && p != ".." && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if parts.len() != 2 || !parts.iter().all(|p| valid(p)) {
            return Err(bad("the repository must be ORG/NAME"));
        }
        Ok(Self { repo: repo.to_string(), revision, gguf })
    }

    /// Downloads what the model needs (skipping files already cached) and returns the
    /// local path to load: the GGUF file, or the snapshot folder.
    pub fn download(&self) -> Result<PathBuf> {
        use hf_hub::{api::sync::ApiBuilder, Repo, RepoType};
        let mut builder = ApiBuilder::from_env().with_progress(true);
        // from_env reads a token saved by `huggingface-cli login`; HF_TOKEN overrides it.
        if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
            builder = builder.with_token(Some(token));
        }
        let api = builder.build().map_err(|e| ModelError::Fetch(format!("hub client: {e}")))?;
        let repo = api.repo(Repo::with_revision(self.repo.clone(), RepoType::Model, self.revision.clone()));
        let get = |file: &str| {
            repo.get(file).map_err(|e| {
                ModelError::Fetch(format!(
                    "hf:{}@{}: could not get `{file}` ({e}); check the name, the network, or HF_TOKEN for gated models",
                    self.repo, self.revision
                ))
            })
        };
        if let Some(file) = &self.gguf {
            return get(file);
        }
        let config = get("config.json")?;
        get("tokenizer.json")?;
        get("tokenizer_config.json")?;
        match get("model.safetensors.index.json") {
            Ok(index) => {
                for shard in shard_names(&index)? {
                    get(&shard)?;
                }
            }
            // No index: a single-file checkpoint. If that fails too, both reasons are shown.
            Err(no_index) => {
                get("model.safetensors").map_err(|e| ModelError::Fetch(format!("{e}; and {no_index}")))?;
            }
        }
        config
            .parent()
            .map(PathBuf::from)
            .ok_or_else(|| ModelError::Fetch(format!("hf:{}: cached file has no folder", self.repo)))
    }
}

/// The distinct shard files named by a `model.safetensors.index.json`.
fn shard_names(index: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io { path: index.into(), source })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::Malformed { path: index.into(), reason: e.to_string() })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Malformed { path: index.into(), reason: "no `weight_map` object".into() })?;
    let mut names: Vec<String> = Vec::new();
    for f in map.values() {
        let f = f
            .as_str()
            .filter(|f| f.ends_with(".safetensors") && !f.contains('/') && !f.contains(".."))
            .ok_or_else(|| ModelError::Malformed { path: index.into(), reason: format!("bad shard name {f}") })?;
        if !names.iter().any(|n| n == f) {
            names.push(f.to_string());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repo_revision_and_file() {
        let m = HubModel::parse("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
        assert_eq!((m.repo.as_str(), m.revision.as_str(), m.gguf), ("HuggingFaceTB/SmolLM2-135M-Instruct", "main", None));
        let m = HubModel::parse("org/name@v1.0:model-q4_0.gguf").unwrap();
        assert_eq!((m.revision.as_str(), m.gguf.as_deref()), ("v1.0", Some("model-q4_0.gguf")));
        assert_eq!(HubModel::parse("org/name@refs/pr/1").unwrap().revision, "refs/pr/1");
        for bad in ["", "justname", "a/b/c", "../x", "a/..", "a/b@", "a/b@../../x", "a/b:weights.bin", "a/b:../x.gguf", "a b/c"] {
            assert!(HubModel::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn unreachable_hub_is_a_clear_error() {
        // Port 9 on loopback refuses connections: the same path as being offline.
        let dir = std::env::temp_dir().join(format!("duo-hub-test-{}", std::process::id()));
        std::env::set_var("HF_HOME", &dir);
        std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
        let err = HubModel::parse("org/name").unwrap().download().unwrap_err().to_string();
        assert!(err.contains("hf:org/name@main") && err.contains("config.json"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn shard_names_are_deduplicated_and_checked() {
        let dir = std::env::temp_dir().join(format!("duo-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("index.json");
        std::fs::write(&p, r#"{"weight_map":{"a":"m-1.safetensors","b":"m-2.safetensors","c":"m-1.safetensors"}}"#).unwrap();
        assert_eq!(shard_names(&p).unwrap(), vec!["m-1.safetensors", "m-2.safetensors"]);
        std::fs::write(&p, r#"{"weight_map":{"a":"../../etc/passwd.safetensors"}}"#).unwrap();
        assert!(shard_names(&p).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
