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
}

impl Engine {
    /// Opens `device` (first: a missing driver fails before any model file is read), then
    /// the model, and loads its weights onto the device.
    pub fn load(source: &ModelSource, device: Device) -> Result<Self> {
        let opened = backend::open(device)?;
        let f = ModelFiles::open(source)?;
        let backend = backend::load(opened, &f.checkpoint, f.config)?;
        Ok(Self { tokenizer: f.tokenizer, template: f.template, path: f.path, backend })
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
