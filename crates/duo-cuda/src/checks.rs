//! Parity of every kernel against its CPU reference on seeded random inputs (`duo cuda-check`).

use crate::ops::{bf16_bits, hash_uniform, rms_norm_ref, rope_ref, round_bf16, silu_mul_ref};
use crate::prefill_attention::{self, HeadEntry};
use crate::runtime::Gpu;
use crate::{decode_attention, model, Parity, Result};
use std::sync::Arc;

fn max_err(want: &[f32], got: &[f32]) -> f64 {
    if want.len() != got.len() {
        return f64::INFINITY;
    }
    want.iter().zip(got).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0.0, f64::max)
}

fn bf16_to_f32(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect()
}

fn random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n as u64).map(|i| hash_uniform(seed, i) * scale).collect()
}

/// Runs every parity check; each result says what was compared and its bound.
pub fn check(gpu: &Arc<Gpu>, seed: u64) -> Result<Vec<Parity>> {
    let mut out = ops(gpu, seed)?;
    for (case, x) in prefill_attention::cases(seed) {
        out.push(prefill(gpu, &case, &x)?);
    }
    out.extend(dequant(gpu, seed)?);
    out.extend(decode_attention::check_kernel(gpu, seed)?);
    out.extend(model::check_model(gpu, seed)?);
    Ok(out)
}

fn prefill(gpu: &Gpu, case: &str, x: &prefill_attention::PrefillInput) -> Result<Parity> {
    let want = prefill_attention::reference(x)?;
    let (t, h, d) = (x.tokens(), x.n_heads, x.head_dim);
    let q = gpu.upload(&x.q)?;
    let k = gpu.upload(&bf16_bits(&x.keys))?;
    let v = gpu.upload(&bf16_bits(&x.values))?;
    let table = HeadEntry::table(&x.heads);
    let heads = gpu.upload(&table)?;
    let state = gpu.upload(&[x.first_position as i32, x.window_start as i32])?;
    let o = gpu.zeros::<u16>(t * h * d)?;
    gpu.prefill_attention(gpu.addr(&q), gpu.addr(&k), gpu.addr(&v), gpu.addr(&heads), gpu.addr(&state), t, h, h / x.heads.len(), d, gpu.addr(&o))?;
    let got = bf16_to_f32(&gpu.download(&o)?);
    Ok(Parity { case: case.into(), max_abs_err: max_err(&want, &got), bound: 1e-2 })
}

/// GGUF blocks of every type the GPU takes, dequantised to bf16: bit-identical to the CPU
/// reference rounded to bf16.
fn dequant(gpu: &Gpu, seed: u64) -> Result<Vec<Parity>> {
    use crate::dequant::{random_blocks, reference, QuantType};
    let mut out = Vec::new();
    for ty in [QuantType::F32, QuantType::F16, QuantType::Bf16, QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1, QuantType::Q4K, QuantType::Q6K] {
        let n = 256 * 1031;
        let bytes = random_blocks(ty, n, seed ^ 0xde9)?;
        let want: Vec<f32> = reference(ty, &bytes, n)?.into_iter().map(round_bf16).collect();
        let raw = gpu.upload(&bytes)?;
        let buf = gpu.upload(&vec![0xffffu16; n])?; // poisoned: every value must be written
        gpu.dequant_bf16(gpu.addr(&raw), gpu.addr(&buf), n, ty)?;
        let got = bf16_to_f32(&gpu.download(&buf)?);
        out.push(Parity { case: format!("dequant {ty:?} -> bf16: {n} values"), max_abs_err: max_err(&want, &got), bound: 0.0 });
    }
    Ok(out)
}

fn ops(gpu: &Gpu, seed: u64) -> Result<Vec<Parity>> {
    let mut out = Vec::new();
    // Seeded random bf16 fill: bit-identical to the CPU's.
    let n = 100_003;
    let buf = gpu.zeros::<u16>(n)?;
    gpu.fill_uniform(gpu.addr(&buf), n, seed, 0.37)?;
    let got = bf16_to_f32(&gpu.download(&buf)?);
    out.push(Parity { case: format!("fill_uniform_bf16: {n} values"), max_abs_err: max_err(&crate::ops::uniform_bf16(seed, n, 0.37), &got), bound: 0.0 });

    // Embedding of random rows by token id.
    let (hidden, toks) = (96, [5i32, 0, 77, 5]);
    let t = gpu.upload(&toks)?;
    let x = gpu.zeros::<f32>(toks.len() * hidden)?;
    gpu.embed(gpu.addr(&t), 0, seed, 1.0, gpu.addr(&x), hidden, toks.len())?;
    let want: Vec<f32> = toks.iter().flat_map(|&k| (0..hidden as u64).map(move |i| round_bf16(hash_uniform(seed, k as u64 * hidden as u64 + i)))).collect();
    out.push(Parity { case: "embed: random rows by token id".into(), max_abs_err: max_err(&want, &gpu.download(&x)?), bound: 0.0 });

    // RMSNorm, rows of 4096 and 576.
    for (rows, dim) in [(3usize, 4096usize), (5, 576)] {
        let xv = random(seed + 1, rows * dim, 3.0);
        let wv = random(seed + 2, dim, 1.5);
        let (xg, wg, og) = (gpu.upload(&xv)?, gpu.upload(&wv)?, gpu.zeros::<u16>(rows * dim)?);
        gpu.rms_norm(gpu.addr(&xg), gpu.addr(&wg), gpu.addr(&og), rows, dim, 1e-5)?;
        let got = bf16_to_f32(&gpu.download(&og)?);
        // One bf16 rounding step apart at most (sum order differs): 2^-8 relative of ~|w x / rms|.
        out.push(Parity { case: format!("rms_norm: {rows} rows of {dim} (bf16 out)"), max_abs_err: max_err(&rms_norm_ref(&xv, &wv, 1e-5), &got), bound: 4e-2 });
    }

    // RoPE + append into a mixed cache at positions past the sinks and window start.
    for (half_split, d) in [(true, 128usize), (false, 64)] {
        let (nh, ng, t, p0, win) = (4usize, 2usize, 3usize, 1000usize, 990usize);
        let inv: Vec<f32> = (0..d / 2).map(|i| 500_000f32.powf(-2.0 * i as f32 / d as f32)).collect();
        let heads = [HeadEntry::retrieval(0), HeadEntry::streaming(1100, 4, 16)];
        let rows = 1100 + 4 + 16 + 64;
        let qkv: Vec<f32> = random(seed + 3, t * (nh + 2 * ng) * d, 2.0).into_iter().map(round_bf16).collect();
        let table = HeadEntry::table(&heads);
        let (qkvg, st, invg, hg) = (gpu.upload(&bf16_bits(&qkv))?, gpu.upload(&[p0 as i32, win as i32])?, gpu.upload(&inv)?, gpu.upload(&table)?);
        let (qg, kg, vg) = (gpu.zeros::<f32>(t * nh * d)?, gpu.zeros::<u16>(rows * d)?, gpu.zeros::<u16>(rows * d)?);
        gpu.rope_append(gpu.addr(&qkvg), gpu.addr(&st), gpu.addr(&invg), gpu.addr(&hg), nh, ng, d, half_split, gpu.addr(&qg), gpu.addr(&kg), gpu.addr(&vg), t)?;
        let (gq, gk, gv) = (gpu.download(&qg)?, bf16_to_f32(&gpu.download(&kg)?), bf16_to_f32(&gpu.download(&vg)?));
        let mut err = 0.0f64;
        let stride = (nh + 2 * ng) * d;
        for r in 0..t {
            let pos = p0 + r;
            for hh in 0..nh + ng {
                let mut v = qkv[r * stride + hh * d..][..d].to_vec();
                rope_ref(&mut v, pos, &inv, half_split);
                let got: Vec<f32> = if hh < nh {
                    gq[(r * nh + hh) * d..][..d].to_vec()
                } else {
                    let e = heads[hh - nh];
                    let row = e.offset as usize + if e.kind == HeadEntry::STREAMING { e.sink as usize + pos - win } else { pos };
                    let values: Vec<f32> = qkv[r * stride + (nh + ng + hh - nh) * d..][..d].iter().map(|&x| round_bf16(x)).collect();
                    err = err.max(max_err(&values, &gv[row * d..][..d]));
                    v = v.iter().map(|&x| round_bf16(x)).collect();
                    gk[row * d..][..d].to_vec()
                };
                // Angles near 1000 rad: sin/cos of the GPU and the CPU differ by a few ulp, and
                // a cached key may round to the neighbouring bf16 (2^-6 for |x| < 4).
                err = err.max(max_err(&v, &got));
            }
        }
        out.push(Parity { case: format!("rope_append: {nh} q + {ng} kv heads of {d}, positions {p0}.., half_split {half_split}"), max_abs_err: err, bound: 2e-2 });
    }

    // SiLU x up.
    let (rows, inter) = (3usize, 14336usize);
    let gu: Vec<f32> = random(seed + 4, rows * 2 * inter, 6.0).into_iter().map(round_bf16).collect();
    let (gug, og) = (gpu.upload(&bf16_bits(&gu))?, gpu.zeros::<u16>(rows * inter)?);
    gpu.silu_mul(gpu.addr(&gug), gpu.addr(&og), rows, inter)?;
    let got = bf16_to_f32(&gpu.download(&og)?);
    out.push(Parity { case: format!("silu_mul: {rows} rows of {inter} (bf16 out)"), max_abs_err: max_err(&silu_mul_ref(&gu, inter), &got), bound: 0.25 });

    // Argmax over a vocabulary with a tie (the lower index wins).
    let mut logits = random(seed + 5, 128_256, 10.0);
    logits[70_000] = 20.0;
    logits[90_000] = 20.0;
    let (lg, ig) = (gpu.upload(&logits)?, gpu.zeros::<i32>(1)?);
    gpu.argmax(gpu.addr(&lg), logits.len(), gpu.addr(&ig))?;
    let got = gpu.download(&ig)?[0];
    out.push(Parity { case: format!("argmax over 128256 with a tie: {got} (want 70000)"), max_abs_err: (got - 70_000).abs() as f64, bound: 0.0 });

    // Window compaction with overlapping source and destination.
    let (d, rows, src, dst, keep) = (128usize, 600usize, 150usize, 4usize, 256usize);
    let data = random(seed + 6, 2 * rows * d, 1.0);
    let bits = bf16_bits(&data);
    let (kg, vg) = (gpu.upload(&bits[..rows * d])?, gpu.upload(&bits[rows * d..])?);
    let offs = gpu.upload(&[0i32])?;
    gpu.compact_window(gpu.addr(&kg), gpu.addr(&vg), gpu.addr(&offs), 1, src, dst, keep, d)?;
    let (gk, gv) = (gpu.download(&kg)?, gpu.download(&vg)?);
    let mut want_k = bits[..rows * d].to_vec();
    want_k.copy_within(src * d..(src + keep) * d, dst * d);
    let mut want_v = bits[rows * d..].to_vec();
    want_v.copy_within(src * d..(src + keep) * d, dst * d);
    let wrong = gk.iter().zip(&want_k).chain(gv.iter().zip(&want_v)).filter(|(a, b)| a != b).count();
    out.push(Parity { case: format!("compact_window: {keep} rows from {src} to {dst} (overlapping), elements wrong"), max_abs_err: wrong as f64, bound: 0.0 });

    // cuBLAS product: bf16 in, f32 out, accumulate into y (beta = 1).
    let (t, k, m) = (5usize, 4096usize, 300usize);
    let xv: Vec<f32> = random(seed + 7, t * k, 1.0).into_iter().map(round_bf16).collect();
    let wv: Vec<f32> = random(seed + 8, m * k, 0.02).into_iter().map(round_bf16).collect();
    let y0 = random(seed + 9, t * m, 1.0);
    let (xg, wg, yg) = (gpu.upload(&bf16_bits(&xv))?, gpu.upload(&bf16_bits(&wv))?, gpu.upload(&y0)?);
    gpu.gemm(gpu.addr(&xg), gpu.addr(&wg), gpu.addr(&yg), t, k, m, 1.0, false)?;
    let got = gpu.download(&yg)?;
    let want: Vec<f32> = (0..t * m).map(|i| y0[i] + (0..k).map(|j| xv[(i / m) * k + j] as f64 * wv[(i % m) * k + j] as f64).sum::<f64>() as f32).collect();
    out.push(Parity { case: format!("gemm (cuBLAS): [{t} x {k}] x [{m} x {k}]^T + y"), max_abs_err: max_err(&want, &got), bound: 1e-3 });
    // The same product written as bf16: within one bf16 rounding (2^-8 relative, |y| < 2).
    let yb = gpu.zeros::<u16>(t * m)?;
    gpu.gemm(gpu.addr(&xg), gpu.addr(&wg), gpu.addr(&yb), t, k, m, 0.0, true)?;
    let got = bf16_to_f32(&gpu.download(&yb)?);
    let want: Vec<f32> = want.iter().zip(&y0).map(|(w, y)| w - y).collect();
    out.push(Parity { case: format!("gemm (cuBLAS, bf16 out): [{t} x {k}] x [{m} x {k}]^T"), max_abs_err: max_err(&want, &got), bound: 1e-2 });
    Ok(out)
}

/// Milliseconds of one prefill-attention launch for a Llama-3-8B layer (32 query / 8 KV
/// heads of 128): a chunk of `t` queries at positions `first..first + t` over a cache of
/// random keys, KV heads retrieval where `retrieval[g]` (else streaming, sink 128 + recent
/// 256). Also returns the multiply-adds of the causal attention of the retrieval heads x 2
/// x 2 (FLOPs as usually counted), so that time can be read as TFLOPS.
pub fn time_prefill_attention(gpu: &Gpu, retrieval: &[bool], t: usize, first: usize, iters: usize) -> Result<(f64, f64)> {
    let (h, d) = (32usize, 128usize);
    let n = first + t;
    let (sink, recent) = (128usize, 256usize);
    let mut at = 0;
    let heads: Vec<HeadEntry> = retrieval
        .iter()
        .map(|&r| {
            let e = if r { HeadEntry::retrieval(at) } else { HeadEntry::streaming(at, sink, recent) };
            at += if r { n } else { sink + recent + t };
            e
        })
        .collect();
    let window_start = n - (recent + t).min(n - sink);
    let table = HeadEntry::table(&heads);
    let (k, v) = (gpu.zeros::<u16>(at * d)?, gpu.zeros::<u16>(at * d)?);
    gpu.fill_uniform(gpu.addr(&k), at * d, 1, 1.0)?;
    gpu.fill_uniform(gpu.addr(&v), at * d, 2, 1.0)?;
    let q = gpu.zeros::<f32>(t * h * d)?;
    let out = gpu.zeros::<u16>(t * h * d)?;
    let (tab, state) = (gpu.upload(&table)?, gpu.upload(&[first as i32, window_start as i32])?);
    let run = || gpu.prefill_attention(gpu.addr(&q), gpu.addr(&k), gpu.addr(&v), gpu.addr(&tab), gpu.addr(&state), t, h, h / retrieval.len(), d, gpu.addr(&out));
    run()?;
    gpu.sync()?;
    let started = std::time::Instant::now();
    for _ in 0..iters {
        run()?;
    }
    gpu.sync()?;
    let ms = started.elapsed().as_secs_f64() * 1000.0 / iters as f64;
    let pairs = (first * t + t * (t + 1) / 2) as f64; // visible (query, key) pairs of a causal head
    let flops = 4.0 * pairs * d as f64 * (h / retrieval.len()) as f64 * retrieval.iter().filter(|&&r| r).count() as f64;
    Ok((ms, flops))
}
