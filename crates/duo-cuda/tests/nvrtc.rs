//! Every kernel source compiles under NVRTC with the options duo uses, on any machine: no GPU
//! is needed to compile. Where NVRTC cannot be loaded, the test fetches it from the Python
//! package index on first run (`nvidia-cuda-nvrtc`, pinned to CUDA 13.0 like the GPU host,
//! into the target folder, as the server test fetches the `openai` client) and runs itself
//! again with it on the library path. So a kernel that does not compile fails CI, not a GPU
//! session.

use std::path::PathBuf;
use std::process::Command;

const CHILD: &str = "DUO_NVRTC_CHILD";

#[test]
fn every_kernel_compiles() {
    if let Some(result) = duo_cuda::runtime::compile_all() {
        let n = result.expect("a kernel failed to compile");
        assert!(n >= 8, "{n} compilations");
        return;
    }
    assert!(std::env::var_os(CHILD).is_none(), "NVRTC from the package index could not be loaded");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nvrtc-13.0");
    let lib = dir.join("nvidia/cu13/lib");
    if !lib.join("libnvrtc.so.13").exists() {
        let ok = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--target"])
            .arg(&dir)
            .arg("nvidia-cuda-nvrtc==13.0.*")
            .status()
            .expect("python3 -m pip")
            .success();
        assert!(ok, "pip install nvidia-cuda-nvrtc==13.0.* failed");
    }
    let out = Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", "every_kernel_compiles", "--nocapture", "--test-threads", "1"])
        .env("LD_LIBRARY_PATH", &lib)
        .env(CHILD, "1")
        .output()
        .expect("running the test again");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
}
