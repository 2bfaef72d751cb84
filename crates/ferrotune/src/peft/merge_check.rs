//! What merging an adapter trained on a quantized base does to the model's outputs.
//!
//! An adapter trained with QLoRA learned a correction for the *quantized* base. Merging it
//! gives `dequant(W) + scale·BA` in f32: the same function, up to rounding. But users who then
//! quantize the merged model again (to ship it in 4 bits) get `quant(dequant(W) + scale·BA)`,
//! which is not the model they trained: the re-quantization error lands on top of the
//! adapter's small delta, often erasing much of it. This check runs a sample through all three
//! and reports the differences, so the surprise shows up at merge time rather than in
//! production.
use crate::data::{self, BatchConfig, Batcher, Example};
use crate::model::Model;
use crate::nn::LinearWeight;
use crate::quant::BaseQuant;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use std::path::Path;
use std::sync::Arc;

/// A sample text for the check when the user gives none (ours, written for this purpose).
pub const SAMPLE_TEXT: &str = "Person A: Did you finish the report for the quarterly \
review? Person B: Almost. I still need the numbers from the sales team, and they promised to \
send them by noon. Person A: Good. Remember that the meeting moved to Thursday afternoon, so we \
have one more day than we planned. Person B: That helps. I will also add a short summary of the \
customer survey at the end.";

/// Differences of the model's next-token predictions on a sample, three ways.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeCheck {
    /// Positions compared.
    pub tokens: usize,
    /// Mean NLL of the sample's next tokens: adapter applied on the fly on the quantized base
    /// (what was trained).
    pub nll_adapter: f64,
    /// ... merged into the dequantized base (f32).
    pub nll_merged: f64,
    /// Largest |logit difference|, merged vs on the fly.
    pub max_abs_logit_diff_merged: f64,
    /// The format the merged weights were quantized back to, when a quantized base was merged.
    pub requantized_as: Option<String>,
    /// Mean NLL with the merged weights quantized back to the base's format.
    pub nll_requantized: Option<f64>,
    /// Largest |logit difference|, merged-then-requantized vs on the fly.
    pub max_abs_logit_diff_requantized: Option<f64>,
    /// Relative L2 difference of all logits, merged-then-requantized vs on the fly.
    pub rel_l2_logits_requantized: Option<f64>,
    /// Share of positions whose top-1 token is the same, merged-then-requantized vs on the fly.
    pub top1_agreement_requantized: Option<f64>,
}

impl MergeCheck {
    /// One line for the console.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "merge check on {} tokens: NLL on the fly {:.4}, merged {:.4} (max |Δlogit| {:.2e})",
            self.tokens, self.nll_adapter, self.nll_merged, self.max_abs_logit_diff_merged
        );
        if let (Some(q), Some(n), Some(d), Some(t)) = (
            &self.requantized_as,
            self.nll_requantized,
            self.max_abs_logit_diff_requantized,
            self.top1_agreement_requantized,
        ) {
            s.push_str(&format!(
                "; merged then re-quantized to {q}: NLL {n:.4} ({:+.2}%), max |Δlogit| {d:.3}, top-1 agreement {:.1}%",
                (n / self.nll_adapter - 1.0) * 100.0,
                t * 100.0
            ));
        }
        s
    }
}

/// `(positions, vocab)` logits of `ids[..n-1]` and the mean NLL of `ids[1..]`.
fn logits_and_nll(model: &dyn Model, ids: &[u32]) -> Result<(Vec<Vec<f32>>, f64)> {
    let ex = Example {
        input_ids: ids.to_vec(),
        labels: std::iter::once(data::IGNORE)
            .chain(ids[1..].iter().map(|&i| i64::from(i)))
            .collect(),
        source: data::Source {
            file: Arc::from(Path::new("merge check sample")),
            loc: data::Loc::Line(1),
            task: None,
        },
    };
    let bc = BatchConfig {
        shuffle: false,
        ..BatchConfig::new(1, ids.len(), 0).with_targets(data::Targets::NextToken)
    };
    let batch = Batcher::new(vec![ex], bc, model.device().clone())?.build(&[vec![0]])?;
    let (sum, n) = model.loss_sum(&batch, false)?;
    let nll = sum.to_dtype(DType::F64)?.to_scalar::<f64>()? / n.max(1) as f64;
    let logits = model.logits(&batch)?.to_dtype(DType::F32)?;
    let t = ids.len() - 1;
    let logits: Tensor = logits.squeeze(0)?.narrow(0, 0, t)?;
    Ok((logits.to_vec2::<f32>()?, nll))
}

fn compare(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f64, f64, f64) {
    let (mut max, mut num, mut den, mut agree) = (0f64, 0f64, 0f64, 0usize);
    for (ra, rb) in a.iter().zip(b) {
        let argmax = |r: &[f32]| {
            r.iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |m, (i, &v)| if v > m.1 { (i, v) } else { m },
                )
                .0
        };
        agree += usize::from(argmax(ra) == argmax(rb));
        for (&x, &y) in ra.iter().zip(rb) {
            let d = (x as f64 - y as f64).abs();
            max = max.max(d);
            num += d * d;
            den += (x as f64) * (x as f64);
        }
    }
    (
        max,
        (num / den.max(1e-30)).sqrt(),
        agree as f64 / a.len().max(1) as f64,
    )
}

/// Merge adapter `adapter_name` into `model` (as [`super::merge_and_unload`]) and measure, on
/// the token ids `ids` (at least 2), how the merged model and the merged model quantized back
/// to its base's format differ from the adapter applied on the fly. The model is left merged
/// and dense, as `merge_and_unload` leaves it.
pub fn merge_and_check(
    model: &mut dyn Model,
    adapter_name: &str,
    ids: &[u32],
) -> Result<(super::MergeReport, MergeCheck)> {
    if ids.len() < 2 {
        return Err(Error::msg(
            "merge check: the sample needs at least 2 tokens",
        ));
    }
    // the formats of the quantized linears the adapter touches, to quantize them back
    let mut formats: Vec<(String, BaseQuant)> = Vec::new();
    for lin in model.linears() {
        if let LinearWeight::Quantized(q) = lin.weight() {
            if lin.adapters().any(|(n, _)| n == adapter_name) {
                if let Some(bq) = q.base_quant() {
                    formats.push((lin.name().to_string(), bq));
                }
            }
        }
    }
    let (fly, nll_adapter) = logits_and_nll(&*model, ids)?;
    let report = super::merge_and_unload(model, adapter_name)?;
    let (merged, nll_merged) = logits_and_nll(&*model, ids)?;
    let (max_merged, _, _) = compare(&fly, &merged);
    let mut check = MergeCheck {
        tokens: fly.len(),
        nll_adapter,
        nll_merged,
        max_abs_logit_diff_merged: max_merged,
        requantized_as: None,
        nll_requantized: None,
        max_abs_logit_diff_requantized: None,
        rel_l2_logits_requantized: None,
        top1_agreement_requantized: None,
    };
    if formats.is_empty() {
        return Ok((report, check));
    }
    // quantize the merged weights back, measure, then put the dense merged weights back
    let mut saved = Vec::new();
    let mut names: Vec<String> = formats.iter().map(|(_, b)| b.name()).collect();
    names.sort();
    names.dedup();
    for lin in model.linears_mut() {
        let Some((_, bq)) = formats.iter().find(|(n, _)| n == lin.name()) else {
            continue;
        };
        let dense = lin.weight().to_dense_f32()?;
        if let Some(q) = bq.quantize(&dense)? {
            saved.push((lin.name().to_string(), lin.weight().clone()));
            lin.set_weight(LinearWeight::Quantized(Arc::new(q)));
        }
    }
    let requant = logits_and_nll(&*model, ids);
    for lin in model.linears_mut() {
        if let Some((_, w)) = saved.iter().find(|(n, _)| n == lin.name()) {
            lin.set_weight(w.clone());
        }
    }
    let (rq, nll_rq) = requant?;
    let (max, rel, top1) = compare(&fly, &rq);
    check.requantized_as = Some(names.join(", "));
    check.nll_requantized = Some(nll_rq);
    check.max_abs_logit_diff_requantized = Some(max);
    check.rel_l2_logits_requantized = Some(rel);
    check.top1_agreement_requantized = Some(top1);
    Ok((report, check))
}
