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
    let base = MethodSpec { sink: Some(4), recent: Some(32), ..Default::default() };
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

#[test]
fn ruler_tasks_have_exact_lengths_and_separate_full_from_streaming() {
    use duo_tasks::RulerTask;
    let model = Engine::load(&ModelSource::Default, Device::Cpu).expect("default model");
    let c = model.config();
    let base = MethodSpec { sink: Some(4), recent: Some(32), ..Default::default() };
    for task in RulerTask::ALL {
        let grid = Grid { task: Task::Ruler(task), haystack: Haystack::Generated, lengths: vec![600], depths: vec![0.3], hint_words: 4, seed: 5 };
        let cell = grid.prompt(&model.tokenizer, 600, 0.3).expect("prompt");
        assert_eq!(cell.prompt.len() + cell.answer.len(), 600, "{task:?}");
        assert!(!cell.words.is_empty() && cell.word_spans.len() == cell.words.len(), "{task:?}");
        let text = model.tokenizer.decode(&cell.prompt).expect("decode");
        if matches!(task, RulerTask::SingleNumber | RulerTask::SingleUuid | RulerTask::MultiKey | RulerTask::MultiValue) {
            assert!(cell.words.iter().all(|w| text.contains(w.as_str())), "{task:?}: the answers are in the context");
        }
        assert_eq!(grid.prompt(&model.tokenizer, 600, 0.3).expect("again"), cell, "seeded");
    }
    // The single needle: full attention reads it back, a 36-token window cannot.
    let grid = Grid { task: Task::Ruler(RulerTask::SingleNumber), haystack: Haystack::Generated, lengths: vec![600], depths: vec![0.3], hint_words: 4, seed: 5 };
    let cell = grid.prompt(&model.tokenizer, 600, 0.3).expect("prompt");
    let run = |m: EvalMethod| run_cell(&Runner::new(&model, m.spec(&base, None).resolve(c).expect("resolve")), &grid, m, 600, 0.3, &cell).expect("cell");
    let (full, streaming) = (run(EvalMethod::Full), run(EvalMethod::Streaming));
    assert!(full.teacher_forced >= 0.8 && full.generation == 1.0, "{full:?}");
    assert!(streaming.generation < full.generation, "{streaming:?}");
}
