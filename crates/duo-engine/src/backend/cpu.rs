//! The CPU backend: duo's quantised kernels (`duo_model::Model`) over `f32` (or, with
//! `--kv-dtype f16`, `f16`) hybrid caches (`duo_kv::SequenceKv`).

use super::{downcast, Backend, Logits, Sequence};
use crate::error::{EngineError, Result};
use crate::method::ResolvedMethod;
use duo_core::config::ModelConfig;
use duo_kv::{KvBytes, SequenceKv};
use duo_model::Model;
use std::any::Any;

/// A model on the CPU.
pub struct CpuBackend {
    model: Model,
    /// Where every forward pass runs: a pool of as many threads as rayon's global one (all
    /// cores, or `--threads`). The pass itself runs on one of its workers, so the caller's
    /// thread sleeps instead of competing for a core with the workers between parallel
    /// sections (on 2 cores, a third busy thread made decode spend about a third of its
    /// cycles in the scheduler; BENCHMARKS.md, issue 20).
    pool: Option<rayon::ThreadPool>,
}

impl CpuBackend {
    /// Wraps a loaded CPU model.
    pub fn new(model: Model) -> Self {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(rayon::current_num_threads()).thread_name(|i| format!("duo-cpu-{i}")).build().ok();
        Self { model, pool }
    }

    /// Runs `f` on a worker of the backend's pool (on the calling thread if the pool could
    /// not be made).
    fn on_pool<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }
}

/// A CPU sequence: its hybrid cache and the prefill chunk of its method.
struct CpuSequence {
    kv: SequenceKv,
    chunk: usize,
}

impl Sequence for CpuSequence {
    fn tokens(&self) -> usize {
        self.kv.tokens()
    }
    fn bytes(&self) -> KvBytes {
        self.kv.bytes()
    }
    fn peak_bytes(&self) -> KvBytes {
        self.kv.peak_bytes()
    }
    fn fork(&self) -> Result<Box<dyn Sequence>> {
        Ok(Box::new(CpuSequence { kv: self.kv.clone(), chunk: self.chunk }))
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl Backend for CpuBackend {
    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// The default element (`--kv-dtype f16` halves it; see `kv_plan`).
    fn kv_element_bytes(&self) -> usize {
        4
    }

    fn new_sequence(&self, method: &ResolvedMethod, max_tokens: usize) -> Result<Box<dyn Sequence>> {
        if let Some(d) = [method.kv_dtype, method.kv_dtype_streaming].into_iter().flatten().find(|d| !d.on_cpu()) {
            return Err(EngineError::InvalidParameter { name: "kv-dtype", reason: format!("the CPU backend caches f32, f16 or int8 ({d:?} is the GPU's)") });
        }
        let mut kv = method.new_cache();
        kv.reserve(max_tokens);
        Ok(Box::new(CpuSequence { kv, chunk: method.chunk }))
    }

    fn forward(&self, seq: &mut dyn Sequence, tokens: &[u32], logits: Logits) -> Result<Vec<f32>> {
        let s = downcast::<CpuSequence>(seq, "CPU")?;
        // Chunks of the method's size, as a prefill runs alone; logits from the last chunk
        // only, or from every chunk for `All`.
        let chunks: Vec<&[u32]> = tokens.chunks(s.chunk.max(1)).collect();
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let which = if logits == Logits::All || i + 1 == chunks.len() { logits } else { Logits::None };
            let kv = &mut s.kv;
            let got = self.on_pool(|| self.model.forward(c, kv, which))?;
            if logits == Logits::All {
                out.extend(got);
            } else {
                out = got;
            }
        }
        Ok(out)
    }

    fn decode_batch(&self, tokens: &[u32], seqs: &mut [&mut dyn Sequence]) -> Result<Vec<f32>> {
        let mut kvs = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            kvs.push(&mut downcast::<CpuSequence>(&mut **s, "CPU")?.kv);
        }
        Ok(self.on_pool(|| self.model.decode_batch(tokens, &mut kvs))?)
    }

    fn available_memory(&self) -> Option<usize> {
        proc_bytes("/proc/meminfo", "MemAvailable")
    }

    fn fill_synthetic(&self, seq: &mut dyn Sequence, tokens: usize, seed: u64) -> Result<()> {
        let s = downcast::<CpuSequence>(seq, "CPU")?;
        s.kv.fill_synthetic(tokens, seed);
        Ok(())
    }

    fn memory_in_use(&self) -> Option<usize> {
        proc_bytes("/proc/self/status", "VmRSS")
    }
}

/// A `KEY:  N kB` line of a Linux `/proc` file (`/proc/meminfo`, `/proc/self/status`), in
/// bytes; `None` where the file or the key is missing.
pub fn proc_bytes(file: &str, key: &str) -> Option<usize> {
    let text = std::fs::read_to_string(file).ok()?;
    let kib: usize = text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::proc_bytes;

    #[test]
    fn proc_lines_are_read_by_exact_key() {
        if !std::path::Path::new("/proc/meminfo").exists() {
            return;
        }
        let total = proc_bytes("/proc/meminfo", "MemTotal").expect("MemTotal");
        assert!(total > 1 << 20 && total.is_multiple_of(1024));
        assert!(proc_bytes("/proc/meminfo", "MemAvailable").is_some_and(|a| a <= total));
        assert_eq!(proc_bytes("/proc/meminfo", "Mem"), None, "a prefix of a key is not the key");
        assert_eq!(proc_bytes("/proc/meminfo", "NoSuchKey"), None);
        assert_eq!(proc_bytes("/no/such/file", "MemTotal"), None);
    }
}
