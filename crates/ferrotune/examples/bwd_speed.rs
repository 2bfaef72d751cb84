use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use ferrotune::quant::{BackwardWeights, QuantWeight};
fn main() {
    ferrotune::quant::set_num_threads(2);
    let (m, n, k) = (1024, 1536, 576);
    let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
    let q = QuantWeight::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
    let gy = Tensor::randn(0f32, 1.0, (m, n), &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
    for method in [BackwardWeights::Exact, BackwardWeights::Q8Transposed] {
        let _ = q.backward_input_with(&gy, method).unwrap();
        let t = std::time::Instant::now();
        for _ in 0..10 { let _ = q.backward_input_with(&gy, method).unwrap(); }
        let dt = t.elapsed().as_secs_f64() / 10.0;
        println!("{method:?}: {:.2} ms, {:.1} GMAC/s", dt * 1e3, (m * n * k) as f64 / dt / 1e9);
    }
    let t = std::time::Instant::now();
    for _ in 0..10 { let _ = q.forward(&x).unwrap(); }
    let dt = t.elapsed().as_secs_f64() / 10.0;
    println!("forward: {:.2} ms, {:.1} GMAC/s", dt * 1e3, (m * n * k) as f64 / dt / 1e9);
}
