//! The GPU dequantisation's CPU reference (`duo_cuda::dequant::reference`, written from the
//! GGML block layouts) against candle's dequantisation of the same random blocks, for every
//! GGUF type the CUDA backend dequantises on the device: the two must agree exactly (the GPU
//! kernel is then checked against this reference bit for bit by `duo cuda-check`).

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::Device;
use duo_cuda::dequant::{random_blocks, reference, QuantType};
use duo_engine::backend::cuda::gpu_type;

#[test]
fn reference_dequantisation_equals_candles() {
    use candle_core::quantized::GgmlDType as G;
    let n = 256 * 64;
    for (ggml, seed) in [(G::F32, 1), (G::F16, 2), (G::BF16, 3), (G::Q8_0, 4), (G::Q4_0, 5), (G::Q4_1, 6), (G::Q4K, 7), (G::Q6K, 8)] {
        let ty: QuantType = gpu_type(ggml).expect("the GPU takes it");
        let bytes = random_blocks(ty, n, seed).expect("blocks");
        let ours = reference(ty, &bytes, n).expect("reference");
        let t = qtensor_from_ggml(ggml, &bytes, vec![64, 256], &Device::Cpu).expect("candle reads the blocks");
        let theirs = t.dequantize(&Device::Cpu).expect("dequantize").flatten_all().expect("flat").to_vec1::<f32>().expect("values");
        let differ = ours.iter().zip(&theirs).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differ, 0, "{ggml:?}: {differ} of {n} values differ from candle's");
        assert!(ours.iter().all(|v| v.is_finite()) && ours.iter().any(|&v| v != 0.0), "{ggml:?}");
    }
    assert_eq!(gpu_type(G::Q5K), None, "other types are converted on the host");
}
