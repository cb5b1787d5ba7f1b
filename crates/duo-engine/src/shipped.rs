//! The head patterns shipped for the default model (SmolLM2-135M-Instruct), compiled into the
//! binary so that an installed or copied `duo` has them wherever it runs. Made by
//! `duo identify` (see `patterns/SmolLM2-135M-Instruct/README.md`).

use crate::error::Result;
use duo_core::pattern::{HeadGates, Layout};
use std::path::Path;

const HEAD_TABLE: &str = include_str!("../../../patterns/SmolLM2-135M-Instruct/head/full_attention_heads.tsv");
const HEAD_CONFIG: &str = include_str!("../../../patterns/SmolLM2-135M-Instruct/head/config.json");
const LAYER_TABLE: &str = include_str!("../../../patterns/SmolLM2-135M-Instruct/layer/full_attention_heads.tsv");
const LAYER_CONFIG: &str = include_str!("../../../patterns/SmolLM2-135M-Instruct/layer/config.json");

/// The shipped gates for `layout` (the head layout's optimisation, or the layer layout's).
pub fn gates(layout: Layout) -> Result<HeadGates> {
    let (table, config, name) = match layout {
        Layout::Head => (HEAD_TABLE, HEAD_CONFIG, "shipped SmolLM2-135M-Instruct/head"),
        Layout::Layer => (LAYER_TABLE, LAYER_CONFIG, "shipped SmolLM2-135M-Instruct/layer"),
    };
    Ok(HeadGates::parse(table, Some(config), &Path::new(name).join(duo_core::pattern::GATES_FILE))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_patterns_match_the_files_and_the_default_model() {
        for (layout, dir) in [(Layout::Head, "head"), (Layout::Layer, "layer")] {
            let compiled = gates(layout).unwrap();
            let on_disk = HeadGates::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../patterns/SmolLM2-135M-Instruct").join(dir)).unwrap();
            assert_eq!(compiled.rows(), on_disk.rows());
            // SmolLM2-135M: 30 layers x 3 KV heads.
            assert_eq!((compiled.n_layers(), compiled.n_kv_heads()), (30, 3));
        }
        assert_ne!(gates(Layout::Head).unwrap().rows(), gates(Layout::Layer).unwrap().rows(), "two optimisations, two tables");
    }
}
