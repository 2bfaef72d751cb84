//! The backward pass of the vendored candle-core (vendor/README.md): a tensor's first gradient
//! is stored as it is instead of being added to zeros. These gradients, of tensors used once,
//! several times, subtracted, broadcast, reduced and reached through views, must still equal
//! their closed forms, and every stored gradient must be contiguous as before.
use candle_core::{Device, Tensor, Var};

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn var(v: &[f32], shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::from_slice(v, shape, &Device::Cpu).unwrap()).unwrap()
}

const X: [f32; 6] = [0.5, -1.25, 2.0, 3.5, -0.75, 1.5];

#[test]
fn a_tensor_used_several_times_sums_its_gradients() {
    let x = var(&X, &[2, 3]);
    // x * x + x: x is both operands of the product and one of the sum: d/dx = 2x + 1
    let y = ((x.as_tensor() * x.as_tensor()).unwrap() + x.as_tensor()).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let gx = g.get(&x).unwrap();
    assert!(gx.is_contiguous());
    let want: Vec<f32> = X.iter().map(|v| 2.0 * v + 1.0).collect();
    assert_eq!(vals(gx), want);
}

#[test]
fn subtraction_and_scaling_give_exact_gradients() {
    let x = var(&X, &[6]);
    // x - 3x^2: d/dx = 1 - 6x; and a tensor reached once gets exactly the upstream gradient
    let y = (x.as_tensor() - x.as_tensor().sqr().unwrap().affine(3.0, 0.0).unwrap()).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let want: Vec<f32> = X.iter().map(|v| 1.0 - 6.0 * v).collect();
    assert_eq!(vals(g.get(&x).unwrap()), want);
    let z = var(&X, &[6]);
    let g = z
        .as_tensor()
        .affine(-2.5, 1.0)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(vals(g.get(&z).unwrap()), vec![-2.5f32; 6]);
}

#[test]
fn broadcast_reduced_and_viewed_gradients() {
    let x = var(&X, &[2, 3]);
    let b = var(&[1.0, 2.0, 3.0], &[3]);
    let c = Tensor::from_slice(&[1f32, 2., 3., 4., 5., 6.], (3, 2), &Device::Cpu).unwrap();
    // sum((x + b)^T * c): d/dx = c^T (reached through a transpose: a strided first gradient),
    // d/db[j] = sum_i c[j, i]
    let y = (x
        .as_tensor()
        .broadcast_add(b.as_tensor())
        .unwrap()
        .t()
        .unwrap()
        * &c)
        .unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let gx = g.get(&x).unwrap();
    assert!(gx.is_contiguous());
    assert_eq!(vals(gx), vec![1., 3., 5., 2., 4., 6.]);
    assert_eq!(vals(g.get(&b).unwrap()), vec![3., 7., 11.]);
}

#[test]
fn matmul_through_reshape_matches_the_closed_form() {
    let x = var(&X, &[2, 3]);
    let w = var(
        &[
            0.5, -1.0, 2.0, 0.25, 1.5, -0.5, 1.0, 3.0, -2.0, 0.75, 0.5, 1.25,
        ],
        &[3, 4],
    );
    // sum(reshape(x @ w)) twice over the same product: dW = 2 x^T 1, dx = 2 * 1 w^T
    let p = x.as_tensor().matmul(w.as_tensor()).unwrap();
    let y = (p.reshape(8).unwrap() + p.reshape(8).unwrap()).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let col_sums = [X[0] + X[3], X[1] + X[4], X[2] + X[5]];
    let want_w: Vec<f32> = (0..12).map(|i| 2.0 * col_sums[i / 4]).collect();
    assert_eq!(vals(g.get(&w).unwrap()), want_w);
    let wv = vals(w.as_tensor());
    let row_sums: Vec<f32> = (0..3).map(|r| wv[r * 4..r * 4 + 4].iter().sum()).collect();
    let want_x: Vec<f32> = (0..6).map(|i| 2.0 * row_sums[i % 3]).collect();
    assert_eq!(vals(g.get(&x).unwrap()), want_x);
}
