//! `--random-weights`: `duo bench` measures a model of a given shape with seeded random
//! weights, with KV bytes that follow the cache formula; every command that reports
//! accuracy or text refuses it before loading anything.

use std::path::PathBuf;
use std::process::Command;

fn duo(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_duo")).args(args).output().expect("duo runs")
}

/// A fresh folder under the target's temporary folder, removed when dropped.
struct TmpDir(PathBuf);

impl std::ops::Deref for TmpDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmp(name: &str) -> TmpDir {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("tmp dir");
    TmpDir(d)
}

/// A tiny Llama shape: 2 layers, 2 KV heads of 32 dims (a retrieval head holds 2 * 32 * 4 =
/// 256 bytes per token in f32).
const TINY_LLAMA: &str = r#"{"model_type":"llama","hidden_size":128,"num_attention_heads":4,"num_key_value_heads":2,"num_hidden_layers":2,"intermediate_size":256,"vocab_size":512,"max_position_embeddings":1024}"#;

#[test]
fn accuracy_commands_refuse_random_weights() {
    let dir = tmp("refused");
    let out = dir.join("eval");
    let out = out.to_str().expect("utf-8");
    let cases: [&[&str]; 5] = [
        &["eval", "passkey", "--random-weights", "llama-3-8b", "--lengths", "1000", "--out", out],
        &["eval", "niah", "--random-weights", "llama-2-7b", "--out", out],
        &["generate", "--random-weights", "llama-3-8b", "Hello"],
        &["score", "--random-weights", "llama-3-8b", "--text-file", "/dev/null"],
        &["serve", "--random-weights", "llama-3-8b", "--port", "0"],
    ];
    for args in cases {
        let out = duo(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(err.contains("random weights") && err.contains("duo bench"), "{args:?}: {err}");
    }
    assert!(!std::path::Path::new(out).exists(), "a refused eval writes nothing");
}

#[test]
fn bench_measures_a_random_model_of_the_given_shape() {
    let dir = tmp("random-bench");
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, TINY_LLAMA).expect("config");
    let out_dir = dir.join("out");
    let out = duo(&[
        "bench", "--random-weights", cfg.to_str().expect("utf-8"), "--lengths", "40,80", "--decode-tokens", "2",
        "--methods", "full,streaming", "--sink", "4", "--recent", "8", "--out", out_dir.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = std::fs::read_to_string(out_dir.join("bench.csv")).expect("bench.csv");
    let rows: Vec<Vec<String>> = csv.lines().skip(1).map(|l| l.split(',').map(String::from).collect()).collect();
    assert_eq!(rows.len(), 4);
    let per_head_token = 2 * 32 * 4;
    for r in &rows {
        let (method, context): (&str, usize) = (&r[0], r[2].parse().expect("context"));
        let tokens = context + 2; // prompt plus decode steps
        let (retrieval, streaming, process): (usize, usize, usize) = (r[6].parse().expect("r"), r[7].parse().expect("s"), r[8].parse().expect("p"));
        match method {
            "full" => assert_eq!((retrieval, streaming), (2 * 2 * per_head_token * tokens, 0), "{r:?}"),
            "streaming" => assert_eq!((retrieval, streaming), (0, 2 * 2 * per_head_token * 12), "{r:?}"),
            other => panic!("unexpected method {other}"),
        }
        assert!(process > 1 << 20, "process memory is reported: {r:?}");
    }
    for png in ["prefill.png", "decode.png", "kv.png", "memory.png"] {
        let bytes = std::fs::read(out_dir.join(png)).expect(png);
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{png}");
    }
    let md = std::fs::read_to_string(out_dir.join("bench.md")).expect("bench.md");
    assert!(md.contains("random weights"), "{md}");
    let bad = duo(&["bench", "--random-weights", "gpt-9", "--lengths", "8"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("llama-3-8b"));
}

#[test]
fn a_batched_bench_on_the_cpu_decodes_several_synthetic_caches_at_once() {
    // Contexts past --max-prefill get seeded random KV on the CPU too, and --batch decodes
    // that many sequences together: KV bytes are every sequence's (an int8 cache: a byte per
    // element and a 4-byte scale per row).
    let dir = tmp("batch-bench");
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, TINY_LLAMA).expect("config");
    let out_dir = dir.join("out");
    let out = duo(&[
        "bench", "--random-weights", cfg.to_str().expect("utf-8"), "--lengths", "300", "--max-prefill", "0", "--decode-tokens", "3",
        "--methods", "full", "--batch", "3", "--kv-dtype", "int8", "--out", out_dir.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = std::fs::read_to_string(out_dir.join("bench.csv")).expect("bench.csv");
    let row: Vec<String> = csv.lines().nth(1).expect("a row").split(',').map(String::from).collect();
    assert_eq!((row[0].as_str(), row[2].as_str(), row[3].as_str()), ("full (batch 3)", "300", ""), "{row:?}");
    // 3 sequences x 2 layers x 2 heads x (keys + values) x (32 bytes + 4) x 303 tokens.
    assert_eq!(row[6].parse::<usize>().expect("retrieval bytes"), 3 * 2 * 2 * 2 * 36 * 303, "{row:?}");
    assert!(row[4].parse::<f64>().expect("ms per step") > 0.0);
    // A batch whose caches exceed the memory there is is refused before any is allocated.
    let cfg_long = dir.join("long.json");
    std::fs::write(&cfg_long, TINY_LLAMA.replace("\"max_position_embeddings\":1024", "\"max_position_embeddings\":100000000")).expect("config");
    let out = duo(&["bench", "--random-weights", cfg_long.to_str().expect("utf-8"), "--lengths", "50000000", "--max-prefill", "0", "--decode-tokens", "1", "--methods", "full", "--batch", "64"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("caches of 50000001 tokens need") && err.contains("GiB are available"), "{err}");
}
