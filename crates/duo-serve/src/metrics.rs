//! Prometheus metrics under the names vLLM users already chart (`vllm:num_requests_running`,
//! `vllm:time_to_first_token_seconds`, ...), plus duo's own: KV bytes held by retrieval and
//! by streaming heads, reserved, and the budget.

use duo_engine::BatchStats;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A cumulative histogram with fixed bucket bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistogramCounts>,
}

#[derive(Debug, Default, Clone)]
struct HistogramCounts {
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, inner: Mutex::new(HistogramCounts { buckets: vec![0; bounds.len()], ..Default::default() }) }
    }

    /// Records one observation.
    pub fn observe(&self, seconds: f64) {
        let mut h = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (b, &bound) in h.buckets.iter_mut().zip(self.bounds) {
            if seconds <= bound {
                *b += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).count
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let h = self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, bound) in h.buckets.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {b}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
    }
}

const TTFT: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0];
const ITL: &[f64] = &[0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5];
const E2E: &[f64] = &[0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0];

/// The server's own counters (the engine keeps the rest in [`BatchStats`]).
#[derive(Debug)]
pub struct Metrics {
    /// Time to first token.
    pub ttft: Histogram,
    /// Time between consecutive tokens.
    pub itl: Histogram,
    /// Request latency, arrival to last token.
    pub e2e: Histogram,
    /// Finished with `stop`.
    pub finished_stop: AtomicU64,
    /// Finished with `length`.
    pub finished_length: AtomicU64,
    /// Ended early: client gone or failed.
    pub finished_abort: AtomicU64,
    /// Refused with 429.
    pub rejected_queue_full: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            ttft: Histogram::new(TTFT),
            itl: Histogram::new(ITL),
            e2e: Histogram::new(E2E),
            finished_stop: AtomicU64::new(0),
            finished_length: AtomicU64::new(0),
            finished_abort: AtomicU64::new(0),
            rejected_queue_full: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self, model: &str, engine: &BatchStats, kv_budget: usize) -> String {
        let labels = format!("model_name=\"{}\"", model.replace('\\', "\\\\").replace('"', "\\\""));
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String, extra: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}{extra}}} {value}");
        };
        let get = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::SeqCst).to_string();
        metric("vllm:num_requests_running", "gauge", "Requests in the running batch.", get(&engine.running), "");
        metric("vllm:num_requests_waiting", "gauge", "Requests waiting for admission.", get(&engine.waiting), "");
        metric("vllm:prompt_tokens_total", "counter", "Prompt tokens prefilled.", engine.prompt_tokens.load(Ordering::SeqCst).to_string(), "");
        metric("vllm:generation_tokens_total", "counter", "Tokens generated.", engine.generation_tokens.load(Ordering::SeqCst).to_string(), "");
        metric("duo:decode_steps_total", "counter", "Batched decode steps run.", engine.decode_steps.load(Ordering::SeqCst).to_string(), "");
        metric("vllm:num_preemptions_total", "counter", "Sequences preempted (blocks freed, recomputed later) because the KV pool ran out.", engine.preemptions.load(Ordering::SeqCst).to_string(), "");
        metric("duo:kv_blocks_total", "gauge", "KV blocks of the GPU pool (0 without a pool).", get(&engine.kv_blocks_total), "");
        metric("duo:kv_blocks_used", "gauge", "KV blocks held by running sequences.", get(&engine.kv_blocks_used), "");
        metric("duo:num_requests_running_peak", "gauge", "The most sequences that ran at once.", get(&engine.peak_running), "");
        let seconds = |micros: &std::sync::atomic::AtomicU64| micros.load(Ordering::SeqCst) as f64 / 1e6;
        metric("duo:prefill_steps_total", "counter", "Steps that carried a prefill chunk (with or without decode rows).", engine.prefill_steps.load(Ordering::SeqCst).to_string(), "");
        metric("duo:prefill_steps_seconds_total", "counter", "Time of those steps.", seconds(&engine.prefill_step_micros).to_string(), "");
        metric("duo:prefill_alone_steps_total", "counter", "Steps that ran a one-chunk prompt alone while others were decoding.", engine.prefill_alone_steps.load(Ordering::SeqCst).to_string(), "");
        metric("duo:decode_only_steps_total", "counter", "Steps that ran decode rows only.", engine.decode_only_steps.load(Ordering::SeqCst).to_string(), "");
        metric("duo:decode_only_rows_total", "counter", "Rows (tokens) of decode-only steps.", engine.decode_only_rows.load(Ordering::SeqCst).to_string(), "");
        metric("duo:decode_only_seconds_total", "counter", "Time of decode-only steps.", seconds(&engine.decode_only_micros).to_string(), "");
        let (rows, micros, kv) = *engine.widest_step.lock().unwrap_or_else(|e| e.into_inner());
        metric("duo:widest_decode_step_rows", "gauge", "Rows of the latest steady (graph-replayed) decode-only step with the most rows.", rows.to_string(), "");
        metric("duo:widest_decode_step_seconds", "gauge", "Its time.", (micros as f64 / 1e6).to_string(), "");
        metric("duo:widest_decode_step_kv_bytes", "gauge", "KV bytes its sequences held.", kv.to_string(), "");
        let full = *engine.full_width.lock().unwrap_or_else(|e| e.into_inner());
        metric("duo:full_width_decode_steps", "gauge", "Steady decode-only steps as wide as the widest (the batch full); restarts at a wider step.", full.steps.to_string(), "");
        metric("duo:full_width_decode_rows", "gauge", "Rows of each of those steps.", full.rows_per_step.to_string(), "");
        metric("duo:full_width_decode_seconds", "gauge", "Their total time.", (full.micros as f64 / 1e6).to_string(), "");
        if let Some((weights, bandwidth)) = *engine.floor.lock().unwrap_or_else(|e| e.into_inner()) {
            metric("duo:weight_bytes", "gauge", "Bytes of weights a step reads.", weights.to_string(), "");
            metric("duo:copy_bandwidth_bytes_per_second", "gauge", "Measured device copy bandwidth.", format!("{bandwidth:.0}"), "");
        }
        metric("duo:kv_cache_reserved_bytes", "gauge", "KV bytes reserved by running requests at their full length (CPU), or in the GPU pool's blocks in use (CUDA: blocks are taken as sequences grow).", get(&engine.kv_reserved), "");
        metric("duo:kv_cache_budget_bytes", "gauge", "KV bytes the running requests may reserve together.", kv_budget.to_string(), "");
        let _ = writeln!(out, "# HELP duo:kv_cache_bytes KV cache bytes held now, by head kind.\n# TYPE duo:kv_cache_bytes gauge");
        let _ = writeln!(out, "duo:kv_cache_bytes{{{labels},heads=\"retrieval\"}} {}", get(&engine.kv_retrieval));
        let _ = writeln!(out, "duo:kv_cache_bytes{{{labels},heads=\"streaming\"}} {}", get(&engine.kv_streaming));
        let reasons = [("stop", &self.finished_stop), ("length", &self.finished_length), ("abort", &self.finished_abort)];
        let _ = writeln!(out, "# HELP vllm:request_success_total Finished requests by finish reason.\n# TYPE vllm:request_success_total counter");
        for (r, c) in reasons {
            let _ = writeln!(out, "vllm:request_success_total{{{labels},finished_reason=\"{r}\"}} {}", c.load(Ordering::SeqCst));
        }
        let _ = writeln!(out, "# HELP duo:requests_rejected_total Requests refused because the queue was full.\n# TYPE duo:requests_rejected_total counter");
        let _ = writeln!(out, "duo:requests_rejected_total{{{labels}}} {}", self.rejected_queue_full.load(Ordering::SeqCst));
        // The engine's phases of a request's time to first token, as sums and counts.
        let phases = [
            ("duo:request_queue_time_seconds", "Time from submission to admission (requests admitted).", seconds(&engine.queue_micros), engine.admitted.load(Ordering::SeqCst)),
            ("duo:request_prefill_time_seconds", "Time from admission to the end of the prompt's last prefill chunk (a preempted sequence's recompute not counted again).", seconds(&engine.prefill_micros), engine.prompts_prefilled.load(Ordering::SeqCst)),
        ];
        for (name, help, sum, count) in phases {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary\n{name}_sum{{{labels}}} {sum}\n{name}_count{{{labels}}} {count}");
        }
        self.ttft.render(&mut out, "vllm:time_to_first_token_seconds", "Time to first token.", &labels);
        self.itl.render(&mut out, "vllm:inter_token_latency_seconds", "Time between consecutive output tokens.", &labels);
        self.e2e.render(&mut out, "vllm:e2e_request_latency_seconds", "Request latency from arrival to the last token.", &labels);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        for s in [0.05, 0.5, 5.0] {
            h.observe(s);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help", "m=\"a\"");
        assert!(out.contains("x_bucket{m=\"a\",le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{m=\"a\",le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{m=\"a\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{m=\"a\"} 3\n"), "{out}");
    }

    #[test]
    fn every_line_is_exposition_format() {
        let m = Metrics::default();
        m.ttft.observe(0.2);
        let text = m.render("my \"model\"", &BatchStats::default(), 1024);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').expect("series value");
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(series.contains("model_name=\"my \\\"model\\\"\""), "{line}");
        }
        assert!(text.contains("vllm:num_requests_running{"));
        assert!(text.contains("duo:kv_cache_budget_bytes{model_name=\"my \\\"model\\\"\"} 1024"));
    }
}
