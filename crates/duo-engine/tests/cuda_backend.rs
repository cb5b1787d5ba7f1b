//! The CUDA backend against the CPU engine on the real default model (SmolLM2-135M-Instruct:
//! Q4_1 weights and 8-bit activations on the CPU, the same weights dequantised to bf16 on the
//! GPU), through the one backend seam. These tests need a GPU: without a CUDA driver (as on
//! CI) each prints "skipped: no CUDA driver" and returns.

use duo_core::pattern::Layout;
use duo_engine::backend::{kv_plan, plan_bytes, Logits};
use duo_engine::{Device, Engine, Method, MethodSpec, PatternSource, ResolvedMethod, Runner, SamplingParams};
use duo_model::ModelSource;
use rand::SeedableRng;
use std::sync::OnceLock;

/// Whether a GPU can be opened; if not, says so on the terminal (written to stderr
/// directly, past the test harness's capture, so a skip is never silent).
fn gpu_present(test: &str) -> bool {
    use std::io::Write;
    let present = duo_cuda::Gpu::new(0).is_ok();
    if !present {
        let _ = writeln!(std::io::stderr(), "{test}: skipped: no CUDA driver");
    }
    present
}

fn engines() -> &'static (Engine, Engine) {
    static E: OnceLock<(Engine, Engine)> = OnceLock::new();
    E.get_or_init(|| {
        let cpu = Engine::load(&ModelSource::Default, Device::Cpu).expect("CPU model");
        let gpu = Engine::load(&ModelSource::Default, Device::Cuda(0)).expect("GPU model");
        (cpu, gpu)
    })
}

/// full, duo (head layout) and layer at sparsity 0.5 with the shipped patterns.
fn methods(e: &Engine) -> Vec<(&'static str, ResolvedMethod)> {
    let base = MethodSpec { pattern: Some(PatternSource::Shipped), chunk: 1024, ..Default::default() };
    [("full", Method::Full, Layout::Head), ("duo", Method::Duo, Layout::Head), ("layer", Method::Duo, Layout::Layer)]
        .into_iter()
        .map(|(name, method, layout)| (name, MethodSpec { method, layout, ..base.clone() }.resolve(e.config()).expect("method")))
        .collect()
}

/// Ten prompts of 30 to 4,000 tokens of seeded prose.
fn prompts(e: &Engine) -> Vec<Vec<u32>> {
    let hay = duo_tasks::Haystack::Generated;
    [30usize, 100, 250, 500, 800, 1200, 1800, 2500, 3200, 4000]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
            let mut ids = e.tokenizer.encode("", true).expect("bos");
            ids.extend(hay.tokens(&e.tokenizer, n - ids.len(), &mut rng).expect("prose"));
            ids
        })
        .collect()
}

/// Two measures per prompt and method: the GPU's greedy choice at each of the CPU's 16
/// greedy steps (its top-1 after the same context, teacher-forced: what "the same greedy
/// tokens" means position by position), and how far the two free generations run equal
/// before their first difference (after it the contexts differ, so the rest says nothing).
#[test]
fn gpu_greedy_tokens_match_the_cpu_engine() {
    if !gpu_present("gpu_greedy_tokens_match_the_cpu_engine") {
        return;
    }
    let (cpu, gpu) = engines();
    let params = SamplingParams { max_tokens: 16, ..Default::default() };
    let (mut same_step, mut prefix, mut total, mut worst) = (0usize, 0usize, 0usize, 16usize);
    for ((name, cm), (_, gm)) in methods(cpu).into_iter().zip(methods(gpu)) {
        for p in prompts(cpu) {
            let a = Runner::new(cpu, cm.clone()).generate(&p, &params, |_| true).expect("cpu").completion_token_ids;
            let b = Runner::new(gpu, gm.clone()).generate(&p, &params, |_| true).expect("gpu").completion_token_ids;
            let run = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
            let steps = Runner::new(gpu, gm.clone()).score(&p, &a).expect("gpu teacher-forced").tokens.iter().filter(|t| t.top1).count();
            eprintln!("{name:<6} {:>5} prompt tokens: GPU picks the CPU's greedy token at {steps:>2}/{} steps; free generations equal for {run:>2} tokens", p.len(), a.len());
            same_step += steps;
            prefix += run;
            total += a.len();
            worst = worst.min(steps);
        }
    }
    eprintln!("same greedy token at {same_step} of {total} steps ({:.3}), worst prompt {worst}/16; free generations equal before the first difference: {prefix} of {total} ({:.3})", same_step as f64 / total as f64, prefix as f64 / total as f64);
    assert!(same_step * 16 >= total * 15, "the GPU picks the CPU's greedy token at {same_step} of {total} steps: fewer than 15 in 16");
}

#[test]
fn gpu_scores_match_the_cpu_engine_and_forks_are_independent() {
    if !gpu_present("gpu_scores_match_the_cpu_engine_and_forks_are_independent") {
        return;
    }
    let (cpu, gpu) = engines();
    let all = &prompts(cpu)[7]; // 2,500 tokens
    let (prompt, cont) = all.split_at(all.len() - 300);
    for ((name, cm), (_, gm)) in methods(cpu).into_iter().zip(methods(gpu)) {
        let a = Runner::new(cpu, cm).score(prompt, cont).expect("cpu");
        let runner = Runner::new(gpu, gm);
        let b = runner.score(prompt, cont).expect("gpu");
        let diffs: Vec<f64> = a.tokens.iter().zip(&b.tokens).map(|(x, y)| (x.logprob - y.logprob).abs()).collect();
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let max = diffs.iter().copied().fold(0.0, f64::max);
        eprintln!("{name:<6} logprobs of {} tokens: mean |gpu - cpu| {mean:.4}, max {max:.4}; mean logprob cpu {:.4} gpu {:.4}", diffs.len(), a.mean_logprob, b.mean_logprob);
        assert!(mean <= 0.05, "{name}: mean logprob difference {mean}");
        assert!((a.mean_logprob - b.mean_logprob).abs() <= 0.05, "{name}");

        // One prefill, two continuations from copies: each equals a fresh run.
        let mut seq = runner.new_sequence(all.len() + 4).expect("sequence");
        let logits = runner.prefill(prompt, seq.as_mut(), |_| {}).expect("prefill");
        let mut copy = seq.fork().expect("fork");
        let first = runner.score_after(copy.as_mut(), &logits, cont).expect("fork score");
        let greedy = runner.greedy_after(seq.as_mut(), &logits, 4).expect("greedy after fork");
        assert_eq!(first.iter().map(|t| t.logprob).collect::<Vec<_>>(), b.tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(), "{name}: a fork scores as a fresh sequence");
        let fresh = Runner::new(gpu, runner.method.clone()).generate(prompt, &SamplingParams { max_tokens: 4, ..Default::default() }, |_| true).expect("fresh");
        assert_eq!(greedy, fresh.completion_token_ids, "{name}: the original is untouched by its fork");
        // Bytes held: the method's formula with bf16 elements.
        let plan = kv_plan(gpu.backend(), &runner.method);
        assert_eq!(copy.bytes(), plan_bytes(&plan, prompt.len() + cont.len() - 1), "{name}");
    }
}

#[test]
fn a_cpu_sequence_is_refused_by_the_gpu_backend() {
    if !gpu_present("a_cpu_sequence_is_refused_by_the_gpu_backend") {
        return;
    }
    let (cpu, gpu) = engines();
    let m = MethodSpec::default().resolve(cpu.config()).expect("method");
    let mut seq = cpu.backend().new_sequence(&m, 10).expect("cpu sequence");
    let e = gpu.backend().forward(seq.as_mut(), &[1, 2, 3], Logits::Last).expect_err("refused").to_string();
    assert!(e.contains("not made by the CUDA backend"), "{e}");
    let e = gpu.backend().forward(gpu.backend().new_sequence(&m, 10).expect("gpu").as_mut(), &[60_000], Logits::Last).expect_err("bad id").to_string();
    assert!(e.contains("60000"), "{e}");
}

/// A small model written as a GGUF file of each type the GPU dequantises, loaded by both
/// backends: the GPU (raw blocks dequantised on the device) computes the CPU engine's logits
/// (same blocks, the CPU's kernels) within bf16 rounding and picks the same next token.
#[test]
fn gguf_files_of_every_gpu_type_load_onto_the_gpu() {
    use candle_core::quantized::GgmlDType as G;
    use duo_model::gguf::writer::{byte_vocab, small_llama, SmallLlama};
    use rand::Rng;
    if !gpu_present("gguf_files_of_every_gpu_type_load_onto_the_gpu") {
        return;
    }
    // Widths that are whole K-quant blocks (256).
    let shape = SmallLlama { layers: 2, hidden: 256, heads: 4, kv_heads: 2, ffn: 512, context: 512, template: None };
    let (h, hd) = (shape.hidden, shape.hidden / shape.heads);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut named = std::collections::BTreeMap::new();
    let mut put = |name: String, dims: Vec<usize>, scale: f32, offset: f32| {
        let n = dims.iter().product();
        named.insert(name, (dims, (0..n).map(|_| offset + scale * rng.gen_range(-1.0f32..1.0)).collect::<Vec<f32>>()));
    };
    put("token_embd.weight".into(), vec![byte_vocab().0.len(), h], 1.0, 0.0);
    put("output_norm.weight".into(), vec![h], 0.2, 1.0);
    for l in 0..shape.layers {
        put(format!("blk.{l}.attn_norm.weight"), vec![h], 0.2, 1.0);
        put(format!("blk.{l}.ffn_norm.weight"), vec![h], 0.2, 1.0);
        put(format!("blk.{l}.attn_q.weight"), vec![shape.heads * hd, h], 0.08, 0.0);
        put(format!("blk.{l}.attn_k.weight"), vec![shape.kv_heads * hd, h], 0.08, 0.0);
        put(format!("blk.{l}.attn_v.weight"), vec![shape.kv_heads * hd, h], 0.08, 0.0);
        put(format!("blk.{l}.attn_output.weight"), vec![h, shape.heads * hd], 0.08, 0.0);
        put(format!("blk.{l}.ffn_gate.weight"), vec![shape.ffn, h], 0.08, 0.0);
        put(format!("blk.{l}.ffn_up.weight"), vec![shape.ffn, h], 0.08, 0.0);
        put(format!("blk.{l}.ffn_down.weight"), vec![h, shape.ffn], 0.06, 0.0);
    }
    let dir = std::env::temp_dir().join(format!("duo-gpu-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let tokens: Vec<u32> = (0..300).map(|i| (i * 37 % 250) as u32).collect();
    for ty in [G::F32, G::F16, G::BF16, G::Q8_0, G::Q4_0, G::Q4_1, G::Q4K, G::Q6K] {
        let path = dir.join(format!("{ty:?}.gguf"));
        std::fs::write(&path, small_llama(&shape, &named, ty).expect("gguf")).expect("write");
        let source = ModelSource::Path(path);
        let (cpu, gpu) = (Engine::load(&source, Device::Cpu).expect("cpu"), Engine::load(&source, Device::Cuda(0)).expect("gpu"));
        let m = MethodSpec { chunk: 128, ..Default::default() }.resolve(cpu.config()).expect("method");
        let run = |e: &Engine| {
            let mut s = e.backend().new_sequence(&m, tokens.len()).expect("sequence");
            e.backend().forward(s.as_mut(), &tokens, Logits::Last).expect("forward")
        };
        let (a, b) = (run(&cpu), run(&gpu));
        let top = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max) / top;
        eprintln!("{ty:?}: max |gpu - cpu| / max |logit| = {err:.4}; next token cpu {} gpu {}", duo_engine::sampler::argmax(&a), duo_engine::sampler::argmax(&b));
        assert!(err < 5e-2, "{ty:?}: {err}");
        assert_eq!(duo_engine::sampler::argmax(&a), duo_engine::sampler::argmax(&b), "{ty:?}");
    }
    std::fs::remove_dir_all(dir).ok();
}
