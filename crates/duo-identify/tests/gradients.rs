//! The gate gradients of the layer-by-layer backward pass against finite differences of
//! the loss, and the attention blocks against a dense reference, on small random models.

mod common;

use candle_core::{Device, Tensor};
use common::tiny;
use duo_core::RopeStyle;
use duo_identify::dense::{attention, Qkv};
use duo_identify::{DenseModel, GateValues, GatedModel, Span};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn ids(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(0..64)).collect()
}

fn random_qkv(nkv: usize, group: usize, t: usize, hd: usize, seed: u64) -> Qkv {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut r = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect() };
    let d = Device::Cpu;
    Qkv {
        q: Tensor::from_vec(r(nkv * group * t * hd), (nkv, group, t, hd), &d).expect("q"),
        k: Tensor::from_vec(r(nkv * t * hd), (nkv, t, hd), &d).expect("k"),
        v: Tensor::from_vec(r(nkv * t * hd), (nkv, t, hd), &d).expect("v"),
    }
}

/// Dense f64 attention with an explicit visibility rule.
fn reference(qkv: &Qkv, sees: impl Fn(usize, usize) -> bool) -> Vec<f32> {
    let (nkv, group, t, hd) = qkv.q.dims4().expect("dims");
    let q: Vec<f32> = qkv.q.flatten_all().and_then(|x| x.to_vec1()).expect("q");
    let k: Vec<f32> = qkv.k.flatten_all().and_then(|x| x.to_vec1()).expect("k");
    let v: Vec<f32> = qkv.v.flatten_all().and_then(|x| x.to_vec1()).expect("v");
    let mut out = vec![0f32; q.len()];
    for h in 0..nkv {
        for g in 0..group {
            for i in 0..t {
                let qi = &q[((h * group + g) * t + i) * hd..][..hd];
                let s: Vec<Option<f64>> = (0..t)
                    .map(|j| {
                        sees(i, j).then(|| {
                            let kj = &k[(h * t + j) * hd..][..hd];
                            qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() / (hd as f64).sqrt()
                        })
                    })
                    .collect();
                let m = s.iter().flatten().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().flatten().map(|x| (x - m).exp()).sum();
                for (j, sj) in s.iter().enumerate() {
                    if let Some(sj) = sj {
                        let w = (sj - m).exp() / z;
                        for d in 0..hd {
                            out[((h * group + g) * t + i) * hd + d] += (w * v[(h * t + j) * hd + d] as f64) as f32;
                        }
                    }
                }
            }
        }
    }
    out
}

#[test]
fn query_blocks_double_on_a_gpu_within_a_gibibyte_of_scores() {
    use duo_identify::dense::query_block;
    assert_eq!(query_block(9, 8192, false), 256, "the CPU keeps small blocks");
    assert_eq!(query_block(9, 8192, true), 512, "SmolLM2 at 8K: 9 x 512 x 8192 x 4 B = 0.14 GiB");
    assert_eq!(query_block(32, 16384, true), 512, "Llama-3-8B at 16K: 32 x 512 x 16384 x 4 B = 1 GiB");
    assert_eq!(query_block(32, 32768, true), 256, "Llama-3-8B at 32K: 512 would need 2 GiB");
    assert_eq!(query_block(32, 1 << 20, true), 256, "never below the CPU's block");
    let model = DenseModel::random(tiny(RopeStyle::Interleaved), 1, &Device::Cpu).expect("model").with_block(Some(7));
    assert_eq!(model.block(100), 7, "an explicit block wins");
}

#[test]
fn rope_tables_cached_for_a_longer_sequence_give_the_same_states() {
    let fresh = DenseModel::random(tiny(RopeStyle::Interleaved), 3, &Device::Cpu).expect("model");
    let reused = DenseModel::random(tiny(RopeStyle::Interleaved), 3, &Device::Cpu).expect("model");
    let long = ids(90, 4);
    let short = &long[..37];
    reused.hidden_states(&long).expect("long first");
    let a: Vec<f32> = fresh.hidden_states(short).and_then(|t| Ok(t.flatten_all()?.to_vec1()?)).expect("fresh");
    let b: Vec<f32> = reused.hidden_states(short).and_then(|t| Ok(t.flatten_all()?.to_vec1()?)).expect("reused");
    assert_eq!(a, b);
    // And a longer one after a shorter one grows the tables.
    let c: Vec<f32> = reused.hidden_states(&long).and_then(|t| Ok(t.flatten_all()?.to_vec1()?)).expect("long again");
    let d: Vec<f32> = fresh.hidden_states(&long).and_then(|t| Ok(t.flatten_all()?.to_vec1()?)).expect("fresh long");
    assert_eq!(c, d);
}

#[test]
fn blocked_attention_matches_dense_reference() {
    let qkv = random_qkv(2, 3, 29, 8, 5);
    for block in [1, 4, 7, 29, 64] {
        let causal: Vec<f32> = attention(&qkv, Span::Causal, block).and_then(|t| Ok(t.flatten_all()?.to_vec1()?)).expect("causal");
        let want = reference(&qkv, |i, j| j <= i);
        let err = causal.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err < 1e-5, "causal block {block}: {err}");
        for (sink, recent) in [(2, 3), (0, 5), (4, 1), (40, 2), (3, 40)] {
            let got: Vec<f32> =
                attention(&qkv, Span::Lambda { sink, recent }, block).and_then(|t| Ok(t.flatten_all()?.to_vec1()?)).expect("lambda");
            let want = reference(&qkv, |i, j| j <= i && (j < sink || i - j < recent));
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-5, "lambda {sink}/{recent} block {block}: {err}");
        }
    }
}

#[test]
fn all_gates_open_reproduce_the_teacher() {
    let model = DenseModel::random(tiny(RopeStyle::Interleaved), 1, &Device::Cpu).expect("model");
    let gated = GatedModel::new(&model, Span::Lambda { sink: 2, recent: 4 });
    let t = ids(40, 2);
    let lg = gated.loss_and_grad(&t, 20..40, &GateValues::ones(3, 2), 0.05).expect("loss");
    assert_eq!(lg.distill, 0.0);
    // At the minimum of the distillation loss only the L1 term pulls: reg / n per gate.
    for g in &lg.grad {
        assert!((g - 0.05 / 6.0).abs() < 1e-7, "{:?}", lg.grad);
    }
    // Closing any one gate changes the output.
    for i in 0..6 {
        let mut gates = GateValues::ones(3, 2);
        gates.values[i] = 0.0;
        assert!(gated.loss(&t, 20..40, &gates, 0.0).expect("loss") > 1e-8, "gate {i}");
    }
}

fn check_against_finite_differences(style: RopeStyle, per_layer: usize) {
    let model = DenseModel::random(tiny(style), 11, &Device::Cpu).expect("model");
    let gated = GatedModel::new(&model, Span::Lambda { sink: 2, recent: 5 });
    let t = ids(48, 3);
    let mut rng = StdRng::seed_from_u64(4);
    let gates = GateValues { values: (0..3 * per_layer).map(|_| rng.gen_range(0.2..0.8)).collect(), per_layer };
    let reg = 0.05;
    let lg = gated.loss_and_grad(&t, 30..48, &gates, reg).expect("grad");
    let base = gated.loss(&t, 30..48, &gates, reg).expect("loss");
    assert!((base - lg.total()).abs() <= 1e-6 * base.abs().max(1e-3), "loss {base} vs {}", lg.total());
    let eps = 1e-2f32;
    for i in 0..gates.values.len() {
        let mut plus = gates.clone();
        plus.values[i] += eps;
        let mut minus = gates.clone();
        minus.values[i] -= eps;
        let numeric = (gated.loss(&t, 30..48, &plus, reg).expect("+") - gated.loss(&t, 30..48, &minus, reg).expect("-")) / (2.0 * eps as f64);
        let analytic = lg.grad[i] as f64;
        let tol = 2e-3 * numeric.abs().max(analytic.abs()) + 2e-5;
        assert!((numeric - analytic).abs() <= tol, "gate {i}: numeric {numeric:e}, analytic {analytic:e}");
    }
}

#[test]
fn head_gate_gradients_match_finite_differences() {
    check_against_finite_differences(RopeStyle::Interleaved, 2);
}

#[test]
fn layer_gate_gradients_match_finite_differences() {
    check_against_finite_differences(RopeStyle::HalfSplit, 1);
}

#[test]
fn identical_runs_give_identical_gradients() {
    let model = DenseModel::random(tiny(RopeStyle::Interleaved), 7, &Device::Cpu).expect("model");
    let gated = GatedModel::new(&model, Span::Lambda { sink: 1, recent: 3 });
    let t = ids(33, 9);
    let g = GateValues { values: vec![0.3, 0.9, 0.5, 0.1, 0.7, 0.2], per_layer: 2 };
    let a = gated.loss_and_grad(&t, 10..33, &g, 0.05).expect("a");
    let b = gated.loss_and_grad(&t, 10..33, &g, 0.05).expect("b");
    assert_eq!(a.grad, b.grad);
    assert_eq!(a.distill, b.distill);
}

#[test]
fn wrong_gate_shapes_and_positions_are_errors() {
    let model = DenseModel::random(tiny(RopeStyle::Interleaved), 7, &Device::Cpu).expect("model");
    let gated = GatedModel::new(&model, Span::Lambda { sink: 1, recent: 3 });
    let t = ids(10, 1);
    assert!(gated.loss_and_grad(&t, 0..5, &GateValues::ones(3, 3), 0.0).is_err());
    assert!(gated.loss_and_grad(&t, 0..5, &GateValues::ones(2, 2), 0.0).is_err());
    assert!(gated.loss_and_grad(&t, 5..11, &GateValues::ones(3, 2), 0.0).is_err());
    assert!(gated.loss_and_grad(&[70], 0..1, &GateValues::ones(3, 2), 0.0).is_err());
}

/// A word-level tokenizer (NATO words and a few others; everything else `<unk>`) whose
/// ids fit the tiny model's vocabulary.
fn word_tokenizer() -> duo_model::TextTokenizer {
    let words: Vec<&str> = ["<unk>", "<s>", "Passkey", ":", "?", ",", "."].into_iter().chain(duo_tasks::passkey::NATO).collect();
    duo_model::TextTokenizer::word_level(&words, "<unk>", "<s>").expect("tokenizer")
}

#[test]
fn training_is_deterministic_and_resumes_exactly() {
    use duo_identify::{IdentifySettings, TrainState, Trainer};
    let model = DenseModel::random(tiny(RopeStyle::Interleaved), 5, &Device::Cpu).expect("model");
    let tok = word_tokenizer();
    let hay = duo_tasks::Haystack::Generated;
    let settings = IdentifySettings {
        steps: 3,
        min_len: 150,
        max_len: 220,
        length_count: 3,
        sink: 4,
        recent: 16,
        passkeys: 2,
        words: 4,
        lr: 0.2,
        ..Default::default()
    };
    let trainer = Trainer::new(&model, &tok, &hay, settings.clone()).expect("trainer");
    let run = |steps: usize, state: &mut TrainState| {
        for _ in 0..steps {
            trainer.step(state).expect("step");
        }
    };
    let mut a = TrainState::new(settings.clone(), 3, 2);
    run(3, &mut a);
    let mut b = TrainState::new(settings.clone(), 3, 2);
    run(3, &mut b);
    let history = |s: &TrainState| s.log.iter().map(|l| (l.step, l.length, l.loss, l.distill, l.lr)).collect::<Vec<_>>();
    assert_eq!((&a.gates, &a.m, &a.v, history(&a)), (&b.gates, &b.m, &b.v, history(&b)), "same seed and settings, same run");
    assert!(a.gates.iter().all(|g| *g < 1.0), "gates moved: {:?}", a.gates);
    for l in &a.log {
        let p = l.phases;
        let parts = l.sample_seconds + p.teacher + p.student + p.backward;
        assert!(p.teacher > 0.0 && p.student > 0.0 && p.backward > 0.0, "every pass timed: {l:?}");
        assert!(parts <= l.seconds, "the passes fit in the step: {parts} > {}", l.seconds);
    }
    // Interrupt after one step, save, load, finish: the same run.
    let path = std::env::temp_dir().join(format!("duo-identify-resume-{}.json", std::process::id()));
    let mut c = TrainState::new(settings.clone(), 3, 2);
    run(1, &mut c);
    c.save(&path).expect("save");
    let mut d = TrainState::load(&path).expect("load");
    run(2, &mut d);
    assert_eq!((&d.gates, &d.m, &d.v, history(&d)), (&a.gates, &a.m, &a.v, history(&a)));
    std::fs::remove_file(&path).ok();
    // A different seed draws different samples and ends elsewhere.
    let other = IdentifySettings { seed: 7, ..settings };
    let trainer2 = Trainer::new(&model, &tok, &hay, other.clone()).expect("trainer");
    let mut e = TrainState::new(other, 3, 2);
    for _ in 0..3 {
        trainer2.step(&mut e).expect("step");
    }
    assert_ne!(e.gates, a.gates);
}
