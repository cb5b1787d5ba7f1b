//! Hostile-but-fair inputs to the `duo` binary, each of which once took the process down:
//! a chat template that doubles a string 64 times (19 GB), window sizes of 2^40 and 2^64 - 1
//! tokens (an abort on a 256 TiB allocation, a capacity-overflow panic). Each must now end
//! with an error that names the problem, a non-zero exit, and no panic or abort.

use candle_core::quantized::GgmlDType;
use duo_model::gguf::writer::{byte_vocab, small_llama, SmallLlama};
use std::collections::BTreeMap;
use std::process::Command;

/// Runs `duo` under a 4 GiB address-space limit (a runaway allocation fails fast) and
/// returns (success, standard error, peak resident memory in MiB, from the kernel's rusage).
fn duo(args: &[&str]) -> (bool, String, f64) {
    let script = "import resource, subprocess, sys\n\
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n\
        r = subprocess.run(sys.argv[1:], stderr=subprocess.PIPE)\n\
        sys.stderr.buffer.write(r.stderr)\n\
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n\
        sys.exit(r.returncode)";
    let out = Command::new("python3").arg("-c").arg(script).arg(env!("CARGO_BIN_EXE_duo")).args(args).output().expect("python3 runs duo");
    let peak_kib: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(f64::INFINITY);
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned(), peak_kib / 1024.0)
}

fn model_with_template(template: &'static str) -> std::path::PathBuf {
    let shape = SmallLlama { layers: 1, hidden: 64, heads: 2, kv_heads: 1, ffn: 64, context: 512, template: Some(template) };
    let mut named = BTreeMap::new();
    let mut put = |name: &str, dims: Vec<usize>| {
        let n: usize = dims.iter().product();
        named.insert(name.to_string(), (dims, (0..n).map(|i| ((i * 7919 % 97) as f32 - 48.0) / 500.0).collect::<Vec<f32>>()));
    };
    put("token_embd.weight", vec![byte_vocab().0.len(), 64]);
    put("output_norm.weight", vec![64]);
    for (part, dims) in [("attn_norm", vec![64]), ("ffn_norm", vec![64]), ("attn_q", vec![64, 64]), ("attn_k", vec![32, 64]), ("attn_v", vec![32, 64]), ("attn_output", vec![64, 64]), ("ffn_gate", vec![64, 64]), ("ffn_up", vec![64, 64]), ("ffn_down", vec![64, 64])] {
        put(&format!("blk.0.{part}.weight"), dims);
    }
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("bomb-{}.gguf", std::process::id()));
    std::fs::write(&path, small_llama(&shape, &named, GgmlDType::F32).expect("gguf")).expect("write");
    path
}

#[test]
fn a_string_doubling_chat_template_fails_cleanly() {
    let path = model_with_template("{% set s = namespace(v='a') %}{% for i in range(64) %}{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v }}");
    let (ok, err, peak) = duo(&["generate", "--model", path.to_str().expect("utf-8"), "--chat", "--max-tokens", "2", "hi"]);
    assert!(!ok, "{err}");
    assert!(err.contains("chat template") && err.contains("memory"), "{err}");
    assert!(peak < 1024.0, "peak resident memory {peak:.0} MiB");
    assert!(!err.contains("panicked") && !err.contains("memory allocation of"), "{err}");
    std::fs::remove_file(path).ok();
}

#[test]
fn window_sizes_beyond_the_context_are_refused() {
    for (flag, value) in [("--sink", "1099511627776"), ("--sink", "18446744073709551615"), ("--recent", "1099511627776")] {
        let (ok, err, _) = duo(&["generate", flag, value, "--max-tokens", "2", "hi"]);
        assert!(!ok, "{flag} {value}: {err}");
        assert!(err.contains(&flag[2..]) && err.contains("context"), "{flag} {value}: {err}");
        assert!(!err.contains("panicked") && !err.contains("memory allocation of"), "{err}");
    }
    // The server refuses them at start-up, before it is ready, not on its first request.
    let (ok, err, _) = duo(&["serve", "--port", "0", "--sink", "1099511627776"]);
    assert!(!ok && err.contains("sink") && !err.contains("ready"), "{err}");
}

#[test]
fn bad_gpu_pool_flags_are_refused_before_anything_loads() {
    for (args, names) in [
        (&["--gpu-memory-utilization", "1.5"][..], "gpu-memory-utilization"),
        (&["--gpu-memory-utilization", "0"][..], "gpu-memory-utilization"),
        (&["--gpu-memory-utilization", "NaN"][..], "gpu-memory-utilization"),
        (&["--block-size", "48"][..], "block-size"),
        (&["--block-size", "4096"][..], "block-size"),
        (&["--max-num-batched-tokens", "0"][..], "max-num-batched-tokens"),
        (&["--max-num-batched-tokens", "18446744073709551615"][..], "max-num-batched-tokens"),
        (&["--max-running", "1000000"][..], "max-num-seqs"),
        (&["--max-running", "0"][..], "max-running"),
    ] {
        let mut all = vec!["serve", "--port", "0", "--device", "cuda"];
        all.extend_from_slice(args);
        let (ok, err, _) = duo(&all);
        assert!(!ok, "{args:?}: {err}");
        assert!(err.contains(names) && !err.contains("listening"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn a_thread_count_of_zero_is_refused() {
    let (ok, err, _) = duo(&["--threads", "0", "generate", "hi"]);
    assert!(!ok && err.contains("--threads") && err.contains("1 to 4096"), "{err}");
}

#[test]
fn kv_element_types_the_device_does_not_have_are_refused_before_loading() {
    for (args, want) in [
        (&["generate", "--kv-dtype", "int3", "hi"][..], "not one of f32, f16, int8 (CPU) or bf16, fp8, int8, int4, k8v4 (GPU)"),
        (&["generate", "--kv-dtype", "k8v4", "hi"][..], "on the CPU it is f32 (the default), f16 or int8 (q8)"),
        (&["generate", "--kv-dtype", "int4", "hi"][..], "on the CPU it is f32 (the default), f16 or int8 (q8)"),
        (&["generate", "--kv-dtype", "fp8", "hi"][..], "on the CPU it is f32 (the default), f16 or int8 (q8)"),
        (&["generate", "--kv-dtype", "bf16", "hi"][..], "on the CPU it is f32 (the default), f16 or int8 (q8)"),
        (&["bench", "--device", "cuda", "--kv-dtype", "f16", "--lengths", "64"][..], "the CUDA backend caches bf16 (its default), fp8, int8, int4 or k8v4"),
        (&["generate", "--kv-dtype-streaming", "int4", "hi"][..], "on the CPU it is f32, f16 or int8"),
        (&["bench", "--device", "cuda", "--kv-dtype", "int4", "--kv-dtype-streaming", "fp8", "--lengths", "64"][..], "keeps streaming heads in the cache's type"),
        (&["bench", "--device", "cuda", "--kv-dtype-streaming", "int4", "--lengths", "64"][..], "or in bf16 beside an fp8, int8, int4 or k8v4 cache"),
        (&["bench", "--device", "cuda", "--kv-dtype", "k8v4", "--kv-dtype-streaming", "int8", "--lengths", "64"][..], "or in bf16 beside an fp8, int8, int4 or k8v4 cache"),
    ] {
        let (ok, err, _) = duo(args);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("loading"), "refused before the model loads: {err}");
    }
}

#[test]
fn attention_peers_are_refused_off_the_gpu_and_when_malformed_before_any_device_opens() {
    let (ok, err, _) = duo(&["bench", "--attention-peers", "peers.json", "--lengths", "64"]);
    assert!(!ok && err.contains("use it with --device cuda"), "{err}");
    let bad = std::env::temp_dir().join(format!("duo-peers-{}.json", std::process::id()));
    for (text, want) in [("not json", "is not JSON"), ("{\"rows\": [{\"phase\": \"decode\", \"layer\": \"full\", \"kernel\": \"sdpa\"}]}", "a row without `tokens`"), ("{\"rows\": 3}", "no `rows` list"), ("{\"rows\": [{\"phase\": \"decode\", \"layer\": \"full\", \"kernel\": \"sdpa\", \"tokens\": 1000000000000, \"ms\": 1.0}]}", "outside 1..16M tokens")] {
        std::fs::write(&bad, text).expect("temp file");
        let (ok, err, _) = duo(&["bench", "--device", "cuda", "--attention-peers", bad.to_str().expect("utf-8"), "--lengths", "64"]);
        assert!(!ok && err.contains(want), "{text}: {err}");
        assert!(!err.contains("CUDA driver") && !err.contains("loading"), "refused before the device opens: {err}");
    }
    let _ = std::fs::remove_file(&bad);
}

#[test]
fn simulating_a_4_bit_cache_over_an_int8_one_is_refused_before_loading() {
    // It would round twice (the simulation rounds an f32 or f16 cache).
    let run = Command::new(env!("CARGO_BIN_EXE_duo"))
        .args(["eval", "passkey", "--kv-dtype", "q8", "--lengths", "500", "--depths", "0.5", "--methods", "full", "--out", "/nonexistent/duo-sim"])
        .env("DUO_SIMULATE_KV", "int4-rows")
        .output()
        .expect("duo runs");
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains("not an int8 one"), "{err}");
    assert!(!err.contains("loading"), "refused before the model loads: {err}");
}

#[test]
fn a_batched_bench_out_of_range_is_refused_before_any_device_opens() {
    for (args, want) in [
        (&["bench", "--batch", "0", "--lengths", "64"][..], "--batch takes 1 sequence or more"),
        (&["bench", "--device", "cuda", "--batch", "0", "--lengths", "64"][..], "--batch takes 1 sequence or more"),
        (&["bench", "--device", "cuda", "--batch", "100000", "--lengths", "64"][..], "--batch takes at most"),
    ] {
        let (ok, err, _) = duo(args);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("CUDA driver") && !err.contains("loading"), "refused before the device opens: {err}");
    }
}

#[test]
fn pattern_show_prints_the_longest_context_that_fits() {
    // SmolLM2's shipped head pattern at 0.5: 45 retrieval heads of 64 and 45 streaming heads
    // holding the window the pattern was trained with (its config.json: 64 + 1024 tokens);
    // full attention 90 heads. `row` is the bytes of one cached row
    // (keys or values of one position of one head), scales included.
    let heatmap = std::env::temp_dir().join(format!("duo-gates-{}.png", std::process::id()));
    let pattern = concat!(env!("CARGO_MANIFEST_DIR"), "/../../patterns/SmolLM2-135M-Instruct/head");
    // `dtype` and, where given, the streaming heads' own type.
    let show_with = |dtype: &str, streaming: Option<&str>| {
        let mut args = vec!["pattern", "show", pattern, "--kv-dtype", dtype, "--head-dim", "64", "--memory-gib", "1", "--heatmap", heatmap.to_str().expect("utf-8")];
        args.extend(streaming.map(|s| ["--kv-dtype-streaming", s]).into_iter().flatten());
        let run = Command::new(env!("CARGO_BIN_EXE_duo")).args(&args).output().expect("duo runs");
        let _ = std::fs::remove_file(&heatmap);
        assert!(run.status.success(), "{dtype} {streaming:?}: {}", String::from_utf8_lossy(&run.stderr));
        String::from_utf8_lossy(&run.stdout).into_owned()
    };
    let show = |dtype: &str| show_with(dtype, None);
    let fits = |row: usize| {
        let (per_token, streaming, full_per_token) = (45 * 2 * row, 45 * 1088 * 2 * row, 90 * 2 * row);
        (per_token, ((1usize << 30) - streaming) / per_token, (1usize << 30) / full_per_token)
    };
    // f32: 4 bytes per element.
    let out = show("f32");
    let (_, ours, full) = fits(64 * 4);
    assert!(out.contains(&format!("{ours} tokens with this pattern, {full} with full attention")), "{out}");
    // fp8: one byte per element and a 4-byte scale per row of 64.
    let out = show("fp8");
    let (_, ours, full) = fits(68);
    assert!(out.contains(&format!("{ours} tokens with this pattern, {full} with full attention")) && out.contains("4-byte scale per row"), "{out}");
    // int4: half a byte per element and a 4-byte step and minimum per row; the table of every
    // cache type at the same budget has int4's row with the same figures.
    let out = show("int4");
    let (per_token, ours, full) = fits(36);
    assert!(out.contains(&format!("{ours} tokens with this pattern, {full} with full attention")) && out.contains("4 bits/element"), "{out}");
    assert!(out.contains(&format!("| int4 (GPU) | {per_token} | {ours} | {full} |")), "{out}");
    // k8v4: a key row of 64 bytes and a value row of 32, each with its 4-byte word (52 a side
    // on average); the table's k8v4 row has the same figures.
    let out = show("k8v4");
    let (per_token, ours, full) = fits(52);
    assert!(out.contains(&format!("{ours} tokens with this pattern, {full} with full attention")) && out.contains("keys 8 and values 4 bits/element"), "{out}");
    assert!(out.contains(&format!("| k8v4: int8 keys, int4 values (GPU) | {per_token} | {ours} | {full} |")), "{out}");
    assert!(out.contains("sink 64, recent 1024)") && out.contains("streaming window: sink 64 + recent 1024 (the window the pattern was trained against"), "the pattern's trained window by default: {out}");
    // A window given on the command line wins.
    let run = Command::new(env!("CARGO_BIN_EXE_duo")).args(["pattern", "show", pattern, "--recent", "256", "--heatmap", heatmap.to_str().expect("utf-8")]).output().expect("duo runs");
    let _ = std::fs::remove_file(&heatmap);
    assert!(run.status.success() && String::from_utf8_lossy(&run.stdout).contains("sink 64, recent 256)") && String::from_utf8_lossy(&run.stdout).contains("(as given)"), "{}", String::from_utf8_lossy(&run.stdout));
    // Streaming heads of their own type: int4 retrieval rows (36 bytes) beside an f16 window
    // (128-byte rows), here and in the table's int4 row; full attention has no streaming heads.
    let out = show_with("int4", Some("f16"));
    let (per_token, window) = (45 * 2 * 36, 45 * 1088 * 2 * 128);
    let (ours, full) = (((1usize << 30) - window) / per_token, (1usize << 30) / (90 * 2 * 36));
    assert!(out.contains(&format!("{ours} tokens with this pattern, {full} with full attention")) && out.contains("streaming heads f16"), "{out}");
    assert!(out.contains(&format!("| int4 (GPU) | {per_token} | {ours} | {full} |")), "{out}");
    // The GPU's bf16 window beside k8v4: a window row takes the bytes of four k8v4 rows
    // (keys 64 + 4, values 32 + 4 bytes each), 416 bytes a position and head, not bf16's 256.
    let out = show_with("k8v4", Some("bf16"));
    let (per_token, window) = (45 * 2 * 52, 45 * 1088 * 4 * (68 + 36));
    let (ours, full) = (((1usize << 30) - window) / per_token, (1usize << 30) / (90 * 2 * 52));
    assert!(out.contains(&format!("{ours} tokens with this pattern, {full} with full attention")) && out.contains("in the bytes of 4 of the cache's rows"), "{out}");
    assert!(out.contains(&format!("| k8v4: int8 keys, int4 values (GPU) | {per_token} | {ours} | {full} |")), "{out}");
    let (ok, err, _) = duo(&["pattern", "show", pattern, "--kv-dtype-streaming", "int3", "--memory-gib", "1", "--heatmap", heatmap.to_str().expect("utf-8")]);
    assert!(!ok && err.contains("not one of"), "{err}");
    let (ok, err, _) = duo(&["pattern", "show", pattern, "--memory-gib", "0"]);
    assert!(!ok && err.contains("positive number of GiB"), "{err}");
    let (ok, err, _) = duo(&["pattern", "show", pattern, "--kv-dtype", "int3", "--memory-gib", "1", "--heatmap", heatmap.to_str().expect("utf-8")]);
    assert!(!ok && err.contains("not one of"), "{err}");
}

#[test]
fn pattern_show_places_heads_for_tensor_parallelism() {
    // SmolLM2's shipped head pattern at 0.5 over 3 GPUs (one KV head each per layer): 45
    // retrieval heads deal out to 15 per GPU; over 2 GPUs the first holds 2 heads of each
    // layer, the second 1; 4 GPUs cannot each hold one of 3 heads.
    let heatmap = std::env::temp_dir().join(format!("duo-gates-tp-{}.png", std::process::id()));
    let pattern = concat!(env!("CARGO_MANIFEST_DIR"), "/../../patterns/SmolLM2-135M-Instruct/head");
    let show = |dir: &str, gpus: &str| {
        let run = Command::new(env!("CARGO_BIN_EXE_duo"))
            .args(["pattern", "show", dir, "--tensor-parallel", gpus, "--context", "1000000", "--memory-gib", "100", "--heatmap", heatmap.to_str().expect("utf-8")])
            .output()
            .expect("duo runs");
        (run.status.success(), String::from_utf8_lossy(&run.stdout).into_owned(), String::from_utf8_lossy(&run.stderr).into_owned())
    };
    let (ok, out, err) = show(pattern, "3");
    assert!(ok, "{err}");
    assert!(out.contains("| retrieval-aware | 15 / 15 / 15 | ") && out.contains("| 1.00x | "), "{out}");
    assert!(out.contains("| contiguous | ") && out.contains("  layer 29  gpu 0: "), "{out}");
    let _ = std::fs::remove_file(&heatmap);
    let (ok, out, err) = show(pattern, "2");
    assert!(ok && out.contains("over 2 GPUs (2 / 1 KV heads per GPU per layer)"), "{out}{err}");
    let _ = std::fs::remove_file(&heatmap);
    let (ok, out, err) = show(pattern, "4");
    assert!(!ok && err.contains("tensor-parallel") && err.contains("each GPU holds at least one"), "{err}");
    assert!(out.is_empty(), "refused before printing anything: {out}");
    assert!(!heatmap.exists(), "a refused placement writes nothing");
    // The official Llama-3-8B pattern (8 KV heads) at 0.5 on 2 GPUs, where ../shared is
    // present: the contiguous split leaves 59 and 69 retrieval heads, the placement 64 each,
    // and each layer's slowest GPU holds 81 against the least possible 71 (streaming heads
    // hold the pattern's trained window, sink 128 + recent 256).
    let official = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/reference/duo-attention-patterns/Llama-3-8B-Instruct-Gradient-1048k");
    if !std::path::Path::new(official).exists() {
        eprintln!("{official} is absent: the official pattern's figures are not checked");
    } else {
        let (ok, out, err) = show(official, "2");
        assert!(ok, "{err}");
        assert!(out.contains("least possible: 71"), "{out}");
        assert!(out.contains("| contiguous | 59 / 69 | ") && out.contains("| 1.17x | 3039022 | 81 |"), "{out}");
        assert!(out.contains("| retrieval-aware | 64 / 64 | 30.53 / 30.53 | 1.00x | 3276416 | 71 |"), "{out}");
        let _ = std::fs::remove_file(&heatmap);
    }
}

#[test]
fn eval_curve_draws_score_against_kv_bytes_from_finished_runs() {
    let root = std::env::temp_dir().join(format!("duo-curve-{}", std::process::id()));
    let (a, b) = (root.join("s025"), root.join("s075"));
    for (dir, duo_mib, duo_score) in [(&a, 300.0, 0.8), (&b, 100.0, 0.5)] {
        std::fs::create_dir_all(dir).expect("temp dir");
        let summary = format!(
            r#"[{{"method":"full","cells":5,"generation":0.5,"teacher_forced":0.9,"mean_kv_bytes":{},"kv_bytes_at_longest":1,"longest":8000}},
                {{"method":"duo","cells":5,"generation":0.4,"teacher_forced":{duo_score},"mean_kv_bytes":{},"kv_bytes_at_longest":1,"longest":8000}}]"#,
            400.0 * 1048576.0,
            duo_mib * 1048576.0
        );
        std::fs::write(dir.join("summary.json"), summary).expect("write summary");
    }
    let png = root.join("curve.png");
    let run = Command::new(env!("CARGO_BIN_EXE_duo"))
        .args(["eval", "curve", a.to_str().unwrap(), b.to_str().unwrap(), "--out", png.to_str().unwrap()])
        .output()
        .expect("duo runs");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(out.contains("| duo | 300.0 | 0.800 |") && out.contains("| duo | 100.0 | 0.500 |") && out.contains("| full | 400.0 | 0.900 |"), "{out}");
    let bytes = std::fs::read(&png).expect("the chart is written");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // A folder without a summary, and an unknown score, are refused with their reason.
    let (ok, err, _) = duo(&["eval", "curve", root.to_str().unwrap(), "--out", png.to_str().unwrap()]);
    assert!(!ok && err.contains("summary.json"), "{err}");
    let (ok, err, _) = duo(&["eval", "curve", a.to_str().unwrap(), "--out", png.to_str().unwrap(), "--score", "f1"]);
    assert!(!ok && err.contains("teacher-forced or generation"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}
