//! [`Engine`]: a model loaded on a backend, with its tokenizer and chat template: what every
//! command and the server run (`Runner` for one sequence, `BatchEngine` for many).

use crate::backend::{self, Backend, Device};
use crate::error::Result;
use duo_core::config::ModelConfig;
use duo_model::{ChatTemplate, ModelFiles, ModelSource, TextTokenizer};
use std::path::PathBuf;

/// A model ready to run on one backend.
pub struct Engine {
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// Its chat template, if it ships one.
    pub template: Option<ChatTemplate>,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// What runs it.
    pub backend: Box<dyn Backend>,
    /// Grammar constraints for structured output, built on first use.
    constraints: std::sync::OnceLock<std::result::Result<crate::constraint::ConstraintFactory, String>>,
}

impl Engine {
    /// Opens `device` (first: a missing driver fails before any model file is read), then
    /// the model, and loads its weights onto the device.
    pub fn load(source: &ModelSource, device: Device) -> Result<Self> {
        let opened = backend::open(device)?;
        let f = ModelFiles::open(source)?;
        let backend = backend::load(opened, &f.checkpoint, f.config.clone())?;
        Ok(Self::assemble(f, backend))
    }

    /// [`Engine::load`] split by tensor parallelism over `shards` (opened by the caller,
    /// before any model file is read); `place` decides from the model's configuration (its
    /// pattern resolved against it) which GPU holds which KV heads.
    pub fn load_split(source: &ModelSource, shards: backend::Shards, place: impl FnOnce(&ModelConfig) -> Result<duo_core::placement::Placement>) -> Result<Self> {
        let f = ModelFiles::open(source)?;
        let placement = place(&f.config)?;
        let backend = backend::load_split(shards, placement, &f.checkpoint, f.config.clone())?;
        Ok(Self::assemble(f, backend))
    }

    fn assemble(f: ModelFiles, backend: Box<dyn Backend>) -> Self {
        Self { tokenizer: f.tokenizer, template: f.template, path: f.path, backend, constraints: Default::default() }
    }

    /// A fresh grammar constraint for structured output (the token trie is built on first use).
    pub fn constraint(&self, what: &crate::constraint::Structured) -> Result<crate::constraint::Constraint> {
        let factory = self.constraints.get_or_init(|| {
            let c = self.config();
            let eos = *c.eos_token_ids.first().ok_or("the model names no end-of-sequence token")?;
            crate::constraint::ConstraintFactory::new(&self.tokenizer, c.vocab_size, eos).map_err(|e| e.to_string())
        });
        match factory {
            Ok(f) => f.constraint(what),
            Err(e) => Err(crate::error::EngineError::Backend(format!("structured output is not available for this model: {e}"))),
        }
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        self.backend.config()
    }

    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }
}
