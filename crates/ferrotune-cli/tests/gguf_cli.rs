//! `ferrotune quantize --to <ggml type> --out FILE.gguf` and `merge --format gguf`: the file is
//! written, read back by ferrotune, and bad values or foreign files are refused in one line.
use crate::support::{fails, repo, succeeds, tmp};

fn tiny_gguf() -> String {
    repo()
        .join("tests/fixtures/gguf/tiny-llama3-rope-freqs.gguf")
        .display()
        .to_string()
}

#[test]
fn quantize_to_q8_0_writes_a_gguf_that_generates() {
    let dir = tmp("gguf-q8");
    let out = dir.join("tiny-q8_0.gguf");
    let o = succeeds(&[
        "quantize",
        "--model",
        &tiny_gguf(),
        "--to",
        "q8_0",
        "--out",
        out.to_str().unwrap(),
    ]);
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(
        report.contains("q8_0") && report.contains("bits per weight"),
        "{report}"
    );
    assert!(
        report.contains("attn_q.weight") && report.contains("q8_0 x2"),
        "{report}"
    );
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[..4], b"GGUF");
    assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
    let g = succeeds(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "4",
        "--ignore-eos",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&g.stdout).unwrap();
    assert_eq!(v["generated_tokens"], 4, "{v}");
    // Replacing our own file needs --overwrite...
    let e = fails(&[
        "quantize",
        "--model",
        &tiny_gguf(),
        "--to",
        "q8_0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("--overwrite"), "{e}");
    succeeds(&[
        "quantize",
        "--model",
        &tiny_gguf(),
        "--to",
        "f16",
        "--out",
        out.to_str().unwrap(),
        "--overwrite",
    ]);
    // ...and no temporary file is left.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
}

#[test]
fn quantize_refuses_bad_types_and_foreign_files() {
    let model = tiny_gguf();
    let dir = tmp("gguf-bad");
    let out = dir.join("m.gguf");
    let e = fails(&[
        "quantize",
        "--model",
        &model,
        "--to",
        "q3_k",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        e.contains("--to") && e.contains("`q3_k`") && e.contains("q4_k_m"),
        "{e}"
    );
    let e = fails(&[
        "quantize",
        "--model",
        &model,
        "--to",
        "nf4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("--to nf4"), "{e}");
    std::fs::write(&out, b"not ours").unwrap();
    for extra in [&[][..], &["--overwrite"][..]] {
        let mut args = vec![
            "quantize",
            "--model",
            &model,
            "--to",
            "q8_0",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let e = fails(&args);
        assert!(e.contains("m.gguf"), "{e}");
    }
    let e = fails(&[
        "quantize",
        "--model",
        &model,
        "--to",
        "q8_0",
        "--out",
        out.to_str().unwrap(),
        "--overwrite",
    ]);
    assert!(e.contains("not a GGUF ferrotune wrote"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"not ours");
    // The model itself is never an output.
    let e = fails(&[
        "quantize",
        "--model",
        &model,
        "--to",
        "q8_0",
        "--out",
        &model,
        "--overwrite",
    ]);
    assert!(e.contains("--out"), "{e}");
}

#[test]
fn merge_format_flags_are_checked() {
    let dir = tmp("gguf-merge-flags");
    let out = dir.join("m.gguf");
    let e = fails(&[
        "merge",
        "--model",
        &tiny_gguf(),
        "--adapter",
        dir.to_str().unwrap(),
        "--format",
        "onnx",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("--format") && e.contains("`onnx`"), "{e}");
    let e = fails(&[
        "merge",
        "--model",
        &tiny_gguf(),
        "--adapter",
        dir.to_str().unwrap(),
        "--quant",
        "q8_0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("--quant") && e.contains("--format gguf"), "{e}");
    let e = fails(&[
        "merge",
        "--model",
        &tiny_gguf(),
        "--adapter",
        dir.to_str().unwrap(),
        "--format",
        "gguf",
        "--quant",
        "q9",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("--quant") && e.contains("`q9`"), "{e}");
    // flags that would be ignored are refused: a GGUF's type is --quant, not --out-dtype
    let e = fails(&[
        "merge",
        "--model",
        &tiny_gguf(),
        "--adapter",
        dir.to_str().unwrap(),
        "--format",
        "gguf",
        "--out-dtype",
        "bf16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        e.contains("--out-dtype") && e.contains("--format hf"),
        "{e}"
    );
    // an HF folder named like a GGUF file is almost surely a forgotten --format gguf
    let e = fails(&[
        "merge",
        "--model",
        &tiny_gguf(),
        "--adapter",
        dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("--format gguf"), "{e}");
    assert!(!out.exists());
}
