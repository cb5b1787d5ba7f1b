//! Per-method summaries of a grid: mean scores and KV bytes, as markdown and JSON.

use crate::{CellResult, EvalMethod};
use serde::Serialize;

/// One method's summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MethodSummary {
    /// Method name.
    pub method: EvalMethod,
    /// Cells scored.
    pub cells: usize,
    /// Mean generation score.
    pub generation: f64,
    /// Mean teacher-forced accuracy.
    pub teacher_forced: f64,
    /// Mean peak KV bytes over cells.
    pub mean_kv_bytes: f64,
    /// Peak KV bytes at the longest length.
    pub kv_bytes_at_longest: usize,
    /// The longest length.
    pub longest: usize,
}

/// Summaries in the order of `methods`.
pub fn summarise(results: &[CellResult], methods: &[EvalMethod]) -> Vec<MethodSummary> {
    methods
        .iter()
        .filter_map(|&m| {
            let rs: Vec<&CellResult> = results.iter().filter(|r| r.method == m).collect();
            if rs.is_empty() {
                return None;
            }
            let n = rs.len() as f64;
            let longest = rs.iter().map(|r| r.length).max().unwrap_or(0);
            Some(MethodSummary {
                method: m,
                cells: rs.len(),
                generation: rs.iter().map(|r| r.generation).sum::<f64>() / n,
                teacher_forced: rs.iter().map(|r| r.teacher_forced).sum::<f64>() / n,
                mean_kv_bytes: rs.iter().map(|r| r.kv_bytes as f64).sum::<f64>() / n,
                kv_bytes_at_longest: rs.iter().filter(|r| r.length == longest).map(|r| r.kv_bytes).max().unwrap_or(0),
                longest,
            })
        })
        .collect()
}

/// A markdown table of the summaries.
pub fn markdown(summaries: &[MethodSummary]) -> String {
    let mut s = String::from("| method | cells | generation | teacher-forced | mean KV MiB | KV MiB at longest |\n|---|---:|---:|---:|---:|---:|\n");
    for m in summaries {
        s.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {:.1} | {:.1} ({} tokens) |\n",
            m.method.name(),
            m.cells,
            m.generation,
            m.teacher_forced,
            m.mean_kv_bytes / 1048576.0,
            m.kv_bytes_at_longest as f64 / 1048576.0,
            m.longest
        ));
    }
    s
}

/// Score grid of one method: rows are `depths`, columns `lengths`; `None` where the cell
/// has not run. `teacher` picks the teacher-forced score, else the generation score.
pub fn grid(results: &[CellResult], method: EvalMethod, lengths: &[usize], depths: &[f64], teacher: bool) -> Vec<Vec<Option<f64>>> {
    depths
        .iter()
        .map(|&d| {
            lengths
                .iter()
                .map(|&l| {
                    results
                        .iter()
                        .find(|r| r.method == method && r.length == l && r.depth.to_bits() == d.to_bits())
                        .map(|r| if teacher { r.teacher_forced } else { r.generation })
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(method: EvalMethod, length: usize, depth: f64, g: f64, t: f64, kv: usize) -> CellResult {
        CellResult {
            task: "passkey".into(),
            method,
            length,
            depth,
            generation: g,
            teacher_forced: t,
            answer: String::new(),
            expected: String::new(),
            kv_bytes: kv,
            kv_bytes_retrieval: kv,
            kv_bytes_streaming: 0,
            prefill_seconds: 0.0,
        }
    }

    #[test]
    fn summaries_average_per_method_and_grids_place_cells() {
        let rs = vec![
            r(EvalMethod::Full, 1000, 0.5, 1.0, 0.9, 100),
            r(EvalMethod::Full, 2000, 0.5, 0.0, 0.7, 200),
            r(EvalMethod::Streaming, 1000, 0.5, 0.0, 0.1, 50),
        ];
        let s = summarise(&rs, &[EvalMethod::Full, EvalMethod::Duo, EvalMethod::Streaming]);
        assert_eq!(s.len(), 2, "methods without results are left out");
        assert_eq!(s[0].cells, 2);
        assert!((s[0].generation - 0.5).abs() < 1e-12 && (s[0].teacher_forced - 0.8).abs() < 1e-12);
        assert_eq!((s[0].kv_bytes_at_longest, s[0].longest), (200, 2000));
        let g = grid(&rs, EvalMethod::Full, &[1000, 2000, 4000], &[0.1, 0.5], true);
        assert_eq!(g, vec![vec![None, None, None], vec![Some(0.9), Some(0.7), None]]);
        assert!(markdown(&s).contains("| streaming | 1 | 0.000 | 0.100 |"));
    }
}
