//! Gradient checking for ops and layers: autograd against central finite differences (in f64),
//! and fused ops against their unfused references. Public so other modules' tests can use it.
//!
//! Both checks reduce the output to a scalar with *fixed random weights* rather than a plain sum,
//! so that every output element contributes with a different weight and a backward pass that
//! mixes up elements (wrong transpose, wrong head) cannot cancel out.
use candle_core::{bail, DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};

/// Deterministic uniform(-1, 1) tensor on the CPU.
pub fn rand_tensor(shape: &[usize], dtype: DType, seed: u64) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// Errors unless `got` and `want` have the same shape and
/// max|got − want| ≤ tol · max(1, max|want|). The message names the worst element.
pub fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) -> Result<()> {
    if got.dims() != want.dims() {
        bail!(
            "{what}: shape {:?} vs expected {:?}",
            got.dims(),
            want.dims()
        )
    }
    let g = got.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let w = want.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let scale = w.iter().fold(1f64, |m, v| m.max(v.abs()));
    let mut worst = (0usize, 0f64);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let d = (a - b).abs();
        // NaN must fail, so compare with `!(d <= ..)` semantics via is_nan.
        if d.is_nan() || d > worst.1 {
            worst = (i, if d.is_nan() { f64::INFINITY } else { d });
        }
    }
    if worst.1 > tol * scale {
        let i = worst.0;
        bail!(
            "{what}: element {i} of {:?} is {:.6e}, expected {:.6e} (|diff| {:.3e} > tol {tol:.1e} × scale {scale:.3e})",
            got.dims(),
            g[i],
            w[i],
            worst.1
        )
    }
    Ok(())
}

/// Fixed random weights for reducing an output to a scalar loss.
fn loss_weights(like: &Tensor) -> Result<Tensor> {
    rand_tensor(like.dims(), like.dtype(), 0x5eed_cafe)?.to_device(like.device())
}

fn weighted_loss(y: &Tensor, r: &Tensor) -> Result<Tensor> {
    (y * r)?.sum_all()
}

/// Compares the autograd gradient of `loss = Σ f(inputs) ∘ R` (R fixed random weights) with
/// respect to every input against central finite differences with step `eps`, all in f64.
///
/// Passes when |autograd − numeric| ≤ tol · max(1, |numeric|) for every element. Fails when an
/// input gets no gradient although it affects the loss (a silently cut graph), and when an input
/// does not affect the loss at all (the check would be vacuous). Constants that should get no
/// gradient (rope's cos/sin, a frozen weight) belong in the closure, not in `inputs`.
pub fn check_gradients(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    eps: f64,
    tol: f64,
) -> Result<()> {
    let base: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_device(&Device::Cpu)?.to_dtype(DType::F64))
        .collect::<Result<_>>()?;
    let vars: Vec<Var> = base.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let var_tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&var_tensors)?;
    let r = loss_weights(&y)?;
    let grads = weighted_loss(&y, &r)?.backward()?;

    let loss_at = |xs: &[Tensor]| -> Result<f64> { weighted_loss(&f(xs)?, &r)?.to_scalar::<f64>() };
    for (i, (var, x)) in vars.iter().zip(&base).enumerate() {
        let analytic: Vec<f64> = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1::<f64>()?,
            None => vec![0.0; x.elem_count()],
        };
        let values = x.flatten_all()?.to_vec1::<f64>()?;
        let mut worst: Option<(usize, f64, f64, f64)> = None;
        let mut any_effect = false;
        let mut xs = base.clone();
        for k in 0..values.len() {
            let mut perturbed = values.clone();
            perturbed[k] = values[k] + eps;
            xs[i] = Tensor::from_vec(perturbed.clone(), x.shape(), &Device::Cpu)?;
            let plus = loss_at(&xs)?;
            perturbed[k] = values[k] - eps;
            xs[i] = Tensor::from_vec(perturbed, x.shape(), &Device::Cpu)?;
            let minus = loss_at(&xs)?;
            let numeric = (plus - minus) / (2.0 * eps);
            any_effect |= numeric.abs() > 1e-9;
            let err = (analytic[k] - numeric).abs() / numeric.abs().max(1.0);
            let err = if err.is_nan() { f64::INFINITY } else { err };
            if worst.is_none_or(|w| err > w.1) {
                worst = Some((k, err, analytic[k], numeric));
            }
        }
        if !any_effect {
            bail!(
                "gradcheck: input {i} {:?} does not affect the output, so its check is vacuous",
                x.dims()
            )
        }
        if let Some((k, err, a, n)) = worst {
            if err > tol {
                let missing = if grads.get(var.as_tensor()).is_none() {
                    " (autograd gave NO gradient)"
                } else {
                    ""
                };
                bail!(
                    "gradcheck: input {i} {:?} element {k}: autograd {a:.9e} vs finite differences {n:.9e} (error {err:.3e} > tol {tol:.1e}){missing}",
                    x.dims()
                )
            }
        }
    }
    Ok(())
}

/// Runs `fused` and `reference` on `Var` copies of `inputs` (same dtype and device) and checks
/// that outputs and all input gradients of `Σ out ∘ R` agree to `tol` (see [`assert_close`]).
/// A missing gradient on one side only is an error.
pub fn compare_grads(
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    tol: f64,
    what: &str,
) -> Result<()> {
    let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| -> Result<(Tensor, Vec<Option<Tensor>>)> {
        let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts)?;
        let grads = weighted_loss(&y, &loss_weights(&y)?)?.backward()?;
        let gs = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        Ok((y, gs))
    };
    let (y1, g1) = run(&fused)?;
    let (y2, g2) = run(&reference)?;
    assert_close(&y1, &y2, tol, &format!("{what}: forward"))?;
    for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
        match (a, b) {
            (Some(a), Some(b)) => {
                assert_close(a, b, tol, &format!("{what}: gradient of input {i}"))?
            }
            (None, None) => {}
            (None, Some(_)) => bail!("{what}: fused op gave no gradient for input {i}"),
            (Some(_), None) => bail!("{what}: reference gave no gradient for input {i}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradcheck_accepts_a_correct_gradient() -> Result<()> {
        let x = rand_tensor(&[3, 4], DType::F64, 1)?;
        check_gradients(|v| v[0].sqr()?.exp(), &[x], 1e-6, 1e-6)
    }

    #[test]
    fn gradcheck_rejects_a_silently_cut_gradient() -> Result<()> {
        let x = rand_tensor(&[3, 4], DType::F64, 2)?;
        // detach() cuts the graph the way candle's forward-only fused ops do.
        let err = check_gradients(|v| v[0].detach().sqr(), &[x], 1e-6, 1e-6).unwrap_err();
        assert!(err.to_string().contains("NO gradient"), "{err}");
        Ok(())
    }

    #[test]
    fn gradcheck_rejects_a_vacuous_input() -> Result<()> {
        let x = rand_tensor(&[2], DType::F64, 3)?;
        let y = rand_tensor(&[2], DType::F64, 4)?;
        let err = check_gradients(|v| v[0].sqr(), &[x, y], 1e-6, 1e-6).unwrap_err();
        assert!(err.to_string().contains("vacuous"), "{err}");
        Ok(())
    }

    #[test]
    fn compare_grads_rejects_a_wrong_gradient() -> Result<()> {
        let x = rand_tensor(&[5], DType::F64, 5)?;
        // Same forward value, but x·detach(x) differentiates only one factor: half the gradient.
        let err = compare_grads(
            |v| v[0].sqr(),
            |v| v[0].mul(&v[0].detach()),
            &[x],
            1e-9,
            "t",
        )
        .unwrap_err();
        assert!(err.to_string().contains("gradient of input 0"), "{err}");
        Ok(())
    }
}
