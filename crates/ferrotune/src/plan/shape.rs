//! What `plan` needs to know about a model, from its config alone (no weights are read): the
//! parameter count (exact for a config: embeddings, a tied or untied head, norms, biases, GQA's
//! narrower k/v), the transformer's sizes, and its linear modules by name (what LoRA targets and
//! what QLoRA quantizes). With only a parameter count, a plausible LLaMA-style shape is derived.
use crate::model::bert::{BertConfig, BertHead};
use crate::model::config::limits;
use crate::model::{LlamaConfig, ModelSource, T5Config};
use crate::{Error, Result};
use serde::Serialize;

/// One kind of linear module: `count` copies of an `in_features` → `out_features` weight.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LinearGroup {
    /// The module name as PEFT's `target_modules` matches it (its last name components).
    pub name: String,
    pub in_features: u64,
    pub out_features: u64,
    pub count: u64,
}

impl LinearGroup {
    fn new(name: &str, in_features: u64, out_features: u64, count: u64) -> Self {
        Self {
            name: name.to_string(),
            in_features,
            out_features,
            count,
        }
    }
    pub fn params(&self) -> u64 {
        self.in_features * self.out_features * self.count
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelShape {
    /// `llama`, `t5`, `bert`, or `llama-like` for a shape derived from a parameter count.
    pub family: String,
    /// Where the shape came from: a config file, or `--params` / the shape flags.
    pub source: String,
    /// All parameters, each tied tensor once.
    pub params: u64,
    /// Input embedding tables (word, position, token type): looked up, no multiply-adds.
    pub embedding_params: u64,
    /// Weights of the output projection onto the vocabulary (V·h whether tied or not; 0 where
    /// the model has no LM head): matmul FLOPs, and logits in memory.
    pub head_matmul_params: u64,
    /// The LM head has its own weight (untied); QLoRA keeps it in 16 bits.
    pub untied_head: bool,
    /// Transformer blocks, encoder and decoder together.
    pub layers: u64,
    pub hidden: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub intermediate: u64,
    pub vocab: u64,
    pub context: Option<u64>,
    /// The linears inside the transformer blocks (the LM head is not among them).
    pub linears: Vec<LinearGroup>,
    /// PEFT's default LoRA `target_modules` for this family.
    #[serde(skip)]
    pub default_targets: &'static [&'static str],
}

impl ModelShape {
    /// Weights of the block linears: what QLoRA stores in 4 bits.
    pub fn linear_params(&self) -> u64 {
        self.linears.iter().map(LinearGroup::params).sum()
    }

    /// Parameters whose matmuls run for every token: all but the input embedding lookups, plus
    /// the LM head's (which a tied head shares with the embedding).
    pub fn compute_params(&self) -> u64 {
        let head_extra = if self.untied_head {
            0
        } else {
            self.head_matmul_params
        };
        self.params
            .saturating_sub(self.embedding_params)
            .saturating_add(head_extra)
    }

    /// The width of the attention (`heads · head_dim`), Kaplan et al.'s d_attn.
    pub fn attn_width(&self) -> u64 {
        self.heads * self.head_dim
    }
}

fn llama_shape(cfg: &LlamaConfig, source: String) -> ModelShape {
    let h = cfg.hidden_size as u64;
    let q = (cfg.num_attention_heads * cfg.head_dim) as u64;
    let kv = (cfg.num_key_value_heads * cfg.head_dim) as u64;
    let i = cfg.intermediate_size as u64;
    let l = cfg.num_hidden_layers as u64;
    let v = cfg.vocab_size as u64;
    ModelShape {
        family: "llama".into(),
        source,
        params: cfg.num_params(),
        embedding_params: v * h,
        head_matmul_params: v * h,
        untied_head: !cfg.tie_word_embeddings,
        layers: l,
        hidden: h,
        heads: cfg.num_attention_heads as u64,
        kv_heads: cfg.num_key_value_heads as u64,
        head_dim: cfg.head_dim as u64,
        intermediate: i,
        vocab: v,
        context: Some(cfg.max_position_embeddings as u64),
        linears: vec![
            LinearGroup::new("q_proj", h, q, l),
            LinearGroup::new("k_proj", h, kv, l),
            LinearGroup::new("v_proj", h, kv, l),
            LinearGroup::new("o_proj", q, h, l),
            LinearGroup::new("gate_proj", h, i, l),
            LinearGroup::new("up_proj", h, i, l),
            LinearGroup::new("down_proj", i, h, l),
        ],
        default_targets: &["q_proj", "v_proj"],
    }
}

fn t5_shape(cfg: &T5Config, source: String) -> ModelShape {
    let d = cfg.d_model as u64;
    let inner = cfg.inner_dim() as u64;
    let ff = cfg.d_ff as u64;
    let (enc, dec) = (cfg.num_layers as u64, cfg.num_decoder_layers as u64);
    let v = cfg.vocab_size as u64;
    // Encoder blocks have one attention, decoder blocks two (self and cross), all named q/k/v/o.
    let attn = enc + 2 * dec;
    let mut linears = vec![
        LinearGroup::new("q", d, inner, attn),
        LinearGroup::new("k", d, inner, attn),
        LinearGroup::new("v", d, inner, attn),
        LinearGroup::new("o", inner, d, attn),
    ];
    if cfg.gated {
        linears.push(LinearGroup::new("wi_0", d, ff, enc + dec));
        linears.push(LinearGroup::new("wi_1", d, ff, enc + dec));
    } else {
        linears.push(LinearGroup::new("wi", d, ff, enc + dec));
    }
    linears.push(LinearGroup::new("wo", ff, d, enc + dec));
    ModelShape {
        family: "t5".into(),
        source,
        params: cfg.num_params(),
        embedding_params: v * d,
        head_matmul_params: v * d,
        untied_head: !cfg.tie_word_embeddings,
        layers: enc + dec,
        hidden: d,
        heads: cfg.num_heads as u64,
        kv_heads: cfg.num_heads as u64,
        head_dim: cfg.d_kv as u64,
        intermediate: ff,
        vocab: v,
        context: None,
        linears,
        default_targets: &["q", "v"],
    }
}

fn bert_shape(cfg: &BertConfig, source: String) -> ModelShape {
    let h = cfg.hidden_size as u64;
    let i = cfg.intermediate_size as u64;
    let l = cfg.num_hidden_layers as u64;
    let v = cfg.vocab_size as u64;
    let head = cfg.saved_head();
    let mlm = head == BertHead::MaskedLm;
    ModelShape {
        family: "bert".into(),
        source,
        params: cfg.num_params(head),
        embedding_params: (v + cfg.max_position_embeddings as u64 + cfg.type_vocab_size as u64) * h,
        // The masked-LM decoder reads the word embeddings; other heads have no vocabulary output.
        head_matmul_params: if mlm { v * h } else { 0 },
        untied_head: false,
        layers: l,
        hidden: h,
        heads: cfg.num_attention_heads as u64,
        kv_heads: cfg.num_attention_heads as u64,
        head_dim: cfg.head_dim() as u64,
        intermediate: i,
        vocab: v,
        context: Some(cfg.max_tokens() as u64),
        linears: vec![
            LinearGroup::new("query", h, h, l),
            LinearGroup::new("key", h, h, l),
            LinearGroup::new("value", h, h, l),
            LinearGroup::new("attention.output.dense", h, h, l),
            LinearGroup::new("intermediate.dense", h, i, l),
            LinearGroup::new("output.dense", i, h, l),
        ],
        default_targets: &["query", "value"],
    }
}

/// The shape of the model `spec` names (`--model`): an HF folder's config.json (LLaMA family,
/// T5, BERT), a GGUF file's metadata, or `hf:org/name` (only config.json is downloaded).
pub fn from_model(spec: &str) -> Result<ModelShape> {
    let source = match spec.strip_prefix("hf:") {
        // `hf:org/name/file.gguf` is one file: the metadata is in it.
        Some(rest) if rest.split('@').next().unwrap_or("").split('/').count() <= 2 => {
            crate::model::hub::download_config(rest)?
        }
        _ => crate::model::resolve(spec)?,
    };
    match &source {
        ModelSource::Gguf(path) => {
            let content = crate::model::read_gguf(path)?;
            let cfg = crate::model::config_from_gguf(&content, path)?;
            Ok(llama_shape(&cfg, path.display().to_string()))
        }
        ModelSource::HfDir(dir) => {
            let p = dir.join("config.json");
            let text = crate::fsutil::read_to_string(&p).map_err(|e| Error::file(&p, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::file(&p, format!("invalid JSON: {e}")))?;
            let name = p.display().to_string();
            if crate::model::t5::is_t5_config(&v) {
                Ok(t5_shape(&T5Config::from_hf_json(&v, &name)?, name))
            } else if BertConfig::is_bert_family(&v) {
                Ok(bert_shape(&BertConfig::from_hf_json(&v, &name)?, name))
            } else {
                Ok(llama_shape(&LlamaConfig::from_hf_json(&v, &name)?, name))
            }
        }
    }
}

/// Shape flags given with or instead of `--params`.
#[derive(Clone, Debug, Default)]
pub struct ShapeFlags {
    pub layers: Option<usize>,
    pub hidden: Option<usize>,
    pub heads: Option<usize>,
    pub kv_heads: Option<usize>,
    pub vocab: Option<usize>,
    pub intermediate: Option<usize>,
}

impl ShapeFlags {
    pub fn any(&self) -> bool {
        self.layers.is_some()
            || self.hidden.is_some()
            || self.heads.is_some()
            || self.kv_heads.is_some()
            || self.vocab.is_some()
            || self.intermediate.is_some()
    }
}

/// LLaMA 2's vocabulary: the default where only a parameter count is given.
const DEFAULT_VOCAB: u64 = 32000;
/// Hidden size per layer of most released decoders (LLaMA 7B/13B: 4096/32, 5120/40; GPT-3
/// 175B: 12288/96): the aspect ratio a shape is derived with.
const WIDTH_PER_LAYER: u64 = 128;

fn bad(flag: &str, what: impl std::fmt::Display) -> Error {
    Error::msg(format!("{flag}: {what}"))
}

fn check_flag(flag: &str, v: Option<usize>, max: usize) -> Result<Option<u64>> {
    match v {
        None => Ok(None),
        Some(x) => limits::check_size(x, max)
            .map(|_| Some(x as u64))
            .map_err(|e| bad(flag, e)),
    }
}

/// Round to a multiple of `m`, at least `m`.
fn round_to(x: f64, m: u64) -> u64 {
    ((x / m as f64).round() as u64).max(1) * m
}

/// A LLaMA-style decoder shape (RMSNorm, SwiGLU MLP, untied head) for `params` parameters
/// (`None`: count them from the flags, which must then give at least `--layers` and
/// `--hidden`), taking every size the flags give and deriving the rest: layers and width at
/// 128 hidden units per layer, 128-wide heads (64 below a width of 1024), the MLP width that
/// brings the count closest to `params`.
pub fn derived(params: Option<u64>, f: &ShapeFlags) -> Result<ModelShape> {
    let layers = check_flag("--layers", f.layers, limits::MAX_LAYERS)?;
    let hidden = check_flag("--hidden", f.hidden, limits::MAX_WIDTH)?;
    let heads = check_flag("--heads", f.heads, limits::MAX_HEADS)?;
    let kv_heads = check_flag("--kv-heads", f.kv_heads, limits::MAX_HEADS)?;
    let vocab = check_flag("--vocab", f.vocab, limits::MAX_VOCAB)?.unwrap_or(DEFAULT_VOCAB);
    let intermediate = check_flag("--intermediate", f.intermediate, limits::MAX_WIDTH)?;
    if params.is_none() && (layers.is_none() || hidden.is_none()) {
        return Err(bad(
            "--params",
            "missing: give --model, --params (e.g. 7B), or at least --layers and --hidden",
        ));
    }
    // Attention 4h² (before GQA), SwiGLU MLP 3·h·(8h/3) = 8h²: 12h² per layer; embeddings and
    // an untied head 2·V·h.
    let n = params.unwrap_or(0) as f64;
    let v = vocab as f64;
    let (l, h) = match (layers, hidden) {
        (Some(l), Some(h)) => (l, h),
        (None, Some(h)) => {
            let hf = h as f64;
            let l = ((n - 2.0 * v * hf) / (12.0 * hf * hf)).round().max(1.0) as u64;
            (l.min(limits::MAX_LAYERS as u64), h)
        }
        (Some(l), None) => {
            // 12·l·h² + 2·v·h = n
            let (a, b) = (12.0 * l as f64, 2.0 * v);
            let h = (-b + (b * b + 4.0 * a * n).sqrt()) / (2.0 * a);
            (l, round_to(h, 64).min(limits::MAX_WIDTH as u64))
        }
        (None, None) => {
            // The layer count whose shape at 128 units per layer comes closest (log scale).
            let count = |l: u64| {
                let h = (l * WIDTH_PER_LAYER) as f64;
                12.0 * l as f64 * h * h + 2.0 * v * h
            };
            let l = (1..=limits::MAX_LAYERS as u64 / 4)
                .min_by(|&a, &b| {
                    let da = (count(a).ln() - n.ln()).abs();
                    let db = (count(b).ln() - n.ln()).abs();
                    da.total_cmp(&db)
                })
                .unwrap_or(1);
            (l, l * WIDTH_PER_LAYER)
        }
    };
    let head_dim = match heads {
        Some(a) => {
            if h % a != 0 {
                return Err(bad(
                    "--heads",
                    format!("{a} heads do not divide the hidden size {h}"),
                ));
            }
            h / a
        }
        None if h >= 1024 && h % 128 == 0 => 128,
        None if h % 64 == 0 => 64,
        None => h,
    };
    let a = h / head_dim;
    let kv = kv_heads.unwrap_or(a);
    if kv > a || a % kv != 0 {
        return Err(bad(
            "--kv-heads",
            format!("{kv} must divide the number of attention heads ({a})"),
        ));
    }
    let attn = 2 * h * h + 2 * h * kv * head_dim;
    // Per layer without the MLP: attention and two norms; plus embeddings, head, final norm.
    let fixed = 2 * vocab * h + h + l * (attn + 2 * h);
    let i = match intermediate {
        Some(i) => i,
        None if params.is_some() => {
            let rest = n - fixed as f64;
            if rest <= 0.0 {
                return Err(bad(
                    "--params",
                    format!(
                        "{} is too few for {l} layers of width {h} with a vocabulary of {vocab} (the embeddings, head and attention alone are {fixed}); give a smaller --hidden/--layers/--vocab",
                        params.unwrap_or(0)
                    ),
                ));
            }
            round_to(rest / (3.0 * (l * h) as f64), 64).min(limits::MAX_WIDTH as u64)
        }
        // SwiGLU's 8h/3 (LLaMA), rounded as LLaMA rounds it (to 256).
        None => round_to(8.0 * h as f64 / 3.0, 256),
    };
    let shape_params = fixed + l * 3 * h * i;
    // A width or depth derived from --params is capped at the limits above: past them the shape
    // would hold far fewer parameters than the plan budgets for, so refuse rather than mislead.
    if let Some(p) =
        params.filter(|_| layers.is_none() || hidden.is_none() || intermediate.is_none())
    {
        let off = (shape_params as f64 - p as f64).abs() / p.max(1) as f64;
        if off > 0.1 {
            return Err(bad(
                "--params",
                format!(
                    "{p} parameters do not fit a shape within the limits here: {l} layers of width {h}, MLP width {i} (at most {}), vocabulary {vocab} hold {shape_params}; give --layers/--hidden that can hold it",
                    limits::MAX_WIDTH
                ),
            ));
        }
    }
    let mut what: Vec<String> = Vec::new();
    if params.is_some() {
        what.push("--params".into());
    }
    if f.any() {
        what.push("shape flags".into());
    }
    Ok(ModelShape {
        family: "llama-like".into(),
        source: format!("derived from {}", what.join(" and ")),
        params: params.unwrap_or(shape_params),
        embedding_params: vocab * h,
        head_matmul_params: vocab * h,
        untied_head: true,
        layers: l,
        hidden: h,
        heads: a,
        kv_heads: kv,
        head_dim,
        intermediate: i,
        vocab,
        context: None,
        linears: vec![
            LinearGroup::new("q_proj", h, h, l),
            LinearGroup::new("k_proj", h, kv * head_dim, l),
            LinearGroup::new("v_proj", h, kv * head_dim, l),
            LinearGroup::new("o_proj", h, h, l),
            LinearGroup::new("gate_proj", h, i, l),
            LinearGroup::new("up_proj", h, i, l),
            LinearGroup::new("down_proj", i, h, l),
        ],
        default_targets: &["q_proj", "v_proj"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(name)
    }

    #[test]
    fn config_params_match_the_config_count_and_the_linears() {
        let dir = fixture("tiny-llama-gqa-untied");
        let s = from_model(&dir.display().to_string()).unwrap();
        let cfg = crate::model::config_from_hf_dir(&dir).unwrap();
        assert_eq!(s.params, cfg.num_params());
        assert_eq!(s.family, "llama");
        // Everything that is not a block linear: embeddings, the untied head, the norms.
        let h = cfg.hidden_size as u64;
        let v = cfg.vocab_size as u64;
        let norms = h * (2 * cfg.num_hidden_layers as u64 + 1);
        assert_eq!(s.params - s.linear_params(), 2 * v * h + norms);
        assert!(s.kv_heads < s.heads, "GQA fixture");
        assert_eq!(s.compute_params(), s.params - v * h);
    }

    #[test]
    fn a_7b_count_derives_the_llama_7b_shape() {
        let s = derived(Some(6_738_415_616), &ShapeFlags::default()).unwrap();
        assert_eq!(
            (s.layers, s.hidden, s.heads, s.head_dim),
            (32, 4096, 32, 128)
        );
        // LLaMA 7B's MLP is 11008 wide; the count brings the derived one within a rounding step.
        assert!(
            (s.intermediate as i64 - 11008).abs() <= 64,
            "{}",
            s.intermediate
        );
        assert_eq!(s.params, 6_738_415_616);
        // Counting from the flags gives back LLaMA 7B's parameters exactly.
        let f = ShapeFlags {
            layers: Some(32),
            hidden: Some(4096),
            intermediate: Some(11008),
            ..Default::default()
        };
        assert_eq!(derived(None, &f).unwrap().params, 6_738_415_616);
    }

    #[test]
    fn bad_shape_flags_name_the_flag() {
        let f = |layers, hidden, heads, kv_heads| ShapeFlags {
            layers,
            hidden,
            heads,
            kv_heads,
            ..Default::default()
        };
        let cases = [
            (None, f(Some(2), None, None, None), "--params"),
            (Some(1000), ShapeFlags::default(), "--params"),
            (
                Some(7_000_000_000),
                f(Some(0), None, None, None),
                "--layers",
            ),
            (None, f(Some(2), Some(100), Some(3), None), "--heads"),
            (None, f(Some(2), Some(128), Some(4), Some(3)), "--kv-heads"),
            (None, f(Some(2), Some(usize::MAX), None, None), "--hidden"),
            // 7B in one layer of width 64 would need an MLP far past the width limit
            (
                Some(7_000_000_000),
                f(Some(1), Some(64), None, None),
                "--params",
            ),
        ];
        for (p, flags, want) in cases {
            let e = derived(p, &flags).unwrap_err().to_string();
            assert!(e.starts_with(want), "{p:?} {flags:?}: {e}");
            assert_eq!(e.lines().count(), 1);
        }
    }
}
