//! Results as JSON lines, appended cell by cell, read back to skip finished cells.

use crate::{CellResult, EvalError, EvalMethod, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A results file.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    results: Vec<CellResult>,
}

/// Identity of a cell: task, method, length, depth (compared exactly).
fn same_cell(r: &CellResult, task: &str, method: EvalMethod, length: usize, depth: f64) -> bool {
    r.task == task && r.method == method && r.length == length && r.depth.to_bits() == depth.to_bits()
}

impl Store {
    /// Opens (or starts) `path`. A truncated last line (an interrupted write) is dropped;
    /// any other unreadable line is an error naming it.
    pub fn open(path: &Path) -> Result<Self> {
        let mut results = Vec::new();
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| EvalError::Store { path: path.into(), reason: e.to_string() })?;
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            for (i, line) in lines.iter().enumerate() {
                match serde_json::from_str::<CellResult>(line) {
                    Ok(r) => results.push(r),
                    Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
                    Err(e) => return Err(EvalError::Store { path: path.into(), reason: format!("line {}: {e}", i + 1) }),
                }
            }
            // Rewrite without a dropped partial line so appends start on a fresh line.
            if !text.is_empty() && !text.ends_with('\n') {
                let mut clean = String::new();
                for r in &results {
                    clean.push_str(&serde_json::to_string(r).map_err(|e| EvalError::Store { path: path.into(), reason: e.to_string() })?);
                    clean.push('\n');
                }
                std::fs::write(path, clean).map_err(|e| EvalError::Store { path: path.into(), reason: e.to_string() })?;
            }
        }
        Ok(Self { path: path.to_path_buf(), results })
    }

    /// Whether the cell is already done.
    pub fn has(&self, task: &str, method: EvalMethod, length: usize, depth: f64) -> bool {
        self.results.iter().any(|r| same_cell(r, task, method, length, depth))
    }

    /// Appends one result (and flushes it to disk).
    pub fn push(&mut self, r: CellResult) -> Result<()> {
        let err = |e: String| EvalError::Store { path: self.path.clone(), reason: e };
        let line = serde_json::to_string(&r).map_err(|e| err(e.to_string()))?;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path).map_err(|e| err(e.to_string()))?;
        writeln!(f, "{line}").map_err(|e| err(e.to_string()))?;
        self.results.push(r);
        Ok(())
    }

    /// Every result so far.
    pub fn results(&self) -> &[CellResult] {
        &self.results
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(method: EvalMethod, length: usize, depth: f64, score: f64) -> CellResult {
        CellResult {
            task: "passkey".into(),
            method,
            length,
            depth,
            generation: score,
            teacher_forced: score,
            answer: "a".into(),
            expected: "a".into(),
            kv_bytes: 10,
            kv_bytes_retrieval: 6,
            kv_bytes_streaming: 4,
            prefill_seconds: 0.1,
        }
    }

    #[test]
    fn resume_skips_finished_cells_and_survives_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("duo-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("results.jsonl");
        std::fs::remove_file(&path).ok();
        let mut s = Store::open(&path).expect("open");
        assert!(!s.has("passkey", EvalMethod::Full, 1000, 0.5));
        s.push(result(EvalMethod::Full, 1000, 0.5, 1.0)).expect("push");
        s.push(result(EvalMethod::Duo, 1000, 0.5, 0.5)).expect("push");
        // An interrupted write leaves half a line.
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).expect("append");
        write!(f, "{{\"task\": \"passk").expect("write");
        drop(f);
        let mut s = Store::open(&path).expect("reopen");
        assert_eq!(s.results().len(), 2);
        assert!(s.has("passkey", EvalMethod::Full, 1000, 0.5));
        assert!(s.has("passkey", EvalMethod::Duo, 1000, 0.5));
        assert!(!s.has("passkey", EvalMethod::Duo, 1000, 0.1));
        assert!(!s.has("niah", EvalMethod::Full, 1000, 0.5));
        s.push(result(EvalMethod::Streaming, 2000, 0.1, 0.0)).expect("push");
        let s = Store::open(&path).expect("reopen");
        assert_eq!(s.results().len(), 3);
        // A corrupt line in the middle is an error, not silently skipped.
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, format!("garbage\n{text}")).expect("write");
        assert!(Store::open(&path).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
