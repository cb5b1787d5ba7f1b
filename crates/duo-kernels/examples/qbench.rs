//! Times the quantised matmul kernel.
use duo_kernels::quant::{QuantKind, QuantMatrix};
fn main() {
    let (rows, cols) = (1536usize, 576usize);
    let data: Vec<u8> = (0..rows * cols / 32 * 20).map(|i| (i * 7 % 251) as u8).collect();
    let m = QuantMatrix::new(QuantKind::Q4_1, rows, cols, data).expect("a Q4_1 matrix of whole blocks");
    for t in [1usize, 64] {
        let x: Vec<f32> = (0..t * cols).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let t0 = std::time::Instant::now();
        let iters = 200 / t.max(1) + 5;
        let mut s = 0.0;
        for _ in 0..iters { s += m.matmul(&x, t)[0]; }
        let dt = t0.elapsed().as_secs_f64() / iters as f64;
        println!("t={t}: {:.3} ms, {:.2} GMAC/s ({s})", dt * 1e3, (rows * cols * t) as f64 / dt / 1e9);
    }
}
