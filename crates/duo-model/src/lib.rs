//! Loading and running Llama-family models: checkpoints (GGUF, Hugging Face
//! safetensors folders), tokenizers, chat templates, the default model, and the
//! forward pass.
//!
//! ```no_run
//! use duo_model::{LoadedModel, ModelSource};
//! let m = LoadedModel::load(&ModelSource::Default).unwrap();
//! let ids = m.tokenizer.encode("Hello", true).unwrap();
//! assert!(!ids.is_empty());
//! ```

pub mod budget;
pub mod checkpoint;
pub mod error;
pub mod fetch;
pub mod gguf;
pub mod hub;
pub mod llama;
pub mod random;
pub mod template;
pub mod tokenizer;

pub use checkpoint::Checkpoint;
pub use error::{ModelError, Result};
pub use llama::{Logits, Model};
pub use template::{ChatTemplate, Message, Piece};
pub use tokenizer::TextTokenizer;

use std::path::PathBuf;

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// The default model (SmolLM2-135M-Instruct Q4_1), fetched on first use.
    Default,
    /// A GGUF file or a Hugging Face folder.
    Path(PathBuf),
    /// A model on the Hugging Face hub, downloaded on first use.
    Hub(hub::HubModel),
}

impl std::str::FromStr for ModelSource {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(spec) = s.strip_prefix("hf:") {
            return Ok(ModelSource::Hub(hub::HubModel::parse(spec)?));
        }
        Ok(ModelSource::Path(PathBuf::from(s)))
    }
}

impl ModelSource {
    /// The local file or folder, fetching the default model or a hub model first.
    pub fn local_path(&self) -> Result<PathBuf> {
        match self {
            ModelSource::Default => fetch::default_model(),
            ModelSource::Path(p) => Ok(p.clone()),
            ModelSource::Hub(h) => h.download(),
        }
    }
}

/// An opened checkpoint with its configuration, tokenizer and chat template, before any
/// weight is loaded: what every backend loads its weights from.
pub struct ModelFiles {
    /// The weights, not yet read.
    pub checkpoint: Checkpoint,
    /// The resolved configuration.
    pub config: duo_core::config::ModelConfig,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// Its chat template, if it ships one.
    pub template: Option<ChatTemplate>,
    /// Where it was loaded from.
    pub path: PathBuf,
}

impl ModelFiles {
    /// Opens a model (fetching the default or a hub model first), reads its configuration,
    /// rebuilds its tokenizer and compiles its chat template.
    pub fn open(source: &ModelSource) -> Result<Self> {
        let path = source.local_path()?;
        let checkpoint = Checkpoint::open(&path)?;
        let config = checkpoint.config()?;
        let tokenizer = checkpoint.tokenizer()?;
        let template = match checkpoint.chat_template()? {
            Some(src) => {
                let name = |t: &Option<(u32, String)>| t.as_ref().map(|t| t.1.clone()).unwrap_or_default();
                Some(ChatTemplate::new(&src, &name(&tokenizer.bos_token), &name(&tokenizer.eos_token))?)
            }
            None => None,
        };
        Ok(Self { checkpoint, config, tokenizer, template, path })
    }
}

/// A model with its tokenizer and chat template, loaded for the CPU.
pub struct LoadedModel {
    /// The network.
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// Its chat template, if it ships one.
    pub template: Option<ChatTemplate>,
    /// Where it was loaded from.
    pub path: PathBuf,
}

impl LoadedModel {
    /// Loads a model, its tokenizer and its chat template.
    pub fn load(source: &ModelSource) -> Result<Self> {
        let f = ModelFiles::open(source)?;
        let model = Model::load(&f.checkpoint, f.config)?;
        Ok(Self { model, tokenizer: f.tokenizer, template: f.template, path: f.path })
    }
}
