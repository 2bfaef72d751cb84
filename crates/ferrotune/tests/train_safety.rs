//! Training robustness in the library: the dropout stream seeks in O(1) on resume (and to the
//! same masks as drawing them one by one), the memory estimate saturates instead of wrapping
//! around, and every out-of-range config value is a one-line error naming the file, the line
//! and the key.
use crate::common;

use candle_core::{DType, Device, Tensor};
use ferrotune::data::{BatchConfig, Prepared};
use ferrotune::train::memory::{self, TrainShape};
use ferrotune::train::{self, LoadedConfig, Tuner};
use std::path::Path;
use std::time::Duration;

const MODEL: &str = "tiny-llama-gqa-untied";

fn config(train_extra: &str, lora_extra: &str) -> String {
    format!(
        r#"model = "m"
output_dir = "out"
[data]
train = "train.jsonl"
template = "{{q}} ="
completion = " {{a}}"
[lora]
r = 4
targets = "all-linear"
{lora_extra}
[train]
{train_extra}
"#
    )
}

fn parse(text: &str) -> ferrotune::Result<LoadedConfig> {
    train::parse_config(text, Path::new("cfg/run.toml"), Path::new("cfg"), &[])
}

/// The tiny model with LoRA (dropout 0.25) on every linear and non-zero B matrices, so that
/// the dropout mask shows in the output.
fn model_with_lora() -> (ferrotune::model::Llama, Tuner) {
    let c = parse(&config("", "dropout = 0.25")).unwrap();
    let mut llama = common::tiny(MODEL);
    let tuner = Tuner::attach(&c.config, &mut llama, "m").unwrap();
    for (name, var) in tuner.trainable(&llama) {
        if name.contains("lora_B") {
            var.set(&Tensor::ones(var.shape(), DType::F32, &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    (llama, tuner)
}

/// The next training-mode output of every adapted linear on a fixed input (draws one mask each).
fn next_outputs(llama: &ferrotune::model::Llama) -> Vec<Vec<f32>> {
    let mut outs = Vec::new();
    for lin in llama.linears() {
        for (_, a) in lin.adapters() {
            let x = Tensor::ones((3, lin.in_features()), DType::F32, &Device::Cpu).unwrap();
            let base = Tensor::zeros((3, lin.out_features()), DType::F32, &Device::Cpu).unwrap();
            let y = a.forward(&x, base, true).unwrap();
            outs.push(y.flatten_all().unwrap().to_vec1().unwrap());
        }
    }
    outs
}

#[test]
fn replaying_the_dropout_stream_is_a_seek_to_the_same_masks() {
    // Drawn one by one...
    let (drawn, _) = model_with_lora();
    let calls = 5;
    let mut history = Vec::new();
    for _ in 0..calls {
        history.push(next_outputs(&drawn));
    }
    assert_ne!(history[0], history[1], "dropout draws a new mask per call");
    let want = next_outputs(&drawn);
    // ...or sought to: the same next mask.
    let (sought, tuner) = model_with_lora();
    tuner.replay_rng(&sought, calls).unwrap();
    assert_eq!(next_outputs(&sought), want);

    // A counter of 2^40 (or a corrupt one of 2^62) costs nothing: it once meant replaying as
    // many forward passes.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (llama, tuner) = model_with_lora();
        tuner.replay_rng(&llama, 1 << 40).unwrap();
        let states: Vec<Option<u64>> = llama
            .linears()
            .iter()
            .flat_map(|l| l.adapter_rng_states())
            .collect();
        tx.send(states).unwrap();
    });
    let states = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("replay_rng(2^40) did not return within a minute: it replays mask by mask");
    assert!(!states.is_empty());
    assert!(states.iter().all(|s| *s == Some(1 << 40)), "{states:?}");
}

#[test]
fn the_memory_estimate_saturates_instead_of_wrapping_around() {
    let (llama, _) = model_with_lora();
    for checkpointing in [false, true] {
        // 2^63 tokens: every product with an even factor used to wrap to 0, leaving only the
        // weights and the runtime, which any machine has.
        let shape = TrainShape {
            max_batch_tokens: 1 << 63,
            max_loss_tokens: 1 << 63,
            trainable_params: 1 << 62,
            checkpointing,
            dropout: true,
            q8_backward: true,
            data_tokens: 1 << 62,
            optimizer_state_bytes: None,
            params_in_weights: false,
            largest_param: 1 << 40,
            optimizer_temporaries: 3,
        };
        let est = memory::estimate(&llama, &shape);
        assert_eq!(est.activations, u64::MAX, "{est:?}");
        assert_eq!(est.head, u64::MAX, "{est:?}");
        assert_eq!(est.total(), u64::MAX, "{est:?}");
        assert!(est.table().contains("activations"));
    }
    // The shape of a run with an absurd batch size saturates too.
    let examples = common::examples(&[5, 9, 7], 200, 1);
    let prepared = Prepared {
        train: examples.clone(),
        validation: Vec::new(),
        test: Vec::new(),
        stats: Vec::new(),
        max_seq_len: 16,
        ..Default::default()
    };
    let c = parse(&config("", "dropout = 0.25")).unwrap();
    for packing in [false, true] {
        let bc = BatchConfig {
            packing,
            ..BatchConfig::new(usize::MAX / 2, 16, 0)
        };
        let shape = TrainShape::for_run(&prepared, &bc, &[], &c.config, &c.config.train);
        assert_eq!(shape.max_batch_tokens, usize::MAX, "packing {packing}");
        assert!(memory::estimate(&llama, &shape).total() > 1 << 60);
    }
}

#[test]
fn out_of_range_train_values_name_the_file_line_and_key() {
    let cases: &[(&str, &str)] = &[
        ("batch_size = 0", "train.batch_size"),
        ("batch_size = 9223372036854775807", "train.batch_size"),
        ("grad_accum = 0", "train.grad_accum"),
        ("grad_accum = 1073741824", "train.grad_accum"),
        ("lr = nan", "train.lr"),
        ("lr = 0.0", "train.lr"),
        ("lr = -1e-4", "train.lr"),
        ("lr = inf", "train.lr"),
        ("epochs = nan", "train.epochs"),
        ("epochs = 0.0", "train.epochs"),
        ("epochs = -1.0", "train.epochs"),
        ("epochs = 1e300", "train.epochs"),
        ("max_steps = 0", "train.max_steps"),
        ("max_seq_len = 0", "train.max_seq_len"),
        ("max_seq_len = 4611686018427387904", "train.max_seq_len"),
        ("weight_decay = nan", "train.weight_decay"),
        ("weight_decay = -0.1", "train.weight_decay"),
        ("betas = [1.0, 0.999]", "train.betas"),
        ("betas = [0.9, -0.1]", "train.betas"),
        ("betas = [nan, 0.999]", "train.betas"),
        ("eps = 0.0", "train.eps"),
        ("eps = -1e-8", "train.eps"),
        ("eps = nan", "train.eps"),
        ("eval_every = 0", "train.eval_every"),
        ("save_every = 0", "train.save_every"),
        ("min_lr_ratio = 1.5", "train.min_lr_ratio"),
        ("min_lr_ratio = -0.1", "train.min_lr_ratio"),
        ("min_lr_ratio = nan", "train.min_lr_ratio"),
        ("max_grad_norm = nan", "train.max_grad_norm"),
        ("threads = 0", "train.threads"),
        ("threads = 1000000", "train.threads"),
        ("log_every = 0", "train.log_every"),
        ("activation_bits = 12", "train.activation_bits"),
        ("dtype = \"f8\"", "train.dtype"),
        // Not a number of steps at all: the TOML type check names it.
        ("warmup_steps = nan", "train.warmup_steps"),
        ("warmup_steps = -5", "train.warmup_steps"),
    ];
    for (line_text, key) in cases {
        let text = config(line_text, "");
        let line = text.lines().position(|l| l == *line_text).unwrap() + 1;
        let e = parse(&text).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{line_text}: {e}");
        assert!(
            e.starts_with(&format!("cfg/run.toml: line {line}"))
                && e.contains(&format!("key `{key}`")),
            "{line_text}: want file, line {line} and `{key}`: {e}"
        );
    }
    // Through --set: the override is blamed.
    let e = train::parse_config(
        &config("", ""),
        Path::new("cfg/run.toml"),
        Path::new("cfg"),
        &["train.lr=nan".to_string()],
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("--set `train.lr=nan`: key `train.lr`"), "{e}");
    // LoRA keys too.
    for (line_text, key) in [
        ("r = 1099511627776", "lora.r"),
        ("dropout = 1.0", "lora.dropout"),
        ("alpha = nan", "lora.alpha"),
    ] {
        let text = config("", line_text).replace("r = 4\n", "");
        let line = text.lines().position(|l| l == line_text).unwrap() + 1;
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cfg/run.toml: line {line}: key `{key}`")),
            "{line_text}: {e}"
        );
    }
    // Odd but valid: a warmup longer than the run, any seed.
    for ok in [
        "warmup_steps = 1000\nmax_steps = 10",
        "seed = 0",
        "seed = 9223372036854775807",
    ] {
        parse(&config(ok, "")).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[test]
fn an_empty_or_root_output_dir_is_refused_at_load() {
    for (value, what) in [("\"\"", "is empty"), ("\"/\"", "root of the file system")] {
        let text = config("", "").replace("output_dir = \"out\"", &format!("output_dir = {value}"));
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.starts_with("cfg/run.toml: line 2: key `output_dir`") && e.contains(what),
            "{value}: {e}"
        );
    }
    let e = train::parse_config(
        &config("", ""),
        Path::new("cfg/run.toml"),
        Path::new("cfg"),
        &["output_dir=".to_string()],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("--set `output_dir=`") && e.contains("is empty"),
        "{e}"
    );
}
