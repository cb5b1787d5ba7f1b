//! A bounded fuzzing run over GGUF files, part of the test suite: seeded mutations of a small
//! but complete model file (every tensor type the loaders take) aimed at the places a hostile
//! or damaged file differs: tensor records (type, offset, shape), metadata counts and string
//! lengths, random bytes in the header and the data, truncation. Every input must parse and
//! load or fail with an error; a panic is counted and fails the test. The counts are printed
//! (inputs tried, clean errors, loads, panics, peak memory).

use candle_core::quantized::GgmlDType;
use duo_model::gguf::writer::{byte_vocab, small_llama, SmallLlama};
use duo_model::gguf::GgufFile;
use duo_model::Checkpoint;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// Inputs per run, and the time they may take on the 2-core CI machine.
const INPUTS: usize = 30_000;
const BUDGET: Duration = Duration::from_secs(120);

fn model(ty: GgmlDType) -> Vec<u8> {
    let shape = SmallLlama { layers: 2, hidden: 256, heads: 4, kv_heads: 2, ffn: 256, context: 256, template: None };
    let mut rng = StdRng::seed_from_u64(1);
    let mut named = BTreeMap::new();
    let mut put = |name: String, dims: Vec<usize>| {
        let n: usize = dims.iter().product();
        named.insert(name, (dims, (0..n).map(|_| rng.gen_range(-0.1f32..0.1)).collect::<Vec<f32>>()));
    };
    put("token_embd.weight".into(), vec![byte_vocab().0.len(), 256]);
    put("output_norm.weight".into(), vec![256]);
    for l in 0..2 {
        for (part, dims) in [("attn_norm", vec![256]), ("ffn_norm", vec![256]), ("attn_q", vec![256, 256]), ("attn_k", vec![128, 256]), ("attn_v", vec![128, 256]), ("attn_output", vec![256, 256]), ("ffn_gate", vec![256, 256]), ("ffn_up", vec![256, 256]), ("ffn_down", vec![256, 256])] {
            put(format!("blk.{l}.{part}.weight"), dims);
        }
    }
    small_llama(&shape, &named, ty).expect("gguf")
}

/// Offsets of every tensor record's type id, in the header.
fn type_fields(b: &[u8]) -> Vec<usize> {
    let g = GgufFile::from_bytes(b.to_vec(), Path::new("seed.gguf")).expect("seed parses");
    g.tensors
        .keys()
        .map(|name| {
            let mut key = (name.len() as u64).to_le_bytes().to_vec();
            key.extend(name.as_bytes());
            let at = b.windows(key.len()).position(|w| w == key).expect("record") + key.len();
            let dims = u32::from_le_bytes(b[at..at + 4].try_into().expect("dims")) as usize;
            at + 4 + 8 * dims
        })
        .collect()
}

fn mutate(seed: &[u8], types: &[usize], header_end: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut b = seed.to_vec();
    match rng.gen_range(0..7) {
        // A tensor's type id: another real type or nonsense.
        0 => {
            let at = types[rng.gen_range(0..types.len())];
            let ty: u32 = [0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30, 99, u32::MAX][rng.gen_range(0..15)];
            b[at..at + 4].copy_from_slice(&ty.to_le_bytes());
        }
        // A tensor's data offset moved.
        1 => {
            let at = types[rng.gen_range(0..types.len())] + 4;
            let off = u64::from_le_bytes(b[at..at + 8].try_into().expect("offset"));
            let new = match rng.gen_range(0..4) {
                0 => off.wrapping_add(rng.gen_range(1..64)),
                1 => off.wrapping_sub(rng.gen_range(1..64)),
                2 => rng.gen(),
                _ => u64::MAX - rng.gen_range(0..16),
            };
            b[at..at + 8].copy_from_slice(&new.to_le_bytes());
        }
        // A dimension of a tensor's shape.
        2 => {
            let at = types[rng.gen_range(0..types.len())] - 8;
            let d: u64 = [0, 1, 32, 255, 257, 1 << 20, 1 << 40, u64::MAX][rng.gen_range(0..8)];
            b[at..at + 8].copy_from_slice(&d.to_le_bytes());
        }
        // A count or length anywhere in the header (u64 little-endian fields).
        3 => {
            let at = rng.gen_range(8..header_end - 8);
            let v: u64 = [0, 1, u32::MAX as u64, 1 << 40, u64::MAX][rng.gen_range(0..5)];
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        // Random bytes in the header.
        4 => {
            for _ in 0..rng.gen_range(1..8) {
                let at = rng.gen_range(0..header_end);
                b[at] = rng.gen();
            }
        }
        // Random bytes in the data (NaNs and infinities included).
        5 => {
            for _ in 0..rng.gen_range(1..64) {
                let at = rng.gen_range(header_end..b.len());
                b[at] = rng.gen();
            }
        }
        // Truncated.
        _ => b.truncate(rng.gen_range(0..b.len())),
    }
    b
}

#[test]
fn fuzzed_gguf_files_fail_cleanly() {
    let seeds: Vec<Vec<u8>> = [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::F16].into_iter().map(model).collect();
    let prepared: Vec<(Vec<usize>, usize)> = seeds
        .iter()
        .map(|s| {
            let g = GgufFile::from_bytes(s.clone(), Path::new("seed.gguf")).expect("seed parses");
            (type_fields(s), g.tensors.values().map(|t| t.offset).min().expect("tensors"))
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(2026);
    let (mut errors, mut loaded, mut panics, mut tried) = (0usize, 0usize, Vec::new(), 0usize);
    let started = Instant::now();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    while tried < INPUTS && started.elapsed() < BUDGET {
        let k = tried % seeds.len();
        let b = mutate(&seeds[k], &prepared[k].0, prepared[k].1, &mut rng);
        tried += 1;
        let outcome = std::panic::catch_unwind(|| -> Result<(), String> {
            let g = GgufFile::from_bytes(b, Path::new("fuzz.gguf")).map_err(|e| e.to_string())?;
            let ck = Checkpoint::Gguf(g);
            let cfg = ck.config().map_err(|e| e.to_string())?;
            ck.tokenizer().map_err(|e| e.to_string())?;
            duo_model::Model::load(&ck, cfg).map_err(|e| e.to_string())?;
            Ok(())
        });
        match outcome {
            Ok(Ok(())) => loaded += 1,
            Ok(Err(e)) => {
                assert!(!e.is_empty(), "an error says something");
                errors += 1;
            }
            Err(_) => panics.push(tried),
        }
    }
    std::panic::set_hook(hook);
    let peak = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmHWM:")).map(|v| v.trim().to_string())).unwrap_or_default();
    let _ = writeln!(
        std::io::stderr(),
        "fuzzed GGUF files: {tried} inputs in {:.1} s: {errors} clean errors, {loaded} loaded, {} panics; peak memory {peak}",
        started.elapsed().as_secs_f64(),
        panics.len()
    );
    assert!(panics.is_empty(), "inputs {panics:?} panicked");
    assert!(tried >= 10_000, "only {tried} inputs within the time budget");
    assert!(errors > tried / 2, "most mutations must be refused ({errors} of {tried})");
}
