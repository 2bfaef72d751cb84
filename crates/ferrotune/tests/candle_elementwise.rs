//! candle's element-wise ops on rayon's pool (a vendored change, see vendor/README.md): with
//! `CANDLE_NUM_THREADS=1`, what training sets, a large op runs its chunks on rayon's global
//! pool instead of on the calling thread alone. Its own binary: the setting is read once per
//! process, before candle's first large op, which another test of a shared binary could run.
use candle_core::{DType, Device, Tensor};

#[test]
fn large_elementwise_ops_on_rayon_compute_every_element_as_one_thread_does() {
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build_global()
        .expect("the test's rayon pool");
    let dev = Device::Cpu;
    // 64k values is where candle starts splitting; odd sizes leave a short last chunk
    for n in [64 * 1024, 64 * 1024 + 17, 1_000_003] {
        let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() + 2.0).collect();
        let ta = Tensor::from_vec(a.clone(), n, &dev).unwrap();
        let tb = Tensor::from_vec(b.clone(), n, &dev).unwrap();
        let check = |t: Tensor, len: usize, f: &dyn Fn(usize) -> f32, what: &str| {
            let got = t.to_vec1::<f32>().unwrap();
            assert_eq!(got.len(), len, "{what}");
            for (i, g) in got.iter().enumerate() {
                assert_eq!(g.to_bits(), f(i).to_bits(), "{what}, n {n}, element {i}");
            }
        };
        check((&ta + &tb).unwrap(), n, &|i| a[i] + b[i], "add");
        check((&ta * &tb).unwrap(), n, &|i| a[i] * b[i], "mul");
        check((&ta / &tb).unwrap(), n, &|i| a[i] / b[i], "div");
        check(ta.sqr().unwrap(), n, &|i| a[i] * a[i], "sqr");
        check(
            ta.to_dtype(DType::F64)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
            n,
            &|i| a[i],
            "to f64 and back",
        );
        // a broadcast operand (stride 0 along the rows) and a transposed one: the strided arms
        let cols = 1024;
        let rows = n / cols;
        let m = ta
            .narrow(0, 0, rows * cols)
            .unwrap()
            .reshape((rows, cols))
            .unwrap();
        let row = tb.narrow(0, 0, cols).unwrap().reshape((1, cols)).unwrap();
        check(
            m.broadcast_add(&row).unwrap().flatten_all().unwrap(),
            rows * cols,
            &|i| a[i] + b[i % cols],
            "broadcast add",
        );
        let mt = tb
            .narrow(0, 0, rows * cols)
            .unwrap()
            .reshape((cols, rows))
            .unwrap()
            .t()
            .unwrap();
        check(
            (&m + &mt).unwrap().flatten_all().unwrap(),
            rows * cols,
            &|i| a[i] + b[(i % cols) * rows + i / cols],
            "transposed add",
        );
    }
}
