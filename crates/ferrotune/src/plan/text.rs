//! The human-readable plan: the run, memory per device, compute, and each rule of thumb beside
//! the detailed figure with the reasons they differ.
use super::{ComputeOptimal, Method, Plan, Strategy};
use crate::inspect::human_bytes;

/// 6.74 B, 135.0 M, 20.0 k.
pub fn count(x: f64) -> String {
    let (d, u) = if x >= 1e12 {
        (1e12, " T")
    } else if x >= 1e9 {
        (1e9, " B")
    } else if x >= 1e6 {
        (1e6, " M")
    } else if x >= 1e3 {
        (1e3, " k")
    } else {
        return format!("{x:.0}");
    };
    let v = x / d;
    if v >= 100.0 {
        format!("{v:.0}{u}")
    } else {
        format!("{v:.2}{u}")
    }
}

/// 3.1 s, 4.2 min, 5.0 h, 12.3 days, 2.1 years.
pub fn duration(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.2} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else if s < 2.0 * 86400.0 {
        format!("{:.1} h", s / 3600.0)
    } else if s < 730.0 * 86400.0 {
        format!("{:.1} days", s / 86400.0)
    } else {
        format!("{:.1} years", s / (365.25 * 86400.0))
    }
}

fn sci(x: f64) -> String {
    format!("{x:.3e}")
}

/// The compute-optimal block, alone (`--flops-budget` without a model) or after a plan.
pub fn compute_optimal_text(c: &ComputeOptimal) -> String {
    format!(
        "Compute-optimal for C = {} FLOPs (Hoffmann et al. 2022, approach 3: L = 1.69 + 406.4/N^0.34 + 410.7/D^0.28):\n  N = {} parameters, D = {} tokens ({:.1} tokens/param), loss {:.3}\n  (the rule of thumb says 20 tokens/param, from their approaches 1 and 2; the published approach-3 fit puts more data per parameter, and more as C grows)\n",
        sci(c.flops_budget),
        count(c.n),
        count(c.d),
        c.tokens_per_param,
        c.loss
    )
}

impl Plan {
    pub fn to_text(&self) -> String {
        let m = &self.model;
        let p = &self.per_device;
        let mut s = String::new();
        let ctx = m
            .context
            .map_or(String::new(), |c| format!(", context {c}"));
        s.push_str(&format!(
            "model        {} ({}): {} parameters; {} layers, hidden {}, {} heads / {} kv of {}, MLP {}, vocabulary {}{ctx}\n",
            m.source,
            m.family,
            count(self.params as f64),
            m.layers,
            m.hidden,
            m.heads,
            m.kv_heads,
            m.head_dim,
            m.intermediate,
            m.vocab
        ));
        let method = match self.method {
            Method::Full => "full fine-tuning".to_string(),
            Method::PromptTuning => format!(
                "prompt tuning, {} virtual tokens",
                self.virtual_tokens.unwrap_or(0)
            ),
            other => format!(
                "{}, rank {} on {}",
                other
                    .as_str()
                    .to_uppercase()
                    .replace("QLORA", "QLoRA")
                    .replace("LORA", "LoRA")
                    .replace("DORA", "DoRA"),
                self.rank.unwrap_or(0),
                self.targets.as_deref().unwrap_or(&[]).join(",")
            ),
        };
        s.push_str(&format!(
            "run          {method}, {}, {}; batch {} × {} tokens per device; {} × {}, {}; {} attention{}\n",
            self.dtype.as_str(),
            self.optimizer.label(),
            self.batch,
            self.seq_len,
            self.gpus,
            self.gpu.label,
            self.strategy.label(),
            self.attention,
            if self.gradient_checkpointing {
                ", gradient checkpointing"
            } else {
                ""
            }
        ));
        s.push_str(&format!(
            "trainable    {} of {} parameters ({:.3}%)\n\n",
            count(self.trainable_params as f64),
            count(self.params as f64),
            100.0 * self.trainable_params as f64 / (self.params as f64).max(1.0)
        ));

        let (sw, sg, so) = self.strategy.shards();
        let shard = |on: bool| {
            if on && self.gpus > 1 {
                format!(", sharded over {}", self.gpus)
            } else {
                String::new()
            }
        };
        let opt_what = match (self.method, self.dtype.is_16bit()) {
            (Method::Full, true) => format!("{} state + fp32 master copy", self.optimizer.label()),
            _ => format!("{} state", self.optimizer.label()),
        };
        let weights_what = match self.method {
            Method::Full => format!("{} weights", self.dtype.as_str()),
            Method::Qlora => "NF4 block linears, 16-bit rest, fp32 adapters".into(),
            _ => format!("frozen {} base, fp32 trainable", self.dtype.as_str()),
        };
        let rows = [
            ("weights", p.weights, format!("{weights_what}{}", shard(sw))),
            (
                "gradients",
                p.gradients,
                format!(
                    "{}{}",
                    if self.method == Method::Full {
                        format!("{} gradients", self.dtype.as_str())
                    } else {
                        "fp32 gradients of the trainable parameters".to_string()
                    },
                    shard(sg)
                ),
            ),
            ("optimizer", p.optimizer, format!("{opt_what}{}", shard(so))),
            (
                "activations",
                p.activations,
                format!("batch {} × {} positions", self.batch, self.positions),
            ),
            (
                "buffers",
                p.buffers,
                format!(
                    "CUDA context and workspaces 1 GiB, 5% fragmentation{}",
                    if self.strategy == Strategy::Zero3 && self.gpus > 1 {
                        ", two gathered layers"
                    } else {
                        ""
                    }
                ),
            ),
        ];
        s.push_str("memory per device\n");
        for (name, b, what) in rows {
            s.push_str(&format!("  {name:<12} {:>10}   {what}\n", human_bytes(b)));
        }
        let verdict = if self.fits {
            format!("fits, {} spare", human_bytes(self.headroom_bytes as u64))
        } else {
            format!(
                "does NOT fit, short by {}",
                human_bytes(self.headroom_bytes.unsigned_abs())
            )
        };
        s.push_str(&format!(
            "  {:<12} {:>10}   of {} ({:.1} GiB, {}): {verdict}\n",
            "total",
            human_bytes(p.total),
            human_bytes(self.gpu_memory_bytes),
            self.gpu_memory_bytes as f64 / (1u64 << 30) as f64,
            self.gpu.label
        ));
        s.push_str(&format!("  activations: {}\n\n", self.activations_formula));

        s.push_str("compute\n");
        s.push_str(&format!(
            "  tokens       {} ({}); {} steps of {} tokens\n",
            sci(self.tokens),
            self.tokens_source,
            count(self.steps),
            count((self.batch * self.seq_len * self.gpus) as f64)
        ));
        s.push_str(&format!(
            "  FLOPs        {} = {} per token; {}\n",
            sci(self.flops),
            sci(self.flops_per_token),
            self.flops_formula
        ));
        s.push_str(&format!(
            "  time         {} at {:.0}% MFU on {} × {:.1} TFLOPS ({} dense peak); {} per step, {} tokens/s\n",
            duration(self.time_s),
            100.0 * self.mfu,
            self.gpus,
            self.peak_flops_per_gpu / 1e12,
            self.peak_precision,
            duration(self.step_time_s),
            count(self.tokens_per_s)
        ));
        s.push_str(&format!("  PF/s-days    {:.4}\n", self.petaflop_s_days));
        s.push_str(&format!(
            "  Chinchilla   {} tokens would be compute-optimal for this size (20 tokens/param)\n\n",
            sci(self.chinchilla_tokens)
        ));
        if let Some(c) = &self.compute_optimal {
            s.push_str(&compute_optimal_text(c));
            s.push('\n');
        }

        s.push_str("rules of thumb vs this plan\n");
        let r = &self.rules_of_thumb;
        let mut why: Vec<String> = Vec::new();
        if self.method != Method::Full {
            why.push(format!(
                "only {} parameters train, the base is frozen",
                count(self.trainable_params as f64)
            ));
        }
        if self.gpus > 1 && self.strategy != Strategy::Ddp {
            why.push(format!(
                "{} splits model states over {} devices",
                self.strategy.label(),
                self.gpus
            ));
        }
        if self.method == Method::Full && !self.dtype.is_16bit() {
            why.push("fp32 has no separate master copy".into());
        }
        why.push(format!(
            "activations ({}) and buffers ({}) are outside the rule",
            human_bytes(p.activations),
            human_bytes(p.buffers)
        ));
        s.push_str(&format!(
            "  memory       ~16–20 bytes/param (full fine-tuning, Adam, mixed precision) = {}–{} on one device; this plan: {} per device = {:.2} bytes/param: {}\n",
            human_bytes(r.full_ft_bytes[0]),
            human_bytes(r.full_ft_bytes[1]),
            human_bytes(p.total),
            r.detailed_bytes_per_param,
            why.join("; ")
        ));
        let psi = self.params as f64;
        let n_c = m.compute_params() as f64;
        let attn = 6.0 * m.layers as f64 * self.positions as f64 * m.attn_width() as f64;
        let mut fwhy: Vec<String> = Vec::new();
        if self.method != Method::Full {
            fwhy.push("frozen weights take no weight gradients (4·N, not 6·N)".into());
        }
        if (psi - n_c).abs() >= 0.005 * psi {
            fwhy.push(format!(
                "{} of N are looked-up embeddings{} (no FLOPs)",
                count((psi - n_c).max(0.0)),
                if n_c > psi {
                    ", but a tied head multiplies"
                } else {
                    ""
                }
            ));
        }
        fwhy.push(format!(
            "the attention term 6·n_layer·n_ctx·d_attn adds {:.1}% at n_ctx {}",
            100.0 * attn / (6.0 * n_c).max(1.0),
            self.positions
        ));
        let ratio = self.flops / r.flops_6nd.max(1.0);
        s.push_str(&format!(
            "  FLOPs        6·N·D = {}; this plan: {} ({:+.1}%): {}\n",
            sci(r.flops_6nd),
            sci(self.flops),
            100.0 * (ratio - 1.0),
            fwhy.join("; ")
        ));
        let share = self.tokens / r.chinchilla_tokens.max(1.0);
        s.push_str(&format!(
            "  data         20 tokens/param = {} tokens; this plan trains on {} ({} of that)\n",
            sci(r.chinchilla_tokens),
            sci(self.tokens),
            if share < 1.0 {
                format!("{:.3}%", 100.0 * share)
            } else {
                format!("{share:.2}×")
            }
        ));
        if !self.notes.is_empty() {
            s.push_str("\nnotes\n");
            for n in &self.notes {
                s.push_str(&format!("  - {n}\n"));
            }
        }
        s
    }
}
