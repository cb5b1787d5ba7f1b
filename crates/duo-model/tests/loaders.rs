//! Loader tests on small models the tests write themselves: a GGUF file in several
//! tensor types and the same weights as a Hugging Face safetensors folder, checked
//! against an independent, naive forward pass; and hostile GGUF files.

use candle_core::quantized::GgmlDType;
use duo_core::cache_spec::Window;
use duo_core::pattern::HeadPattern;
use duo_core::CachePlan;
use duo_kv::{PrefillMode, SequenceKv};
use duo_model::gguf::writer::{small_llama, to_bytes, SmallLlama};
use duo_model::gguf::{GgufFile, MetaValue};
use duo_model::{Checkpoint, LoadedModel, Logits, ModelError, ModelSource};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const H: usize = 256; // hidden
const NH: usize = 4;
const NKV: usize = 2;
const HD: usize = 64;
const FFN: usize = 512;
const LAYERS: usize = 2;

fn vocab() -> (Vec<String>, Vec<String>) {
    duo_model::gguf::writer::byte_vocab()
}

struct Weights {
    named: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

fn random_weights(seed: u64, vocab: usize) -> Weights {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut named = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n = shape.iter().product();
        let data = (0..n).map(|_| offset + scale * rng.gen_range(-1.0f32..1.0)).collect();
        named.insert(name, (shape, data));
    };
    put("token_embd.weight".into(), vec![vocab, H], 1.0, 0.0);
    put("output_norm.weight".into(), vec![H], 0.2, 1.0);
    for l in 0..LAYERS {
        let p = format!("blk.{l}");
        put(format!("{p}.attn_norm.weight"), vec![H], 0.2, 1.0);
        put(format!("{p}.ffn_norm.weight"), vec![H], 0.2, 1.0);
        put(format!("{p}.attn_q.weight"), vec![NH * HD, H], 0.08, 0.0);
        put(format!("{p}.attn_k.weight"), vec![NKV * HD, H], 0.08, 0.0);
        put(format!("{p}.attn_v.weight"), vec![NKV * HD, H], 0.08, 0.0);
        put(format!("{p}.attn_output.weight"), vec![H, NH * HD], 0.08, 0.0);
        put(format!("{p}.ffn_gate.weight"), vec![FFN, H], 0.08, 0.0);
        put(format!("{p}.ffn_up.weight"), vec![FFN, H], 0.08, 0.0);
        put(format!("{p}.ffn_down.weight"), vec![H, FFN], 0.06, 0.0);
    }
    Weights { named }
}

/// Rows of a q/k weight reordered from Hugging Face (half-split RoPE) to GGUF
/// (interleaved RoPE) order, as llama.cpp's converter does.
fn permute_rows(w: &[f32], heads: usize) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for i in 0..HD / 2 {
            for (half, dst) in [(0, 2 * i), (1, 2 * i + 1)] {
                let src_row = h * HD + half * HD / 2 + i;
                let dst_row = h * HD + dst;
                out[dst_row * H..(dst_row + 1) * H].copy_from_slice(&w[src_row * H..(src_row + 1) * H]);
            }
        }
    }
    out
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("duo-loader-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("tmp");
    d
}

fn write_gguf(w: &Weights, path: &Path, matrix_type: GgmlDType) {
    // GGUF keeps q and k in interleaved-RoPE row order.
    let named = w
        .named
        .iter()
        .map(|(name, (shape, data))| {
            let data = if name.contains("attn_q") { permute_rows(data, NH) } else if name.contains("attn_k") { permute_rows(data, NKV) } else { data.clone() };
            (name.clone(), (shape.clone(), data))
        })
        .collect();
    let shape = SmallLlama { layers: LAYERS, hidden: H, heads: NH, kv_heads: NKV, ffn: FFN, context: 512, template: None };
    std::fs::write(path, small_llama(&shape, &named, matrix_type).expect("gguf bytes")).expect("write gguf");
}

fn hf_name(gguf: &str) -> String {
    let map = [
        ("token_embd", "model.embed_tokens"), ("output_norm", "model.norm"), ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
        ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
        ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"),
    ];
    let mut s = gguf.replace("blk.", "model.layers.");
    for (a, b) in map {
        s = s.replace(a, b);
    }
    s
}

fn write_hf_folder(w: &Weights, dir: &Path, tokenizer_from: &Path) {
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = w
        .named
        .iter()
        .map(|(name, (shape, data))| {
            let bf: Vec<u8> = data.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
            (hf_name(name), shape.clone(), bf)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b).expect("view")))
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &dir.join("model.safetensors")).expect("safetensors");
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "num_attention_heads": NH,
        "num_key_value_heads": NKV, "num_hidden_layers": LAYERS, "intermediate_size": FFN, "vocab_size": vocab().0.len(),
        "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
        "bos_token_id": vocab().0.len() - 2, "eos_token_id": vocab().0.len() - 1
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
    let ck = Checkpoint::open(tokenizer_from).expect("gguf");
    ck.tokenizer().expect("tok").save_json(&dir.join("tokenizer.json")).expect("save tok");
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"chat_template": "{% for m in messages %}[{{ m.content }}]{% endfor %}", "bos_token": "<s>", "eos_token": "</s>"}"#).expect("tc");
}

/// An independent, naive forward pass (f64, half-split RoPE on Hugging Face weights).
fn naive_logits(w: &Weights, tokens: &[u32], round_bf16: bool) -> Vec<f64> {
    let g = |n: &str| -> Vec<f64> {
        w.named[n].1.iter().map(|&v| if round_bf16 { half::bf16::from_f32(v).to_f32() as f64 } else { v as f64 }).collect()
    };
    let t = tokens.len();
    let emb = g("token_embd.weight");
    let mut x: Vec<Vec<f64>> = tokens.iter().map(|&id| emb[id as usize * H..(id as usize + 1) * H].to_vec()).collect();
    let norm = |v: &[f64], wt: &[f64]| {
        let r = (v.iter().map(|a| a * a).sum::<f64>() / v.len() as f64 + 1e-5).sqrt();
        v.iter().zip(wt).map(|(a, b)| a / r * b).collect::<Vec<f64>>()
    };
    let mv = |m: &[f64], v: &[f64], out: usize| (0..out).map(|o| m[o * v.len()..(o + 1) * v.len()].iter().zip(v).map(|(a, b)| a * b).sum()).collect::<Vec<f64>>();
    let rope = |v: &mut [f64], heads: usize, pos: usize| {
        for h in 0..heads {
            for i in 0..HD / 2 {
                let f = pos as f64 / 10000f64.powf(2.0 * i as f64 / HD as f64);
                let (a, b) = (v[h * HD + i], v[h * HD + i + HD / 2]);
                v[h * HD + i] = a * f.cos() - b * f.sin();
                v[h * HD + i + HD / 2] = a * f.sin() + b * f.cos();
            }
        }
    };
    for l in 0..LAYERS {
        let p = |s: &str| format!("blk.{l}.{s}.weight");
        let (wq, wk, wv, wo) = (g(&p("attn_q")), g(&p("attn_k")), g(&p("attn_v")), g(&p("attn_output")));
        let hs: Vec<Vec<f64>> = x.iter().map(|v| norm(v, &g(&p("attn_norm")))).collect();
        let q: Vec<Vec<f64>> = hs.iter().enumerate().map(|(i, h)| { let mut q = mv(&wq, h, NH * HD); rope(&mut q, NH, i); q }).collect();
        let k: Vec<Vec<f64>> = hs.iter().enumerate().map(|(i, h)| { let mut k = mv(&wk, h, NKV * HD); rope(&mut k, NKV, i); k }).collect();
        let v: Vec<Vec<f64>> = hs.iter().map(|h| mv(&wv, h, NKV * HD)).collect();
        for i in 0..t {
            let mut att = vec![0.0; NH * HD];
            for h in 0..NH {
                let g_ = h / (NH / NKV);
                let s: Vec<f64> = (0..=i).map(|j| (0..HD).map(|d| q[i][h * HD + d] * k[j][g_ * HD + d]).sum::<f64>() / (HD as f64).sqrt()).collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|a| (a - m).exp()).sum();
                for (j, sj) in s.iter().enumerate() {
                    for d in 0..HD {
                        att[h * HD + d] += (sj - m).exp() / z * v[j][g_ * HD + d];
                    }
                }
            }
            let o = mv(&wo, &att, H);
            for d in 0..H {
                x[i][d] += o[d];
            }
            let hn = norm(&x[i], &g(&p("ffn_norm")));
            let gate = mv(&g(&p("ffn_gate")), &hn, FFN);
            let up = mv(&g(&p("ffn_up")), &hn, FFN);
            let act: Vec<f64> = gate.iter().zip(&up).map(|(a, b)| a / (1.0 + (-a).exp()) * b).collect();
            let d_ = mv(&g(&p("ffn_down")), &act, H);
            for d in 0..H {
                x[i][d] += d_[d];
            }
        }
    }
    let last = norm(&x[t - 1], &g("output_norm.weight"));
    mv(&emb, &last, emb.len() / H)
}

fn run(model: &LoadedModel, tokens: &[u32]) -> Vec<f32> {
    let c = model.model.config();
    let plan = CachePlan::new(&HeadPattern::all_retrieval(c.n_layers, c.n_kv_heads), c.head_dim, 4, Window::new(4, 8).expect("w"));
    let mut kv = SequenceKv::new(&plan, PrefillMode::Lambda);
    model.model.forward(tokens, &mut kv, Logits::Last).expect("forward")
}

fn rel(a: &[f32], b: &[f64]) -> f64 {
    let n: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum::<f64>().sqrt();
    n / b.iter().map(|y| y * y).sum::<f64>().sqrt()
}

#[test]
fn gguf_of_every_tensor_type_matches_a_naive_forward() {
    let w = random_weights(1, vocab().0.len());
    let dir = tmp("types");
    let tokens = [5u32, 77, 130, 9, 200, 41, 3];
    let want = naive_logits(&w, &tokens, false);
    // (type, tolerance): float types are near exact; quantised ones carry their rounding.
    for (dtype, tol) in [
        (GgmlDType::F32, 1e-4),
        (GgmlDType::F16, 3e-3),
        (GgmlDType::BF16, 2e-2),
        (GgmlDType::Q8_0, 3e-2),
        (GgmlDType::Q6K, 5e-2),
        (GgmlDType::Q5K, 8e-2),
        (GgmlDType::Q4K, 0.15),
        (GgmlDType::Q4_1, 0.15),
        (GgmlDType::Q4_0, 0.2),
    ] {
        let path = dir.join(format!("{dtype:?}.gguf"));
        write_gguf(&w, &path, dtype);
        let m = LoadedModel::load(&ModelSource::Path(path)).unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
        let c = m.model.config();
        assert_eq!((c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size), (LAYERS, NH, NKV, HD, vocab().0.len()));
        assert!(c.tie_embeddings);
        let e = rel(&run(&m, &tokens), &want);
        assert!(e < tol, "{dtype:?}: relative error {e} over {tol}");
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn hf_safetensors_folder_matches_the_same_weights_in_gguf() {
    let w = random_weights(2, vocab().0.len());
    let dir = tmp("hf");
    let gguf = dir.join("m.gguf");
    write_gguf(&w, &gguf, GgmlDType::F32);
    let folder = dir.join("hf");
    std::fs::create_dir_all(&folder).expect("dir");
    write_hf_folder(&w, &folder, &gguf);
    let m = LoadedModel::load(&ModelSource::Path(folder.clone())).expect("hf folder loads");
    let tokens = m.tokenizer.encode("hello there", false).expect("encode");
    let from_gguf = LoadedModel::load(&ModelSource::Path(gguf)).expect("gguf");
    assert_eq!(tokens, from_gguf.tokenizer.encode("hello there", false).expect("encode"), "same tokens via tokenizer.json");
    assert!(tokens.contains(&256) && tokens.contains(&257), "merges applied: {tokens:?}");
    let want = naive_logits(&w, &tokens, true);
    let e = rel(&run(&m, &tokens), &want);
    assert!(e < 1e-4, "HF folder vs naive (bf16 weights): {e}");
    let tpl = m.template.as_ref().expect("template from tokenizer_config.json");
    assert_eq!(tpl.render(&[duo_model::Message { role: "user".into(), content: "x".into() }], false).expect("render"), "[x]");
    // A tensor of the wrong shape in config.json terms is a clear error.
    let cfg = std::fs::read_to_string(folder.join("config.json")).expect("cfg").replace("\"intermediate_size\":512", "\"intermediate_size\":500");
    std::fs::write(folder.join("config.json"), cfg).expect("write");
    let err = LoadedModel::load(&ModelSource::Path(folder)).err().expect("shape mismatch").to_string();
    assert!(err.contains("mlp.gate_proj") && err.contains("500"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = tmp("arch");
    let bytes = to_bytes(&[("general.architecture", MetaValue::String("gptneox".into()))], &[]);
    let p = dir.join("x.gguf");
    std::fs::write(&p, bytes).expect("write");
    let e = Checkpoint::open(&p).expect("parses").config().unwrap_err().to_string();
    assert!(e.contains("gptneox") && e.contains("supported"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

fn small_gguf_bytes() -> Vec<u8> {
    let dir = tmp("small");
    let p = dir.join("s.gguf");
    write_gguf(&random_weights(3, vocab().0.len()), &p, GgmlDType::Q4_1);
    let b = std::fs::read(&p).expect("read");
    std::fs::remove_dir_all(dir).ok();
    b
}

#[test]
fn hostile_headers_give_errors() {
    let good = small_gguf_bytes();
    let parse = |b: Vec<u8>| GgufFile::from_bytes(b, Path::new("test.gguf"));
    assert!(parse(good.clone()).is_ok());
    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(parse(bad).unwrap_err().to_string().contains("bad magic"));
    let mut huge = good.clone();
    huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // tensor count
    assert!(parse(huge).unwrap_err().to_string().contains("cannot fit"));
    let mut huge_kv = good.clone();
    huge_kv[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes()); // metadata count
    assert!(matches!(parse(huge_kv), Err(ModelError::Malformed { .. })));
    // Truncated anywhere: an error, never a panic.
    for cut in (0..good.len()).step_by(good.len() / 97 + 1) {
        assert!(parse(good[..cut].to_vec()).is_err(), "cut at {cut}");
    }
    let e = parse(good[..good.len() - 100].to_vec()).unwrap_err().to_string();
    assert!(e.contains("runs past the end"), "{e}");
}

/// Where a tensor's record (type id, then data offset) sits in a GGUF header.
fn tensor_record(b: &[u8], name: &str) -> (usize, usize) {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend(name.as_bytes());
    let at = b.windows(key.len()).position(|w| w == key).expect("the tensor's record") + key.len();
    let dims = u32::from_le_bytes(b[at..at + 4].try_into().expect("dims")) as usize;
    let ty = at + 4 + 8 * dims;
    (ty, ty + 4)
}

#[test]
fn tensor_tables_that_do_not_describe_the_data_are_refused() {
    let good = small_gguf_bytes();
    let parse = |b: Vec<u8>| GgufFile::from_bytes(b, Path::new("test.gguf")).map(|_| ()).map_err(|e| e.to_string());
    assert!(parse(good.clone()).is_ok());
    // (tensor, new type id): Q4_1 -> F32 (bigger: overlaps), Q4_1 -> BF16, F32 -> Q8_0 (smaller: a gap).
    for (name, ty) in [("blk.0.attn_q.weight", 0u32), ("blk.1.ffn_up.weight", 30), ("blk.0.attn_norm.weight", 8)] {
        let mut b = good.clone();
        let (at, _) = tensor_record(&b, name);
        b[at..at + 4].copy_from_slice(&ty.to_le_bytes());
        let e = parse(b).expect_err(name);
        assert!(e.contains("does not match the data") || e.contains("runs past") || e.contains("follow the last tensor") || e.contains("not describe"), "{name}: {e}");
    }
    // A data offset moved by one byte: misaligned; by one alignment unit: overlapping.
    for delta in [1u64, 32] {
        let mut b = good.clone();
        let (_, at) = tensor_record(&b, "blk.0.ffn_down.weight");
        let off = u64::from_le_bytes(b[at..at + 8].try_into().expect("offset")) + delta;
        b[at..at + 8].copy_from_slice(&off.to_le_bytes());
        let e = parse(b).expect_err("moved offset");
        assert!(e.contains("blk.0.ffn_down.weight") || e.contains("does not match"), "{delta}: {e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    /// Random byte mutations in the header region: parsing and loading never panic.
    #[test]
    fn mutated_headers_never_panic(edits in prop::collection::vec((0usize..60_000, any::<u8>()), 1..8)) {
        static GOOD: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let good = GOOD.get_or_init(small_gguf_bytes);
        let mut b = good.clone();
        let header = b.len().min(60_000);
        for (pos, byte) in edits {
            b[pos % header] = byte;
        }
        if let Ok(g) = GgufFile::from_bytes(b, Path::new("mutated.gguf")) {
            let ck = Checkpoint::Gguf(g);
            if let Ok(cfg) = ck.config() {
                let _ = duo_model::Model::load(&ck, cfg);
            }
            let _ = ck.tokenizer();
        }
    }
}

/// The real default model's header (metadata, vocabulary, tensor directory), mutated at
/// random: parsing, config resolution, tokenizer and model loading return errors or
/// succeed, never panic.
mod real_header {
    use super::*;

    fn real() -> &'static (Vec<u8>, usize) {
        static R: std::sync::OnceLock<(Vec<u8>, usize)> = std::sync::OnceLock::new();
        R.get_or_init(|| {
            let path = duo_model::fetch::default_model().expect("default model");
            let bytes = std::fs::read(path).expect("read");
            let g = GgufFile::from_bytes(bytes.clone(), Path::new("real.gguf")).expect("real file parses");
            let header_end = g.tensors.values().map(|t| t.offset).min().expect("tensors");
            (bytes, header_end)
        })
    }

    #[test]
    fn real_header_truncations_are_errors() {
        let (bytes, header_end) = real();
        for cut in [0usize, 3, 4, 8, 23, 24, 1000, header_end / 2, header_end - 1, *header_end, bytes.len() - 1] {
            let r = GgufFile::from_bytes(bytes[..cut].to_vec(), Path::new("cut.gguf"));
            assert!(r.is_err(), "cut at {cut} of {} bytes parsed", bytes.len());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn mutated_real_headers_never_panic(edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
            let (bytes, header_end) = real();
            let mut b = bytes.clone();
            for (pos, byte) in edits {
                b[pos % header_end] = byte;
            }
            if let Ok(g) = GgufFile::from_bytes(b, Path::new("mutated-real.gguf")) {
                let ck = Checkpoint::Gguf(g);
                let _ = ck.tokenizer();
                if let Ok(cfg) = ck.config() {
                    let _ = duo_model::Model::load(&ck, cfg);
                }
            }
        }
    }
}

#[test]
fn random_weight_models_are_seeded_and_batched_decode_matches_one_at_a_time() {
    use duo_model::Model;
    let dir = tmp("random-shape");
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, r#"{"model_type":"llama","hidden_size":128,"num_attention_heads":4,"num_key_value_heads":2,"num_hidden_layers":2,"intermediate_size":256,"vocab_size":300,"max_position_embeddings":512}"#).expect("config");
    let c = duo_model::random::shape(cfg.to_str().expect("utf-8")).expect("shape");
    let vocab = c.vocab_size;
    let plan = CachePlan::new(&HeadPattern::all_retrieval(c.n_layers, c.n_kv_heads), c.head_dim, 4, Window::new(4, 8).expect("w"));
    let fresh = || SequenceKv::new(&plan, PrefillMode::Lambda);
    let a = Model::random(c.clone(), 5).expect("model");
    let logits = |m: &Model, toks: &[u32]| m.forward(toks, &mut fresh(), Logits::Last).expect("forward");
    let first = logits(&a, &[1, 2, 3]);
    assert_eq!(first.len(), vocab);
    assert!(first.iter().all(|x| x.is_finite()));
    assert_eq!(first, logits(&Model::random(c.clone(), 5).expect("model"), &[1, 2, 3]), "same seed, same weights");
    assert_ne!(first, logits(&Model::random(c.clone(), 6).expect("model"), &[1, 2, 3]), "another seed, other weights");
    // One decode step for three sequences of different lengths, batched, equals each alone.
    let prompts: [&[u32]; 3] = [&[1, 2, 3], &[4, 5, 6, 7, 8, 9, 10, 11, 12, 13], &[14]];
    let next = [42u32, 7, 199];
    let mut kvs: Vec<SequenceKv> = prompts
        .iter()
        .map(|p| {
            let mut kv = fresh();
            a.forward(p, &mut kv, Logits::None).expect("prefill");
            kv
        })
        .collect();
    let alone: Vec<Vec<f32>> = kvs.iter().zip(next).map(|(kv, t)| a.forward(&[t], &mut kv.clone(), Logits::Last).expect("alone")).collect();
    let mut refs: Vec<&mut SequenceKv> = kvs.iter_mut().collect();
    let batched = a.decode_batch(&next, &mut refs).expect("batch");
    for (i, want) in alone.iter().enumerate() {
        assert_eq!(&batched[i * vocab..(i + 1) * vocab], &want[..], "sequence {i}");
    }
    assert_eq!(kvs.iter().map(SequenceKv::tokens).collect::<Vec<_>>(), vec![4, 11, 2]);
    assert!(a.decode_batch(&next[..2], &mut kvs.iter_mut().collect::<Vec<_>>()).is_err(), "token and sequence counts must match");
}
