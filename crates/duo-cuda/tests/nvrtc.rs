//! Every kernel source compiles under NVRTC with the options duo uses — checked wherever
//! NVRTC can be loaded (no GPU needed: `pip install nvidia-cuda-nvrtc==13.0.*` and put its
//! `lib` folder on `LD_LIBRARY_PATH`); elsewhere the test says it was skipped.

#[test]
fn every_kernel_compiles() {
    match duo_cuda::runtime::compile_all() {
        None => eprintln!("skipped: NVRTC cannot be loaded on this machine"),
        Some(result) => {
            let n = result.expect("a kernel failed to compile");
            assert!(n >= 8, "{n} compilations");
        }
    }
}
