//! Without a CUDA driver (as on CI), every GPU entry point fails with one clear message,
//! before loading a model or writing anything, and never with a panic.

use std::process::Command;

fn duo(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_duo")).args(args).output().expect("duo runs")
}

fn gpu_present() -> bool {
    duo_cuda::Gpu::new(0).is_ok()
}

#[test]
fn gpu_commands_fail_clearly_without_a_driver() {
    if gpu_present() {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "gpu_commands_fail_clearly_without_a_driver: skipped: a CUDA driver is present");
        return;
    }
    let out_dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cuda-absent-{}", std::process::id()));
    let out = out_dir.to_str().expect("utf-8");
    let cases: [&[&str]; 8] = [
        &["cuda-check"],
        &["bench", "--device", "cuda", "--random-weights", "smollm2-135m", "--lengths", "64", "--out", out],
        // bf16 windows beside k8v4: a pair the GPU takes, so it gets as far as the device.
        &["bench", "--device", "cuda", "--kv-dtype", "k8v4", "--kv-dtype-streaming", "bf16", "--random-weights", "smollm2-135m", "--lengths", "64", "--out", out],
        &["bench", "--device", "cuda:1", "--model", "/nonexistent/model.gguf", "--lengths", "64", "--out", out],
        &["generate", "--device", "cuda", "--model", "/nonexistent/model.gguf", "Hello"],
        &["score", "--device", "cuda", "--model", "/nonexistent/model.gguf", "--text-file", "/nonexistent/t.txt"],
        &["demo", "--device", "cuda", "--model", "/nonexistent/model.gguf"],
        &["eval", "passkey", "--device", "cuda", "--model", "/nonexistent/model.gguf", "--out", out],
    ];
    for args in cases {
        let o = duo(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} must fail without a driver");
        assert!(err.contains("no usable CUDA driver"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        // Every command opened the GPU before the (missing) model: the error is the driver's.
        assert!(!err.contains("/nonexistent"), "{args:?} touched the model first: {err}");
    }
    assert!(!out_dir.exists(), "a failed GPU bench writes nothing");
}

#[test]
fn unknown_devices_are_refused() {
    for args in [&["bench", "--device", "tpu"][..], &["generate", "--device", "tpu", "Hello"][..], &["serve", "--device", "cuda:x"][..], &["identify", "--out", "x", "--device", "gpu"][..]] {
        let o = duo(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("is not one of cpu, cuda, cuda:N"), "{args:?}: {err}");
    }
}

#[test]
fn gpu_bench_checks_its_arguments_before_the_gpu() {
    for (args, want) in [
        (&["bench", "--device", "cuda", "--random-weights", "llama-3-8b", "--lengths", "0"][..], "--lengths"),
        (&["bench", "--device", "cuda", "--random-weights", "llama-3-8b", "--decode-tokens", "2"][..], "--decode-tokens"),
        (&["bench", "--device", "cuda", "--random-weights", "no-such-shape"][..], "no-such-shape"),
    ] {
        let o = duo(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("CUDA driver"), "{args:?} reached the GPU before checking: {err}");
    }
}

#[test]
fn tensor_parallel_flags_and_the_gpu_count_are_checked_before_any_model_is_read() {
    let model = ["--model", "/nonexistent/model.gguf", "Hello"];
    for (flags, want) in [
        (&["--tensor-parallel", "2"][..], "use it with --device cuda"),
        (&["--device", "cuda:1", "--tensor-parallel", "2"][..], "runs on GPUs 0..1"),
        (&["--device", "cuda", "--tensor-parallel", "0"][..], "1 GPU or more"),
        (&["--device", "cuda", "--tensor-parallel", "2", "--placement", "diagonal"][..], "retrieval-aware or contiguous"),
        (&["--device", "cuda", "--tensor-parallel", "2", "--tp-rank", "2", "--tp-rendezvous", "h:1"][..], "must be below --tensor-parallel 2"),
        (&["--device", "cuda", "--tensor-parallel", "2", "--tp-rank", "1", "--tp-rendezvous", "nowhere"][..], "HOST:PORT"),
        (&["--tensor-parallel", "2", "--tp-rank", "1", "--tp-rendezvous", "h:1"][..], "--device cuda"),
        (&["--device", "cuda", "--tensor-parallel", "2", "--tp-rank", "1"][..], "--tp-rendezvous"),
    ] {
        let args: Vec<&str> = ["generate"].iter().chain(flags).chain(&model).copied().collect();
        let o = duo(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("/nonexistent") && !err.contains("panicked"), "{args:?}: {err}");
    }
    // A multi-process rank does not serve.
    let o = duo(&["serve", "--device", "cuda", "--tensor-parallel", "2", "--tp-rank", "0", "--tp-rendezvous", "127.0.0.1:1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("drives all of its GPUs from one process"), "{err}");
    // More GPUs than the machine has: counted before the model is read.
    let visible = duo_cuda::runtime::device_count();
    let asked = (visible + 1).max(2).to_string();
    let args: Vec<&str> = ["generate", "--device", "cuda", "--tensor-parallel", &asked].iter().chain(&model).copied().collect();
    let o = duo(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(&format!("{asked} GPUs asked for, {visible} visible")), "{err}");
    assert!(!err.contains("/nonexistent"), "{err}");
}
