//! Parity of every kernel against its CPU reference on seeded random inputs (`duo cuda-check`).

use crate::decode_attention::KvType;
use crate::ops::{bf16_bits, hash_uniform, rms_norm_ref, rope_ref, round_bf16, silu_mul_ref};
use crate::paged::{PagedLayout, Ring, Tables};
use crate::prefill_attention::{self, HeadEntry};
use crate::runtime::{Gpu, PrefillKernel};
use crate::{decode_attention, model, Parity, Result};
use std::sync::Arc;

/// The largest absolute difference of `got` from `want`; infinite where their lengths differ
/// or a difference is NaN (`f64::max` would pass over a NaN, and a kernel that writes one
/// would look exact).
pub(crate) fn max_err(want: &[f32], got: &[f32]) -> f64 {
    if want.len() != got.len() {
        return f64::INFINITY;
    }
    want.iter()
        .zip(got)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .map(|e| if e.is_nan() { f64::INFINITY } else { e })
        .fold(0.0, f64::max)
}

fn bf16_to_f32(v: &[u16]) -> Vec<f32> {
    v.iter()
        .map(|&b| half::bf16::from_bits(b).to_f32())
        .collect()
}

fn random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n as u64)
        .map(|i| hash_uniform(seed, i) * scale)
        .collect()
}

/// The groups of parity checks, in the order [`check`] runs them.
pub const CHECK_GROUPS: [&str; 5] = ["ops", "prefill", "dequant", "decode", "model"];

/// Runs every parity check; each result says what was compared and its bound.
pub fn check(gpu: &Arc<Gpu>, seed: u64) -> Result<Vec<Parity>> {
    let mut out = Vec::new();
    for group in CHECK_GROUPS {
        out.extend(check_group(gpu, group, seed, None)?);
    }
    Ok(out)
}

/// Whether a case runs under a `cases` filter (`duo cuda-check --cases`): texts separated by
/// `|`, one of which the start of the case's name (what is known before it runs: the group's
/// words and the cache, not the kernel or the shape) contains, ignoring case; empty texts
/// match nothing. Every case runs without a filter.
pub fn case_wanted(cases: Option<&str>, name: &str) -> bool {
    let name = name.to_lowercase();
    cases.is_none_or(|c| c.split('|').map(str::trim).any(|part| !part.is_empty() && name.contains(&part.to_lowercase())))
}

/// One group of [`CHECK_GROUPS`]: the small kernels, prefill attention (bf16 and fp8 caches),
/// GGUF dequantisation, decode attention, or the whole model and its pools. `cases`
/// ([`case_wanted`]) picks among the prefill, decode and model groups' cases, so that a short
/// call to a GPU can run the few that a change touches; the other groups run whole.
pub fn check_group(gpu: &Arc<Gpu>, group: &str, seed: u64, cases: Option<&str>) -> Result<Vec<Parity>> {
    match group {
        "ops" => ops(gpu, seed),
        "prefill" => {
            let mut out = Vec::new();
            for (case, x, layout) in prefill_attention::cases(seed) {
                if case_wanted(cases, &case) {
                    out.push(prefill(gpu, &case, &x, &layout, seed, PrefillKernel::Mma)?);
                }
                // Hopper's wgmma kernel where it runs, on the same problem.
                if gpu.wgmma_prefill_runs(x.head_dim, KvType::Bf16) && case_wanted(cases, &format!("{case}, wgmma")) {
                    out.push(prefill(gpu, &format!("{case}, wgmma"), &x, &layout, seed, PrefillKernel::Wgmma)?);
                }
                // The same problem over byte caches, against the reference on the dequantised
                // cache, by the mma.sync kernel and, where it is chosen for them here (on
                // Hopper unless DUO_PREFILL_WG_QUANTISED=0), the wgmma kernel.
                for kv in [KvType::Fp8, KvType::Int8, KvType::Int4, KvType::K8V4] {
                    if !case_wanted(cases, &format!("{case}, {kv:?} cache")) {
                        continue;
                    }
                    let xq = prefill_attention::PrefillInput {
                        keys: kv.key().round_rows(&x.keys, x.head_dim),
                        values: kv.value().round_rows(&x.values, x.head_dim),
                        ..x.clone()
                    };
                    let layout = PagedLayout {
                        kv,
                        kv_streaming: kv,
                        ..layout.clone()
                    };
                    out.push(prefill(gpu, &format!("{case}, {kv:?} cache"), &xq, &layout, seed, PrefillKernel::Mma)?);
                    if gpu.prefill_kernel_for(x.head_dim, kv) == PrefillKernel::Wgmma {
                        let name = format!("{case}, {kv:?} cache, wgmma");
                        out.push(prefill(gpu, &name, &xq, &layout, seed, PrefillKernel::Wgmma)?);
                    }
                }
            }
            Ok(out)
        }
        "dequant" => dequant(gpu, seed),
        "decode" => decode_attention::check_kernel(gpu, seed, cases),
        "model" => model::check_model(gpu, seed, cases),
        other => Err(crate::CudaError::Input(format!(
            "no check group {other}: the groups are {}",
            CHECK_GROUPS.join(", ")
        ))),
    }
}

/// One slot's tables with blocks in a seeded shuffled order, and the pool's size in blocks.
fn shuffled_tables(layout: &PagedLayout, tokens: usize, seed: u64) -> (Tables, usize) {
    use rand::{seq::SliceRandom, SeedableRng};
    let total = layout.blocks_for(tokens, Ring::Prefill) + 5;
    let mut perm: Vec<u32> = (0..total as u32).collect();
    perm.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let sb = layout.streaming_blocks(Ring::Prefill);
    let streaming = perm[..sb].to_vec();
    let retrieval = perm[sb..layout.blocks_for(tokens, Ring::Prefill)].to_vec();
    (
        Tables {
            retrieval,
            streaming,
            cap: layout.ring_rows(Ring::Prefill),
        },
        total,
    )
}

fn prefill(
    gpu: &Gpu,
    case: &str,
    x: &prefill_attention::PrefillInput,
    layout: &PagedLayout,
    seed: u64,
    kernel: PrefillKernel,
) -> Result<Parity> {
    let want = prefill_attention::reference(x)?;
    let (t, h, d, n) = (x.tokens(), x.n_heads, x.head_dim, x.positions());
    let (tables, blocks) = shuffled_tables(layout, n, seed);
    // Unused rows are poisoned; positions are written in order, so each ring keeps the latest.
    let rows = blocks * layout.group() * layout.block_tokens;
    let (mut keys, mut values) = (vec![300.0f32; rows * d], vec![300.0f32; rows * d]);
    for (g, &e) in x.heads.iter().enumerate() {
        for p in 0..n {
            let r = tables.row(layout, e, p);
            keys[r * d..][..d].copy_from_slice(&x.keys[(g * n + p) * d..][..d]);
            values[r * d..][..d].copy_from_slice(&x.values[(g * n + p) * d..][..d]);
        }
    }
    let q = gpu.upload(&x.q)?;
    let heads = gpu.upload(&HeadEntry::table(&x.heads))?;
    let tab = gpu.upload(&decode_attention::table_rows(layout, &[tables]))?;
    let state = gpu.upload(&[0i32, x.first_position as i32])?;
    let o = gpu.zeros::<u16>(t * h * d)?;
    let mut paged = layout.paged_args(gpu.addr(&tab));
    // The cache as stored: bf16 bits, or bytes with row scales (the keys and values given
    // are already what the byte cache holds, so quantising them again gives the same values).
    let (k, v, _scales) = if layout.kv.is_quantised() {
        let ((kb, ks), (vb, vs)) = (
            layout.kv.key().quantise_rows(&keys, d)?,
            layout.kv.value().quantise_rows(&values, d)?,
        );
        let scales = (gpu.upload(&ks)?, gpu.upload(&vs)?);
        paged = paged.with_scales(gpu.addr(&scales.0), gpu.addr(&scales.1));
        (gpu.upload(&kb)?, gpu.upload(&vb)?, Some(scales))
    } else {
        let bytes = |v: &[f32]| {
            bf16_bits(v)
                .iter()
                .flat_map(|b| b.to_le_bytes())
                .collect::<Vec<u8>>()
        };
        (
            gpu.upload(&bytes(&keys))?,
            gpu.upload(&bytes(&values))?,
            None,
        )
    };
    gpu.prefill_attention(
        kernel,
        gpu.addr(&q),
        gpu.addr(&k),
        gpu.addr(&v),
        k.len(),
        gpu.addr(&heads),
        gpu.addr(&state),
        paged,
        t,
        h,
        h / x.heads.len(),
        d,
        layout.kv,
        gpu.addr(&o),
    )?;
    let got = bf16_to_f32(&gpu.download(&o)?);
    Ok(Parity {
        case: case.into(),
        max_abs_err: max_err(&want, &got),
        bound: 1e-2,
    })
}

/// GGUF blocks of every type the GPU takes, dequantised to bf16: bit-identical to the CPU
/// reference rounded to bf16.
fn dequant(gpu: &Gpu, seed: u64) -> Result<Vec<Parity>> {
    use crate::dequant::{random_blocks, reference, QuantType};
    let mut out = Vec::new();
    for ty in [
        QuantType::F32,
        QuantType::F16,
        QuantType::Bf16,
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q4K,
        QuantType::Q6K,
    ] {
        let n = 256 * 1031;
        let bytes = random_blocks(ty, n, seed ^ 0xde9)?;
        let want: Vec<f32> = reference(ty, &bytes, n)?
            .into_iter()
            .map(round_bf16)
            .collect();
        let raw = gpu.upload(&bytes)?;
        let buf = gpu.upload(&vec![0xffffu16; n])?; // poisoned: every value must be written
        gpu.dequant_bf16(gpu.addr(&raw), gpu.addr(&buf), n, ty)?;
        let got = bf16_to_f32(&gpu.download(&buf)?);
        out.push(Parity {
            case: format!("dequant {ty:?} -> bf16: {n} values"),
            max_abs_err: max_err(&want, &got),
            bound: 0.0,
        });
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
    out.push(Parity {
        case: format!("fill_uniform_bf16: {n} values"),
        max_abs_err: max_err(&crate::ops::uniform_bf16(seed, n, 0.37), &got),
        bound: 0.0,
    });

    // Embedding of random rows by token id.
    let (hidden, toks) = (96, [5i32, 0, 77, 5]);
    let t = gpu.upload(&toks)?;
    let x = gpu.zeros::<f32>(toks.len() * hidden)?;
    gpu.embed(gpu.addr(&t), 0, seed, 1.0, gpu.addr(&x), hidden, toks.len())?;
    let want: Vec<f32> = toks
        .iter()
        .flat_map(|&k| {
            (0..hidden as u64)
                .map(move |i| round_bf16(hash_uniform(seed, k as u64 * hidden as u64 + i)))
        })
        .collect();
    out.push(Parity {
        case: "embed: random rows by token id".into(),
        max_abs_err: max_err(&want, &gpu.download(&x)?),
        bound: 0.0,
    });

    // RMSNorm: rows of 4096 and 576 (one float4 per thread), 8192 (two), 4098 and 20000
    // (the scalar loop).
    for (rows, dim) in [(3usize, 4096usize), (5, 576), (2, 8192), (2, 4098), (1, 20000)] {
        let xv = random(seed + 1, rows * dim, 3.0);
        let wv = random(seed + 2, dim, 1.5);
        let (xg, wg, og) = (
            gpu.upload(&xv)?,
            gpu.upload(&wv)?,
            gpu.zeros::<u16>(rows * dim)?,
        );
        gpu.rms_norm(gpu.addr(&xg), gpu.addr(&wg), gpu.addr(&og), rows, dim, 1e-5)?;
        let got = bf16_to_f32(&gpu.download(&og)?);
        // One bf16 rounding step apart at most (sum order differs): 2^-8 relative of ~|w x / rms|.
        out.push(Parity {
            case: format!("rms_norm: {rows} rows of {dim} (bf16 out)"),
            max_abs_err: max_err(&rms_norm_ref(&xv, &wv, 1e-5), &got),
            bound: 4e-2,
        });
    }

    // RoPE + append into a paged cache: rows of two sequences at their own positions
    // (one past its streaming sinks, its ring wrapped), and a padding row that writes nothing;
    // every cache type at heads of 128 and 64 (bf16; fp8, int8, int4 and K8V4 codes with a
    // scale word per row; int4 and fp8 keys, with their queries, in a Hadamard basis).
    for (half_split, d, kv) in [
        (true, 128usize, KvType::Bf16),
        (false, 64, KvType::Bf16),
        (true, 128, KvType::Fp8),
        (false, 64, KvType::Fp8),
        (true, 128, KvType::Int8),
        (false, 64, KvType::Int8),
        (true, 128, KvType::Int4),
        (false, 64, KvType::Int4),
        (true, 128, KvType::K8V4),
        (false, 64, KvType::K8V4),
    ] {
        // Keys and values each in their side's type (K8V4: int8 and int4).
        let (kt, vt) = (kv.key(), kv.value());
        let (nh, ng) = (4usize, 2usize);
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 500_000f32.powf(-2.0 * i as f32 / d as f32))
            .collect();
        let layout = rope_layout(kv, kv);
        let rows_at: [(i32, usize); 4] = [(0, 1000), (0, 1001), (1, 2), (-1, 7)];
        let t = rows_at.len();
        let (t0, blocks0) = shuffled_tables(&layout, 1002, seed);
        let sb = layout.streaming_blocks(Ring::Prefill);
        let t1 = Tables {
            retrieval: (blocks0 as u32..blocks0 as u32 + 1).collect(),
            streaming: (blocks0 as u32 + 1..(blocks0 + 1 + sb) as u32).collect(),
            cap: layout.ring_rows(Ring::Prefill),
        };
        let blocks = blocks0 + 1 + sb;
        let tables = [t0, t1];
        let heads = layout.heads(0);
        let pool_rows = blocks * layout.group() * layout.block_tokens;
        let qkv: Vec<f32> = random(seed + 3, t * (nh + 2 * ng) * d, 2.0)
            .into_iter()
            .map(round_bf16)
            .collect();
        let Appended { q: gq, k: gk_bytes, v: gv_bytes, ks: gks, vs: gvs } =
            run_rope_append(gpu, &layout, &tables, blocks, &rows_at, &qkv, &inv, (nh, ng, d), half_split)?;
        let cached = |ty: KvType, bytes: &[u8], scales: &[f32]| -> Vec<f32> {
            match ty {
                KvType::Fp8 | KvType::Int8 | KvType::Int4 => ty.dequantise_rows(bytes, scales, d),
                _ => bytes
                    .chunks(2)
                    .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                    .collect(),
            }
        };
        let (gk, gv) = (cached(kt, &gk_bytes, &gks), cached(vt, &gv_bytes, &gvs));
        let (mut err, mut scales_off) = (0.0f64, 0usize);
        let mut written = std::collections::HashSet::new();
        let stride = (nh + 2 * ng) * d;
        for (r, &(slot, pos)) in rows_at.iter().enumerate() {
            for hh in 0..nh + ng {
                let mut v = qkv[r * stride + hh * d..][..d].to_vec();
                rope_ref(&mut v, pos, &inv, half_split);
                if kt.turns_keys() {
                    // Queries and keys leave in the Hadamard basis of int4 and fp8 keys.
                    crate::int4::hadamard(&mut v);
                }
                if hh < nh {
                    err = err.max(max_err(&v, &gq[(r * nh + hh) * d..][..d]));
                } else if slot >= 0 {
                    let row = tables[slot as usize].row(&layout, heads[hh - nh], pos);
                    written.insert(row);
                    let values = &qkv[r * stride + (nh + ng + hh - nh) * d..][..d];
                    if kv.is_quantised() {
                        // Values (bf16 inputs) quantise exactly as the host does. Keys come
                        // from a rotation whose sin/cos differ by a few ulp between GPU and
                        // CPU: within half a step of the exact rotation (e4m3: 1/16 of the
                        // value; int8: half the row's scale), measured relative to the row's
                        // largest key; their scale is the host's (fp8: or its neighbour where
                        // the largest key moved by an ulp across a power of two; int8: within
                        // a few ulp; int4: step and minimum within an f16 ulp, and half a step
                        // plus the f16 rounding of the dequantised value).
                        err = err.max(max_err(&vt.round_rows(values, d), &gv[row * d..][..d]));
                        let amax = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                        // The scale word the host gives a row in a side's type.
                        let scale_of = |ty: KvType, row: &[f32]| {
                            let max = row.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                            match ty {
                                KvType::Fp8 => crate::fp8::row_scale(max),
                                KvType::Int8 => crate::int8::row_scale(max),
                                _ => crate::int4::quantise_row(row).1,
                            }
                        };
                        let (want, want_v) = (scale_of(kt, &v), scale_of(vt, values));
                        let step4 = crate::int4::params_of(want).0.to_f32();
                        let half_step = |x: f32| match kt {
                            KvType::Fp8 => x.abs() / 16.0,
                            KvType::Int8 => want * 0.5 * (1.0 + 1e-5),
                            _ => step4 * 0.52 + x.abs() * 1e-3,
                        };
                        let rel = v
                            .iter()
                            .zip(&gk[row * d..][..d])
                            .map(|(x, g)| {
                                ((x - g).abs() - half_step(*x)).max(0.0) as f64 / amax as f64
                            })
                            .fold(0.0, f64::max);
                        err = err.max(rel);
                        let key_scale_ok = match kt {
                            KvType::Fp8 => [want, want * 2.0, want / 2.0].contains(&gks[row]),
                            KvType::Int8 => (gks[row] - want).abs() <= want * 1e-5,
                            _ => {
                                let ((gs, gz), (ws, wz)) = (crate::int4::params_of(gks[row]), crate::int4::params_of(want));
                                (gs.to_f32() - ws.to_f32()).abs() <= ws.to_f32() * 1e-3
                                    && (gz.to_f32() - wz.to_f32()).abs() <= wz.to_f32().abs() * 1e-3 + 1e-6
                            }
                        };
                        scales_off += usize::from(!key_scale_ok) + usize::from(gvs[row].to_bits() != want_v.to_bits());
                    } else {
                        let values: Vec<f32> = values.iter().map(|&x| round_bf16(x)).collect();
                        err = err.max(max_err(&values, &gv[row * d..][..d]));
                        let keys: Vec<f32> = v.iter().map(|&x| round_bf16(x)).collect();
                        // Angles near 1000 rad: sin/cos of the GPU and the CPU differ by a few
                        // ulp, and a cached key may round to the neighbouring bf16 (2^-6 for |x| < 4).
                        err = err.max(max_err(&keys, &gk[row * d..][..d]));
                    }
                }
            }
        }
        // Every other row is untouched (the padding row wrote nothing).
        let (k_row, v_row) = (kt.bytes_for(d), vt.bytes_for(d));
        let stray = (0..pool_rows)
            .filter(|r| !written.contains(r))
            .filter(|&r| {
                gk_bytes[r * k_row..][..k_row]
                    .iter()
                    .chain(&gv_bytes[r * v_row..][..v_row])
                    .any(|&b| b != 0x7f)
                    || (kv.is_quantised() && (gks[r] != -1.0 || gvs[r] != -1.0))
            })
            .count();
        out.push(Parity {
            case: format!("rope_append (paged, {kv:?}): {nh} q + {ng} kv heads of {d}, two sequences and a padding row, half_split {half_split}; rows written elsewhere: {stray}, scales off: {scales_off}"),
            max_abs_err: if stray == 0 && scales_off == 0 { err } else { f64::INFINITY },
            bound: 2e-2,
        });
    }

    out.extend(rope_append_split_types(gpu, seed)?);

    // SiLU x up.
    let (rows, inter) = (3usize, 14336usize);
    let gu: Vec<f32> = random(seed + 4, rows * 2 * inter, 6.0)
        .into_iter()
        .map(round_bf16)
        .collect();
    let (gug, og) = (
        gpu.upload(&bf16_bits(&gu))?,
        gpu.zeros::<u16>(rows * inter)?,
    );
    gpu.silu_mul(gpu.addr(&gug), gpu.addr(&og), rows, inter)?;
    let got = bf16_to_f32(&gpu.download(&og)?);
    out.push(Parity {
        case: format!("silu_mul: {rows} rows of {inter} (bf16 out)"),
        max_abs_err: max_err(&silu_mul_ref(&gu, inter), &got),
        bound: 0.25,
    });

    // Argmax over a vocabulary with a tie (the lower index wins).
    let mut logits = random(seed + 5, 128_256, 10.0);
    logits[70_000] = 20.0;
    logits[90_000] = 20.0;
    let (lg, ig) = (gpu.upload(&logits)?, gpu.zeros::<i32>(1)?);
    gpu.argmax(gpu.addr(&lg), logits.len(), gpu.addr(&ig))?;
    let got = gpu.download(&ig)?[0];
    out.push(Parity {
        case: format!("argmax over 128256 with a tie: {got} (want 70000)"),
        max_abs_err: (got - 70_000).abs() as f64,
        bound: 0.0,
    });

    // Block copies and table updates; value blocks half as wide as key blocks (as K8V4's).
    let (elems, v_elems) = (3 * 64, 3 * 32);
    let data: Vec<u16> = bf16_bits(&random(seed + 6, 4 * (elems + v_elems), 1.0));
    let (sk, sv) = (
        gpu.upload(&data[..4 * elems])?,
        gpu.upload(&data[4 * elems..])?,
    );
    let (dk, dv) = (gpu.zeros::<u16>(4 * elems)?, gpu.zeros::<u16>(4 * v_elems)?);
    let pairs = gpu.upload(&[2i32, 0, 0, 3])?;
    gpu.copy_blocks(
        gpu.addr(&sk),
        gpu.addr(&sv),
        gpu.addr(&dk),
        gpu.addr(&dv),
        gpu.addr(&pairs),
        2,
        (elems, v_elems),
    )?;
    let (gk, gv) = (gpu.download(&dk)?, gpu.download(&dv)?);
    let mut want_k = vec![0u16; 4 * elems];
    want_k[..elems].copy_from_slice(&data[2 * elems..3 * elems]);
    want_k[3 * elems..].copy_from_slice(&data[..elems]);
    let sv_host = &data[4 * elems..];
    let mut want_v = vec![0u16; 4 * v_elems];
    want_v[..v_elems].copy_from_slice(&sv_host[2 * v_elems..3 * v_elems]);
    want_v[3 * v_elems..].copy_from_slice(&sv_host[..v_elems]);
    let tab = gpu.upload(&[0i32; 10])?;
    let patch = gpu.upload(&[7i32, 42, 1, -5])?;
    gpu.scatter_i32(gpu.addr(&tab), gpu.addr(&patch), 2)?;
    let mut want_tab = [0i32; 10];
    want_tab[7] = 42;
    want_tab[1] = -5;
    let wrong = gk
        .iter()
        .zip(&want_k)
        .chain(gv.iter().zip(&want_v))
        .filter(|(a, b)| a != b)
        .count()
        + gpu
            .download(&tab)?
            .iter()
            .zip(&want_tab)
            .filter(|(a, b)| a != b)
            .count();
    out.push(Parity {
        case: "copy_blocks and scatter_i32: elements wrong".into(),
        max_abs_err: wrong as f64,
        bound: 0.0,
    });

    // Argmax of several rows at once: rows of 16-byte loads (1000) and of single ones (999).
    for n in [1000usize, 999] {
        let rows3: Vec<f32> = random(seed + 10, 3 * n, 1.0);
        let want: Vec<i32> = rows3
            .chunks(n)
            .map(|r| {
                r.iter()
                    .enumerate()
                    .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
                    .0 as i32
            })
            .collect();
        let (lg, ig) = (gpu.upload(&rows3)?, gpu.zeros::<i32>(3)?);
        gpu.argmax_rows(gpu.addr(&lg), n, 3, gpu.addr(&ig))?;
        let wrong = gpu
            .download(&ig)?
            .iter()
            .zip(&want)
            .filter(|(a, b)| a != b)
            .count();
        out.push(Parity {
            case: format!("argmax_rows: 3 rows of {n}, rows wrong"),
            max_abs_err: wrong as f64,
            bound: 0.0,
        });
    }

    // cuBLAS product: bf16 in, f32 out, accumulate into y (beta = 1).
    let (t, k, m) = (5usize, 4096usize, 300usize);
    let xv: Vec<f32> = random(seed + 7, t * k, 1.0)
        .into_iter()
        .map(round_bf16)
        .collect();
    let wv: Vec<f32> = random(seed + 8, m * k, 0.02)
        .into_iter()
        .map(round_bf16)
        .collect();
    let y0 = random(seed + 9, t * m, 1.0);
    let (xg, wg, yg) = (
        gpu.upload(&bf16_bits(&xv))?,
        gpu.upload(&bf16_bits(&wv))?,
        gpu.upload(&y0)?,
    );
    gpu.gemm(
        gpu.addr(&xg),
        gpu.addr(&wg),
        gpu.addr(&yg),
        t,
        k,
        m,
        1.0,
        false,
    )?;
    let got = gpu.download(&yg)?;
    let want: Vec<f32> = (0..t * m)
        .map(|i| {
            y0[i]
                + (0..k)
                    .map(|j| xv[(i / m) * k + j] as f64 * wv[(i % m) * k + j] as f64)
                    .sum::<f64>() as f32
        })
        .collect();
    out.push(Parity {
        case: format!("gemm (cuBLAS): [{t} x {k}] x [{m} x {k}]^T + y"),
        max_abs_err: max_err(&want, &got),
        bound: 1e-3,
    });
    // The same product written as bf16: within one bf16 rounding (2^-8 relative, |y| < 2).
    let yb = gpu.zeros::<u16>(t * m)?;
    gpu.gemm(
        gpu.addr(&xg),
        gpu.addr(&wg),
        gpu.addr(&yb),
        t,
        k,
        m,
        0.0,
        true,
    )?;
    let got = bf16_to_f32(&gpu.download(&yb)?);
    let want: Vec<f32> = want.iter().zip(&y0).map(|(w, y)| w - y).collect();
    out.push(Parity {
        case: format!("gemm (cuBLAS, bf16 out): [{t} x {k}] x [{m} x {k}]^T"),
        max_abs_err: max_err(&want, &got),
        bound: 1e-2,
    });
    out.extend(gemv_parity(gpu, seed)?);
    Ok(out)
}

/// The RoPE + append checks' pool: one layer of a retrieval and a streaming KV head (sinks of
/// 4, a window of 16), blocks of 16 positions, streaming heads in `kv_streaming`.
fn rope_layout(kv: KvType, kv_streaming: KvType) -> PagedLayout {
    PagedLayout {
        retrieval: vec![vec![true, false]],
        sink: 4,
        recent: 16,
        block_tokens: 16,
        max_chunk: 8,
        max_tokens: 1200,
        kv,
        kv_streaming,
    }
}

/// What [`Gpu::rope_append`] left in [`run_rope_append`]'s pool: the queries (f32), the key
/// and value bytes and their row scales (poisoned beforehand: bytes 0x7f, scales -1).
struct Appended {
    q: Vec<f32>,
    k: Vec<u8>,
    v: Vec<u8>,
    ks: Vec<f32>,
    vs: Vec<f32>,
}

/// RoPE (`inv` frequencies) + append of `qkv` (bf16 values, rows of `(nh + 2 ng) x d`) at
/// `rows_at` (slot, position) rows (slot -1: a padding row) into a poisoned pool of `blocks`
/// blocks of `layout` under `tables` (one per slot), scales given where the cache is quantised.
#[allow(clippy::too_many_arguments)]
fn run_rope_append(
    gpu: &Gpu,
    layout: &PagedLayout,
    tables: &[Tables],
    blocks: usize,
    rows_at: &[(i32, usize)],
    qkv: &[f32],
    inv: &[f32],
    (nh, ng, d): (usize, usize, usize),
    half_split: bool,
) -> Result<Appended> {
    let (kt, vt) = (layout.kv.key(), layout.kv.value());
    let t = rows_at.len();
    let pool_rows = blocks * layout.group() * layout.block_tokens;
    let slots: Vec<i32> = rows_at.iter().map(|r| r.0).collect();
    let pos: Vec<i32> = rows_at.iter().map(|r| r.1 as i32).collect();
    let (qkvg, sg, pg, invg, hg) = (
        gpu.upload(&bf16_bits(qkv))?,
        gpu.upload(&slots)?,
        gpu.upload(&pos)?,
        gpu.upload(inv)?,
        gpu.upload(&HeadEntry::table(&layout.heads(0)))?,
    );
    let tab = gpu.upload(&decode_attention::table_rows(layout, tables))?;
    // Poison: 0x7f7f as bf16, NaN as e4m3; scales -1.
    let (qg, kg, vg) = (
        gpu.zeros::<f32>(t * nh * d)?,
        gpu.upload(&vec![0x7fu8; kt.bytes_for(pool_rows * d)])?,
        gpu.upload(&vec![0x7fu8; vt.bytes_for(pool_rows * d)])?,
    );
    let (ksg, vsg) = (gpu.upload(&vec![-1.0f32; pool_rows])?, gpu.upload(&vec![-1.0f32; pool_rows])?);
    let mut paged = layout.paged_args(gpu.addr(&tab));
    if layout.kv.is_quantised() {
        paged = paged.with_scales(gpu.addr(&ksg), gpu.addr(&vsg));
    }
    gpu.rope_append(
        gpu.addr(&qkvg),
        gpu.addr(&sg),
        gpu.addr(&pg),
        gpu.addr(&invg),
        gpu.addr(&hg),
        nh,
        ng,
        d,
        half_split,
        gpu.addr(&qg),
        gpu.addr(&kg),
        gpu.addr(&vg),
        t,
        (paged, layout.streaming_args(paged)),
    )?;
    Ok(Appended { q: gpu.download(&qg)?, k: gpu.download(&kg)?, v: gpu.download(&vg)?, ks: gpu.download(&ksg)?, vs: gpu.download(&vsg)? })
}

/// RoPE + append where streaming heads keep bf16 rows beside a quantised cache whose keys are
/// turned (fp8, int4: `--kv-dtype-streaming bf16`): a retrieval head's keys and its queries
/// leave in the Hadamard basis and quantised, a streaming head's keys and queries in RoPE's
/// own, as bf16 rows at the streaming view's (wider) rows. (The whole-model check cannot see
/// a wrong basis here: q . k is the same in both, so long as the pair agrees.)
fn rope_append_split_types(gpu: &Gpu, seed: u64) -> Result<Vec<Parity>> {
    let mut out = Vec::new();
    let (nh, ng, d) = (4usize, 2usize, 128usize);
    for kv in [KvType::Fp8, KvType::Int4] {
        let (kt, vt) = (kv.key(), kv.value());
        let layout = rope_layout(kv, KvType::Bf16);
        assert!(layout.split_types() && kt.turns_keys());
        // One sequence (slot 0): two rows in the ring, one in the sinks.
        let positions = [1000usize, 1001, 2];
        let t = positions.len();
        let (tables, blocks) = shuffled_tables(&layout, 1002, seed);
        let heads = layout.heads(0);
        let inv: Vec<f32> = (0..d / 2).map(|i| 500_000f32.powf(-2.0 * i as f32 / d as f32)).collect();
        let qkv: Vec<f32> = random(seed + 21, t * (nh + 2 * ng) * d, 2.0).into_iter().map(round_bf16).collect();
        let rows_at: Vec<(i32, usize)> = positions.iter().map(|&p| (0, p)).collect();
        let Appended { q: gq, k: gk, v: gv, ks: gks, vs: gvs } =
            run_rope_append(gpu, &layout, std::slice::from_ref(&tables), blocks, &rows_at, &qkv, &inv, (nh, ng, d), true)?;
        // A bf16 row of the streaming view: `row` counts rows of 2 x d bytes.
        let bf16_row = |bytes: &[u8], row: usize| -> Vec<f32> {
            bytes[row * 2 * d..][..2 * d].chunks(2).map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()).collect()
        };
        let stride = (nh + 2 * ng) * d;
        let (mut q_err, mut ret_err, mut st_err) = (0.0f64, 0.0f64, 0.0f64);
        for (r, &p) in positions.iter().enumerate() {
            for hh in 0..nh + ng {
                // Query head hh reads KV head hh / (nh / ng); KV head g is hh - nh.
                let g = if hh < nh { hh / (nh / ng) } else { hh - nh };
                let retrieval = heads[g].kind == HeadEntry::RETRIEVAL;
                let mut v = qkv[r * stride + hh * d..][..d].to_vec();
                rope_ref(&mut v, p, &inv, true);
                if retrieval {
                    crate::int4::hadamard(&mut v);
                }
                if hh < nh {
                    q_err = q_err.max(max_err(&v, &gq[(r * nh + hh) * d..][..d]));
                    continue;
                }
                let values = &qkv[r * stride + (nh + ng + g) * d..][..d];
                let row = tables.row(&layout, heads[g], p);
                if retrieval {
                    // Its type's codes and scale, within a step of the turned key (4-bit
                    // codes: half a step is 1/15 of the row's largest key), as a share of
                    // that largest key; the values exactly as the host quantises them.
                    let keys = kt.dequantise_rows(&gk[row * kt.bytes_for(d)..][..kt.bytes_for(d)], &gks[row..row + 1], d);
                    let amax = v.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
                    ret_err = ret_err.max(max_err(&v, &keys) / amax / 5.0);
                    let vals = vt.dequantise_rows(&gv[row * vt.bytes_for(d)..][..vt.bytes_for(d)], &gvs[row..row + 1], d);
                    ret_err = ret_err.max(max_err(&vt.round_rows(values, d), &vals));
                } else {
                    let keys: Vec<f32> = v.iter().map(|&x| round_bf16(x)).collect();
                    st_err = st_err.max(max_err(&keys, &bf16_row(&gk, tables.key_row(&layout, heads[g], p))));
                    let vals: Vec<f32> = values.iter().map(|&x| round_bf16(x)).collect();
                    st_err = st_err.max(max_err(&vals, &bf16_row(&gv, row)));
                }
            }
        }
        let case = |what: &str| format!("rope_append ({kv:?} beside bf16 windows): {what}, {nh} q + {ng} kv heads of {d}");
        out.push(Parity { case: case("queries, turned for the retrieval head's only"), max_abs_err: q_err, bound: 2e-2 });
        out.push(Parity { case: case("the retrieval head's rows, keys turned (error / 5 x its largest key)"), max_abs_err: ret_err, bound: 2e-2 });
        out.push(Parity { case: case("the streaming head's bf16 rows, keys not turned"), max_abs_err: st_err, bound: 2e-2 });
    }
    Ok(out)
}

/// duo's matrix-vector kernel ([`Gpu::gemv_fused`]) against f64 references, on input widths
/// of one item of chunks or less (576: SmolLM2's hidden size; an item is 1,024 values by
/// default), a partial last item (1,544), four (4,096) and fourteen (14,336), and at 2,500
/// outputs (SiLU pairs: 5,000 rows) more output rows than the grid's warps, so that a warp
/// moves on to further rows; at 1, 3 and 8 rows: bf16 rows into f32 plus the residual; f32
/// rows through RMSNorm into bf16; the same into SiLU pairs; bf16 [gate | up] rows whose SiLU
/// is the input, against `silu_mul`'s reference and bit for bit against `silu_mul` then the
/// product (gates up to +-3, and a few past +-88, where expf saturates). And batch
/// invariance: a row's result in a launch of 8 rows is bit for bit its result alone, and a
/// SiLU-input row's in a launch of 3.
fn gemv_parity(gpu: &Gpu, seed: u64) -> Result<Vec<Parity>> {
    use crate::runtime::{GemvInput, GemvOutput};
    let mut out = Vec::new();
    let dot = |x: &[f32], w: &[f32]| x.iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
    for (k, m) in [(576usize, 200usize), (1544, 96), (4096, 300), (4096, 2500), (14336, 64)] {
        let rows = crate::runtime::GEMV_ROWS;
        let bf = |v: Vec<f32>| v.into_iter().map(round_bf16).collect::<Vec<f32>>();
        let xv = bf(random(seed + 11, rows * k, 1.0));
        let xf: Vec<f32> = random(seed + 12, rows * k, 3.0).iter().map(|v| v + 0.5).collect();
        let norm: Vec<f32> = random(seed + 13, k, 0.5).iter().map(|v| 1.0 + v).collect();
        let wv = bf(random(seed + 14, 2 * m * k, 0.02));
        let y0 = random(seed + 15, rows * m, 1.0);
        let (xg, xfg, ng, wg) = (gpu.upload(&bf16_bits(&xv))?, gpu.upload(&xf)?, gpu.upload(&norm)?, gpu.upload(&bf16_bits(&wv))?);
        let normed = |at: usize| GemvInput::Normed { x: gpu.addr(&xfg) + (at * k * 4) as u64, norm: gpu.addr(&ng), eps: 1e-5 };
        let xn = rms_norm_ref(&xf, &norm, 1e-5);
        for t in [1usize, 3, 8] {
            // (RMSNorm in where its rows fit the kernel's shared memory.)
            let norms = Gpu::gemv_takes(t, k, normed(0));
            let yg = gpu.upload(&y0[..t * m])?;
            gpu.gemv_fused(GemvInput::Bf16(gpu.addr(&xg)), gpu.addr(&wg), GemvOutput::F32 { y: gpu.addr(&yg), beta: 1.0 }, t, k, m)?;
            let want: Vec<f32> = (0..t * m).map(|i| y0[i] + dot(&xv[i / m * k..][..k], &wv[i % m * k..][..k]) as f32).collect();
            out.push(Parity { case: format!("gemv (duo's): [{t} x {k}] x [{m} x {k}]^T + y"), max_abs_err: max_err(&want, &gpu.download(&yg)?), bound: 1e-3 });
            if !norms {
                continue;
            }
            let yb = gpu.zeros::<u16>(t * m)?;
            gpu.gemv_fused(normed(0), gpu.addr(&wg), GemvOutput::Bf16(gpu.addr(&yb)), t, k, m)?;
            let want: Vec<f32> = (0..t * m).map(|i| dot(&xn[i / m * k..][..k], &wv[i % m * k..][..k]) as f32).collect();
            let got = bf16_to_f32(&gpu.download(&yb)?);
            // (Products up to 3 in size: a bf16 output's half step is up to 2^-8, and the
            // normalised inputs round at the GPU's scale, one float step from the f64 one.)
            out.push(Parity { case: format!("gemv (duo's, RMSNorm in, bf16 out): [{t} x {k}] x [{m} x {k}]^T"), max_abs_err: max_err(&want, &got), bound: 2e-2 });
            // [gate | up] of m rows each: the reference rounds both to bf16 before the SiLU.
            let ya = gpu.zeros::<u16>(t * m)?;
            gpu.gemv_fused(normed(0), gpu.addr(&wg), GemvOutput::SiluPairs(gpu.addr(&ya)), t, k, 2 * m)?;
            let gu: Vec<f32> = (0..t * 2 * m).map(|i| round_bf16(dot(&xn[i / (2 * m) * k..][..k], &wv[i % (2 * m) * k..][..k]) as f32)).collect();
            let want = silu_mul_ref(&gu, m);
            out.push(Parity { case: format!("gemv (duo's, RMSNorm in, SiLU pairs out): [{t} x {k}] x [{} x {k}]^T", 2 * m), max_abs_err: max_err(&want, &bf16_to_f32(&gpu.download(&ya)?)), bound: 2e-2 });
        }
        // The SiLU in the input rows (rows of [gate | up], twice k wide): against the f64
        // product of silu_mul's reference, and bit for bit against silu_mul then the product.
        for t in [1usize, 3] {
            let mut gu_rows = bf(random(seed + 16, t * 2 * k, 3.0));
            // A few gates where expf underflows or overflows (their SiLU exact either way: the
            // gate, or zero).
            for (i, v) in [(3usize, 90.0f32), (11, -95.0), (7, -100.0)] {
                gu_rows[i] = v;
            }
            if !Gpu::gemv_takes(t, k, GemvInput::SiluOf(0)) {
                continue;
            }
            let (gug, act) = (gpu.upload(&bf16_bits(&gu_rows))?, gpu.zeros::<u16>(t * k)?);
            let (y1, y2) = (gpu.zeros::<f32>(t * m)?, gpu.zeros::<f32>(t * m)?);
            gpu.gemv_fused(GemvInput::SiluOf(gpu.addr(&gug)), gpu.addr(&wg), GemvOutput::F32 { y: gpu.addr(&y1), beta: 0.0 }, t, k, m)?;
            gpu.silu_mul(gpu.addr(&gug), gpu.addr(&act), t, k)?;
            gpu.gemv_fused(GemvInput::Bf16(gpu.addr(&act)), gpu.addr(&wg), GemvOutput::F32 { y: gpu.addr(&y2), beta: 0.0 }, t, k, m)?;
            let a = silu_mul_ref(&gu_rows, k);
            let want: Vec<f32> = (0..t * m).map(|i| dot(&a[i / m * k..][..k], &wv[i % m * k..][..k]) as f32).collect();
            let (got1, got2) = (gpu.download(&y1)?, gpu.download(&y2)?);
            out.push(Parity { case: format!("gemv (duo's, SiLU of [gate | up] in): [{t} x {k}] x [{m} x {k}]^T"), max_abs_err: max_err(&want, &got1), bound: 1e-3 });
            let differ = got1.iter().zip(&got2).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            out.push(Parity { case: format!("gemv (duo's): SiLU in its input against silu_mul then it, [{t} x {k}], values that differ"), max_abs_err: differ as f64, bound: 0.0 });
            if t == 3 {
                // Row 2 of the 3 alone: the same bits.
                let one = gpu.zeros::<f32>(m)?;
                gpu.gemv_fused(GemvInput::SiluOf(gpu.addr(&gug) + (2 * 2 * k * 2) as u64), gpu.addr(&wg), GemvOutput::F32 { y: gpu.addr(&one), beta: 0.0 }, 1, k, m)?;
                let differ = got1[2 * m..].iter().zip(&gpu.download(&one)?).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                out.push(Parity { case: format!("gemv (duo's, SiLU in): row 2 of 3 against it alone, [{k} x {m}], values that differ"), max_abs_err: differ as f64, bound: 0.0 });
            }
        }
        // Row 5 of an 8-row launch against row 5 alone: the same bits (through RMSNorm where
        // 8 rows of it fit).
        let norms = Gpu::gemv_takes(rows, k, normed(0));
        let input = |at: usize| if norms { normed(at) } else { GemvInput::Bf16(gpu.addr(&xg) + (at * k * 2) as u64) };
        let (all, one) = (gpu.zeros::<u16>(rows * m)?, gpu.zeros::<u16>(m)?);
        gpu.gemv_fused(input(0), gpu.addr(&wg), GemvOutput::SiluPairs(gpu.addr(&all)), rows, k, 2 * m)?;
        gpu.gemv_fused(input(5), gpu.addr(&wg), GemvOutput::SiluPairs(gpu.addr(&one)), 1, k, 2 * m)?;
        let (all, one) = (gpu.download(&all)?, gpu.download(&one)?);
        let differ = all[5 * m..6 * m].iter().zip(&one).filter(|(a, b)| a != b).count();
        out.push(Parity { case: format!("gemv (duo's): row 5 of 8 against it alone, [{k} x {}], values that differ", 2 * m), max_abs_err: differ as f64, bound: 0.0 });
    }
    Ok(out)
}

/// Milliseconds of one 8192 x 8192 x 8192 product by cuBLAS (bf16 in, f32 out): in a burst
/// (the mean of 10 after a warm-up), and sustained (the mean over `sustained_s` seconds of
/// products back to back, after one second of them), all on the same operands. The two differ
/// on a card that reaches its power limit: an H200 runs a 14 ms burst at 1,980 MHz and 774-788
/// TFLOPS, then holds about 700 W at 1.4-1.7 GHz (BENCHMARKS.md, session 18), so a prefill of
/// several seconds has the sustained rate as its floor.
pub fn time_product_burst_and_sustained(gpu: &Gpu, sustained_s: f64) -> Result<(f64, f64)> {
    let n = 8192;
    let mut run = linear_product(gpu, n, n, n, false)?;
    let burst = gpu.time_ms(10, &mut run)?;
    let reps = |seconds: f64| (seconds * 1000.0 / burst).ceil().max(1.0) as usize;
    gpu.time_ms(reps(1.0), &mut run)?;
    let sustained = gpu.time_ms(reps(sustained_s), &mut run)?;
    Ok((burst, sustained))
}

/// Milliseconds of one `[t x in_dim] x [out_dim x in_dim]^T` product (bf16 in, f32 out) by
/// cuBLAS or (`own`) duo's matrix-vector kernel, mean of `iters` after a warm-up; random
/// weights. For the decode step's products at a few rows, which only stream the weights.
pub fn time_linear(gpu: &Gpu, t: usize, in_dim: usize, out_dim: usize, own: bool, iters: usize) -> Result<f64> {
    gpu.time_ms(iters, linear_product(gpu, t, in_dim, out_dim, own)?)
}

/// A decode step's product with the kernels around it, as [`time_step_product`] times it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepProduct {
    /// RMSNorm of the f32 rows, then the q/k/v product into bf16.
    QkvNormed,
    /// RMSNorm, the gate/up product, the SiLU (out: half the width, bf16).
    GateUpNormedSilu,
    /// The SiLU of [gate | up] rows, then the down product added into f32 rows.
    DownSiluIn,
}

/// Milliseconds of one of a decode step's products of `t` rows (`[out_dim x in_dim]` weights,
/// random) with the kernels around it, mean of `iters` after a warm-up: by the separate
/// kernels and cuBLAS, or (`own`) by [`Gpu::gemv_fused`] with them folded in (for down, its
/// SiLU-input form; the pools run it only where `t` rows fit, [`Gpu::gemv_takes`]).
pub fn time_step_product(gpu: &Gpu, which: StepProduct, t: usize, in_dim: usize, out_dim: usize, own: bool, iters: usize) -> Result<f64> {
    use crate::runtime::{GemvInput, GemvOutput};
    let w = gpu.zeros::<u16>(in_dim * out_dim)?;
    gpu.fill_uniform(gpu.addr(&w), in_dim * out_dim, 3, 0.02)?;
    let (x, norm) = (gpu.upload(&random(5, t * in_dim, 2.0))?, gpu.upload(&vec![1.0f32; in_dim])?);
    // bf16 scratch: the normalised rows, or [gate | up] rows (2 x in_dim for down).
    let (xn, gu) = (gpu.zeros::<u16>(t * in_dim)?, gpu.zeros::<u16>(t * 2 * in_dim.max(out_dim))?);
    gpu.fill_uniform(gpu.addr(&gu), t * 2 * in_dim.max(out_dim), 6, 3.0)?;
    let (act, y) = (gpu.zeros::<u16>(t * in_dim.max(out_dim))?, gpu.zeros::<f32>(t * out_dim)?);
    let (xa, na, wa, xna, gua, acta, ya) = (gpu.addr(&x), gpu.addr(&norm), gpu.addr(&w), gpu.addr(&xn), gpu.addr(&gu), gpu.addr(&act), gpu.addr(&y));
    let normed = GemvInput::Normed { x: xa, norm: na, eps: 1e-5 };
    gpu.time_ms(iters, move || match (which, own) {
        (StepProduct::QkvNormed, true) => gpu.gemv_fused(normed, wa, GemvOutput::Bf16(gua), t, in_dim, out_dim),
        (StepProduct::QkvNormed, false) => {
            gpu.rms_norm(xa, na, xna, t, in_dim, 1e-5)?;
            gpu.gemm(xna, wa, gua, t, in_dim, out_dim, 0.0, true)
        }
        (StepProduct::GateUpNormedSilu, true) => gpu.gemv_fused(normed, wa, GemvOutput::SiluPairs(acta), t, in_dim, out_dim),
        (StepProduct::GateUpNormedSilu, false) => {
            gpu.rms_norm(xa, na, xna, t, in_dim, 1e-5)?;
            gpu.gemm(xna, wa, gua, t, in_dim, out_dim, 0.0, true)?;
            gpu.silu_mul(gua, acta, t, out_dim / 2)
        }
        (StepProduct::DownSiluIn, true) => gpu.gemv_fused(GemvInput::SiluOf(gua), wa, GemvOutput::F32 { y: ya, beta: 1.0 }, t, in_dim, out_dim),
        (StepProduct::DownSiluIn, false) => {
            gpu.silu_mul(gua, acta, t, in_dim)?;
            gpu.gemm(acta, wa, ya, t, in_dim, out_dim, 1.0, false)
        }
    })
}

/// One launch of [`time_linear`]'s product, over operands (random weights) made once.
fn linear_product(gpu: &Gpu, t: usize, in_dim: usize, out_dim: usize, own: bool) -> Result<impl FnMut() -> Result<()> + '_> {
    let w = gpu.zeros::<u16>(in_dim * out_dim)?;
    gpu.fill_uniform(gpu.addr(&w), in_dim * out_dim, 3, 0.02)?;
    let x = gpu.zeros::<u16>(t * in_dim)?;
    gpu.fill_uniform(gpu.addr(&x), t * in_dim, 4, 1.0)?;
    let y = gpu.zeros::<f32>(t * out_dim)?;
    Ok(move || {
        if own {
            let y = crate::runtime::GemvOutput::F32 { y: gpu.addr(&y), beta: 0.0 };
            gpu.gemv_fused(crate::runtime::GemvInput::Bf16(gpu.addr(&x)), gpu.addr(&w), y, t, in_dim, out_dim)
        } else {
            gpu.gemm(gpu.addr(&x), gpu.addr(&w), gpu.addr(&y), t, in_dim, out_dim, 0.0, false)
        }
    })
}

/// Milliseconds of one prefill-attention launch for a Llama-3-8B layer (32 query / 8 KV
/// heads of 128): a chunk of `t` queries at positions `first..first + t` over a paged cache
/// (blocks of 64) of random keys, KV heads retrieval where `retrieval[g]` (else streaming,
/// sink 128 + recent 256). Also returns the multiply-adds of the causal attention of the
/// retrieval heads x 2 x 2 (FLOPs as usually counted), so that time can be read as TFLOPS.
pub fn time_prefill_attention(
    gpu: &Gpu,
    retrieval: &[bool],
    t: usize,
    first: usize,
    kv: KvType,
    iters: usize,
) -> Result<(f64, f64)> {
    time_prefill_attention_with(gpu, gpu.prefill_kernel_for(128, kv), retrieval, t, first, kv, iters)
}

/// [`time_prefill_attention`] by the given kernel.
pub fn time_prefill_attention_with(
    gpu: &Gpu,
    kernel: PrefillKernel,
    retrieval: &[bool],
    t: usize,
    first: usize,
    kv: KvType,
    iters: usize,
) -> Result<(f64, f64)> {
    let (h, d) = (32usize, 128usize);
    let n = first + t;
    let layout = PagedLayout {
        retrieval: vec![retrieval.to_vec()],
        sink: 128,
        recent: 256,
        block_tokens: 64,
        max_chunk: t,
        max_tokens: n,
        kv,
        kv_streaming: kv,
    };
    let (tables, blocks) = shuffled_tables(&layout, n, 1);
    let elems = blocks * layout.block_elems(d);
    let (k, v) = (
        gpu.zeros::<u8>(kv.key_bytes_for(elems))?,
        gpu.zeros::<u8>(kv.value_bytes_for(elems))?,
    );
    let (ks, vs) = (
        gpu.zeros::<f32>(blocks * layout.block_rows())?,
        gpu.zeros::<f32>(blocks * layout.block_rows())?,
    );
    gpu.fill_synthetic_rows(
        kv,
        (gpu.addr(&k), gpu.addr(&v)),
        (gpu.addr(&ks), gpu.addr(&vs)),
        blocks * layout.block_rows(),
        d,
        (1, 2),
    )?;
    let q = gpu.zeros::<f32>(t * h * d)?;
    let out = gpu.zeros::<u16>(t * h * d)?;
    let heads = gpu.upload(&HeadEntry::table(&layout.heads(0)))?;
    let tab = gpu.upload(&decode_attention::table_rows(&layout, &[tables]))?;
    let state = gpu.upload(&[0i32, first as i32])?;
    let mut args = layout.paged_args(gpu.addr(&tab));
    if kv.is_quantised() {
        args = args.with_scales(gpu.addr(&ks), gpu.addr(&vs));
    }
    let run = || {
        gpu.prefill_attention(
            kernel,
            gpu.addr(&q),
            gpu.addr(&k),
            gpu.addr(&v),
            k.len(),
            gpu.addr(&heads),
            gpu.addr(&state),
            args,
            t,
            h,
            h / retrieval.len(),
            d,
            kv,
            gpu.addr(&out),
        )
    };
    let ms = gpu.time_ms(iters, run)?;
    let pairs = (first * t + t * (t + 1) / 2) as f64; // visible (query, key) pairs of a causal head
    let flops = 4.0
        * pairs
        * d as f64
        * (h / retrieval.len()) as f64
        * retrieval.iter().filter(|&&r| r).count() as f64;
    Ok((ms, flops))
}

#[cfg(test)]
mod tests {
    use super::case_wanted;

    #[test]
    fn a_case_filter_takes_any_of_its_texts() {
        assert!(case_wanted(None, "whole model GQA "));
        let f = Some("K8V4 with bf16 windows|K8V4 cache, bf16 windows");
        assert!(case_wanted(f, "paged decode attention K8V4 with bf16 windows"));
        assert!(case_wanted(f, "whole model MHA, K8V4 cache, bf16 windows "));
        assert!(case_wanted(f, "continuous batching, K8V4 cache, bf16 windows"));
        assert!(!case_wanted(f, "paged decode attention K8V4, "));
        assert!(!case_wanted(f, "whole model GQA, K8V4 cache "));
        assert!(!case_wanted(f, "continuous batching, K8V4 cache"));
        // Case is ignored; empty texts select nothing.
        assert!(case_wanted(Some("int4 cache, bf16 windows"), "continuous batching, Int4 cache, bf16 windows"));
        assert!(!case_wanted(Some(""), "whole model GQA "));
        assert!(!case_wanted(Some("|"), "whole model GQA "));
    }
}
