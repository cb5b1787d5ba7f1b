//! Evaluation cells on the real default model (SmolLM2-135M-Instruct Q4_1): the same
//! prompt for every method, full attention finding a passkey that a tiny streaming window
//! cannot see, and the KV bytes each method reports.

use duo_engine::{Device, Engine, MethodSpec, Runner};
use duo_eval::{run_cell, EvalMethod, Grid, Task};
use duo_model::ModelSource;
use duo_tasks::Haystack;

#[test]
fn full_attention_retrieves_what_a_small_window_cannot() {
    let model = Engine::load(&ModelSource::Default, Device::Cpu).expect("default model");
    let grid = Grid { task: Task::Passkey { words: 8 }, haystack: Haystack::Generated, lengths: vec![500], depths: vec![0.1], hint_words: 2, seed: 3 };
    grid.validate(model.config().context_length).expect("valid grid");
    let cell = grid.prompt(&model.tokenizer, 500, 0.1).expect("prompt");
    assert_eq!(cell.prompt.len() + cell.answer.len(), 500);
    assert_eq!(grid.prompt(&model.tokenizer, 500, 0.1).expect("again"), cell, "cells are seeded");
    let base = MethodSpec { sink: 4, recent: 32, ..Default::default() };
    let c = model.config();
    let run = |m: EvalMethod| {
        let resolved = m.spec(&base, None).resolve(c).expect("resolve");
        run_cell(&Runner::new(&model, resolved), &grid, m, 500, 0.1, &cell).expect("cell")
    };
    let full = run(EvalMethod::Full);
    let streaming = run(EvalMethod::Streaming);
    assert!(full.teacher_forced >= 0.8, "full attention reads the passkey back: {full:?}");
    assert!(full.generation >= 0.5, "{full:?}");
    assert!(streaming.teacher_forced < full.teacher_forced, "{streaming:?}");
    // Full: every token of prompt, hint and generation is cached; streaming: 36 per head.
    let per_token = 2 * c.head_dim * 4 * c.n_kv_heads * c.n_layers;
    assert!(full.kv_bytes >= per_token * (cell.prompt.len() + 2), "{}", full.kv_bytes);
    assert_eq!(streaming.kv_bytes, per_token * 36);
    assert_eq!(streaming.kv_bytes_retrieval, 0);
    assert_eq!(full.expected.split_whitespace().count(), 6, "the hint words are not scored");
}
