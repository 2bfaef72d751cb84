#!/usr/bin/env python3
"""Reference fixtures for ferrotune's T5 tests (tests/fixtures/t5/), made with transformers.

Usage (from the repository root):

    .venv/bin/python reference/t5_fixtures.py

Determinism: one CPU thread, fixed seeds, float32, eager attention. Floats are written with the
shortest decimal that round-trips the float32 value (reference/make_fixtures.py's encoder).

WHAT IT WRITES (tests/fixtures/t5/)
-----------------------------------
tokenizer/spiece.model
    A tiny SentencePiece unigram model trained here on the prose below, with T5's special ids
    (pad 0, eos 1, unk 2, no bos) and a small custom normalization rule set (full-width Latin
    letters and digits, the "fi" ligature, the ellipsis, the ideographic space), so that the
    precompiled character map is exercised while the file stays a few kB. This folder holds
    only spiece.model: the test loads it the way a T5 folder without tokenizer.json is loaded.
tokenizer/expected.json
    {"extra_ids": 100, "vocab_size": n,
     "cases": [{"text", "ids_spiece", "ids_json", "decoded"}]}
    ids_spiece: transformers' T5Tokenizer.from_pretrained(a folder holding only spiece.model)
    (text).input_ids (</s> appended); ids_json: the same from the tokenizer.json that tokenizer saves (in the model
    folders); decoded: decode(ids_json, skip_special_tokens=True).
t5-v1_0/ and t5-v1_1/
    Tiny random T5ForConditionalGeneration models saved with save_pretrained (safetensors) plus
    the tokenizer above (tokenizer.json, tokenizer_config.json, ...). config.json is rewritten
    in the layout of the released checkpoints (transformers 4 wrote them): `tie_word_embeddings`
    false for v1.1 and no `scale_decoder_outputs` key. All expected values come from the model
    reloaded from the folder, i.e. what a user of the folder gets.
      common: vocab 256, d_model 16, 3 heads of d_kv 8 (inner 24 != d_model), d_ff 32,
              2 encoder and 3 decoder layers, 8 buckets, max distance 20, eps 1e-6,
              pad 0 = decoder start, eos 1.
      t5-v1_0: feed_forward_proj "relu", tied embeddings (no lm_head.weight in the file; the
               decoder output is scaled by d_model^-0.5 before the head).
      t5-v1_1: "gated-gelu" (wi_0, wi_1, wo), untied lm_head, no output scaling.
    transformers 5.24 sizes its decoder cache by num_layers, so a model with more decoder than
    encoder layers runs with use_cache=False there (the same values, recomputed each step).
    Weights: parameters by sorted name, one generator: layer norms ~ U(0.5, 1.5), relative
    attention biases and shared ~ N(0, 1), v1.1's lm_head ~ N(0, 0.5²) (logits of the size of
    v1.0's scaled ones), every other weight ~ N(0, 0.2²) (with 0.3, transformers' own float32
    logits were 7e-5 off its float64 ones); then the EOS row of the head is lengthened
    (EOS_BOOST) so that some generations end with EOS.
    expected.json:
      {"forward": [{"input_ids": [[...]], "attention_mask": [[...]], "decoder_input_ids":
                    [[...]], "encoder_out": [b][s][d_model], "logits": [b][t][vocab]}],
                    (the long case keeps the logits of "logits_columns" only: 64 random vocab
                    ids, every position's argmax, 0, 1 and 255)
       "loss": [{"input_ids", "attention_mask", "labels" (-100 = ignored), "loss"}],
       "generate": [{"prompt": text, "input_ids": [...], "max_new_tokens": n,
                     "greedy": ids, "greedy_text": str,
                     "beams": [{"num_beams", "length_penalty", "early_stopping", "ids", "text"}]}]}
    The first forward case is a padded batch of two, the second a single 30-token input with
    28 decoder positions (distances beyond max_distance). Generated ids are what
    model.generate(...) returns: the decoder start token first, EOS included when reached.
buckets.json
    {"relative_positions": [-300..300], "cases": [{"num_buckets", "max_distance",
     "bidirectional", "buckets": [one per relative position]}]} from
    T5Attention._relative_position_bucket.
"""

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "t5"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import write_json  # noqa: E402  (the float32-exact JSON writer)

CORPUS = """Summaries are short. A dialogue becomes one sentence that keeps what matters.
The encoder reads the whole input at once; the decoder writes the output one token at a time.
Translate English to German: the house is wonderful, the garden is small, the cat sleeps.
Relative positions give each pair of tokens a bucket; near tokens get their own buckets.
Numbers such as 42, 1999 and 3.5 appear in text, and so do questions: who, what, when, why?
Sentinel tokens mark the spans a model must fill in, one sentinel for every missing span.
"""

NORMALIZATION_RULES = (
    [(0xFF21 + i, [0x41 + i]) for i in range(26)]      # Ａ-Ｚ -> A-Z
    + [(0xFF41 + i, [0x61 + i]) for i in range(26)]    # ａ-ｚ -> a-z
    + [(0xFF10 + i, [0x30 + i]) for i in range(10)]    # ０-９ -> 0-9
    + [(0xFB01, [0x66, 0x69]), (0x2026, [0x2E, 0x2E, 0x2E]), (0x3000, [0x20])]
)

TOKENIZER_CASES = [
    "translate English to German: The house is wonderful.",
    "summarize: The encoder reads the whole input at once.",
    "  leading and  double   spaces  ",
    "Hello\nworld\ttabs and\r\nnewlines",
    "Ｆｕｌｌ-width ｔｅｘｔ ０１２ and a ﬁne… ending",
    "unknown: Ωμέγα 日本 😀",
    "sentinels <extra_id_0> fill <extra_id_1> in<extra_id_2>",
    "</s> in the middle and <pad> and <unk> too",
    "numbers 42, 1999 and 3.5?",
    "",
]

COMMON = dict(
    vocab_size=256, d_model=16, d_kv=8, num_heads=3, d_ff=32, num_layers=2,
    num_decoder_layers=3, relative_attention_num_buckets=8, relative_attention_max_distance=20,
    dropout_rate=0.0, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
    decoder_start_token_id=0,
)
VARIANTS = {
    "t5-v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "t5-v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}

PROMPTS = [
    "translate English to German: The house is wonderful.",
    "summarize: Sentinel tokens mark the spans a model must fill in.",
    "who writes the output?",
    "Numbers such as 42 appear in text.",
]
BEAMS = [
    dict(num_beams=3, length_penalty=1.0, early_stopping=False),
    dict(num_beams=4, length_penalty=0.6, early_stopping=False),
    dict(num_beams=2, length_penalty=1.0, early_stopping=True),
    dict(num_beams=3, length_penalty=2.0, early_stopping="never"),
]
MAX_NEW_TOKENS = 12
# Chosen so that some greedy and beam generations of each model end with EOS and some do not.
EOS_BOOST = {"t5-v1_0": 9.0, "t5-v1_1": 2.0}
# Vocabulary columns kept of the long case's logits (plus every position's argmax).
LOGIT_COLUMNS = 64


def train_spiece(out_dir: Path) -> Path:
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / "spiece.model"
    cwd = os.getcwd()
    # Relative names inside a temporary folder: the model records its trainer's input paths,
    # and the fixture must not hold a machine path (nor change from run to run).
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        try:
            with open("corpus.txt", "w") as f:
                f.write(CORPUS * 20)
            with open("rules.tsv", "w") as f:
                for src, dst_chars in NORMALIZATION_RULES:
                    f.write(f"{src:X}\t{' '.join(f'{c:X}' for c in dst_chars)}\n")
            spm.SentencePieceTrainer.train(
                input="corpus.txt",
                model_prefix="spiece",
                model_type="unigram",
                vocab_size=150,
                hard_vocab_limit=False,
                character_coverage=1.0,
                pad_id=0,
                eos_id=1,
                unk_id=2,
                bos_id=-1,
                normalization_rule_tsv="rules.tsv",
                num_threads=1,
                shuffle_input_sentence=False,
                minloglevel=2,
            )
            shutil.copyfile("spiece.model", dst)
        finally:
            os.chdir(cwd)
    print(f"wrote {dst.relative_to(ROOT)} ({dst.stat().st_size} bytes)")
    return dst


def make_tokenizer(spiece: Path):
    from transformers import T5Tokenizer

    # A folder with nothing but spiece.model, loaded the way a user loads one.
    only_spm = Path(tempfile.mkdtemp()) / "spm"
    only_spm.mkdir()
    shutil.copyfile(spiece, only_spm / "spiece.model")
    tok = T5Tokenizer.from_pretrained(str(only_spm))
    assert len(tok) > 200, f"the SentencePiece vocabulary was not read ({len(tok)} ids)"
    saved = Path(tempfile.mkdtemp()) / "tok"
    tok.save_pretrained(str(saved))
    tok_json = T5Tokenizer.from_pretrained(str(saved))
    cases = []
    for text in TOKENIZER_CASES:
        ids_json = tok_json(text).input_ids
        cases.append({
            "text": text,
            "ids_spiece": tok(text).input_ids,
            "ids_json": ids_json,
            "decoded": tok_json.decode(ids_json, skip_special_tokens=True),
        })
    write_json(OUT / "tokenizer" / "expected.json", {
        "extra_ids": 100,
        "vocab_size": len(tok),
        "cases": cases,
    })
    return tok_json, saved


@torch.no_grad()
def init_weights(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("layer_norm.weight"):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif "relative_attention_bias" in name or name in ("shared.weight", "lm_head.weight"):
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def hub_layout_config(path: Path, tied: bool) -> None:
    """config.json as the released checkpoints have it (written by transformers 4)."""
    cfg = json.loads(path.read_text())
    cfg.pop("scale_decoder_outputs", None)
    cfg["tie_word_embeddings"] = tied
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def make_model(name: str, variant: dict, seed: int, tok, tok_dir: Path):
    from safetensors.torch import load_file, save_file
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    tied = variant["tie_word_embeddings"]
    cfg = T5Config(**COMMON, **variant, attn_implementation="eager")
    model = T5ForConditionalGeneration(cfg).float().eval()
    init_weights(model, seed)
    if not tied:
        g = torch.Generator().manual_seed(seed + 1)
        # std 0.5: logits of the size of v1.0's scaled ones (|logit| < ~10), so that the
        # tests' absolute tolerance means the same for both.
        head = torch.randn(model.lm_head.weight.shape, generator=g) * 0.5
        model.lm_head.weight = torch.nn.Parameter(head)
    with torch.no_grad():
        # A longer EOS row makes some generations end before the token budget (EOS paths).
        model.lm_head.weight[1] *= EOS_BOOST[name]
    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out), safe_serialization=True)
    weights = out / "model.safetensors"
    state = load_file(str(weights))
    if not tied and "lm_head.weight" not in state:
        # transformers >= 5 drops a head it considers tied; a v1.1 checkpoint has its own.
        state["lm_head.weight"] = model.lm_head.weight.detach().clone().contiguous()
    if tied:
        state.pop("lm_head.weight", None)
    for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        state.pop(k, None)
    save_file(state, str(weights), metadata={"format": "pt"})
    hub_layout_config(out / "config.json", tied)
    for f in tok_dir.iterdir():
        if f.name != "spiece.model":
            shutil.copyfile(f, out / f.name)

    # Everything below from the folder, as a user gets it.
    m = T5ForConditionalGeneration.from_pretrained(str(out), attn_implementation="eager").float().eval()
    assert (m.lm_head.weight.data_ptr() == m.shared.weight.data_ptr()) == tied, "head tying"
    assert m.config.scale_decoder_outputs == tied, "output scaling"
    for k in ("lm_head.weight",):
        assert (k in load_file(str(weights))) != tied

    def t(x):
        return torch.tensor(x, dtype=torch.long)

    g = torch.Generator().manual_seed(seed + 2)

    def rand_ids(n):
        return (torch.randint(3, 250, (n,), generator=g).tolist())

    forward = []
    # A padded batch of two.
    a = rand_ids(6) + [1]
    b = rand_ids(3) + [1] + [0, 0, 0]
    mask = [[1] * 7, [1] * 4 + [0] * 3]
    dec = [[0] + rand_ids(4), [0] + rand_ids(4)]
    # One long input: distances beyond relative_attention_max_distance.
    long_in = rand_ids(29) + [1]
    long_dec = [0] + rand_ids(27)
    with torch.no_grad():
        for ids, am, d in [([a, b], mask, dec), ([long_in], [[1] * 30], [long_dec])]:
            enc = m.encoder(input_ids=t(ids), attention_mask=t(am)).last_hidden_state
            logits = m(input_ids=t(ids), attention_mask=t(am), decoder_input_ids=t(d),
                       use_cache=False).logits.float()
            case = {"input_ids": ids, "attention_mask": am, "decoder_input_ids": d,
                    "encoder_out": enc.float()}
            if len(ids) == 1:
                cols = set(torch.randperm(256, generator=g)[:LOGIT_COLUMNS].tolist())
                cols |= set(logits.argmax(-1).flatten().tolist()) | {0, 1, 255}
                cols = sorted(cols)
                case["logits_columns"] = cols
                logits = logits[:, :, cols]
            case["logits"] = logits
            forward.append(case)
        loss_cases = []
        labels = [rand_ids(3) + [1, -100], rand_ids(2) + [1, -100, -100]]
        loss = m(input_ids=t([a, b]), attention_mask=t(mask), labels=t(labels),
                 use_cache=False).loss
        loss_cases.append({"input_ids": [a, b], "attention_mask": mask, "labels": labels,
                           "loss": float(loss)})
        labels = [rand_ids(20) + [1]]
        loss = m(input_ids=t([long_in]), attention_mask=t([[1] * 30]), labels=t(labels),
                 use_cache=False).loss
        loss_cases.append({"input_ids": [long_in], "attention_mask": [[1] * 30],
                           "labels": labels, "loss": float(loss)})

        gen = []
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            greedy = m.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                                use_cache=False)[0]
            case = {"prompt": prompt, "input_ids": ids[0].tolist(),
                    "max_new_tokens": MAX_NEW_TOKENS, "greedy": greedy.tolist(),
                    "greedy_text": tok.decode(greedy, skip_special_tokens=True), "beams": []}
            for beam in BEAMS:
                out_ids = m.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                     use_cache=False, **beam)[0]
                case["beams"].append({**beam, "ids": out_ids.tolist(),
                                      "text": tok.decode(out_ids, skip_special_tokens=True)})
            gen.append(case)
    ends = sum(c["greedy"][-1] == 1 for c in gen) + sum(b["ids"][-1] == 1 for c in gen for b in c["beams"])
    print(f"{name}: {ends} of {len(gen) * (1 + len(BEAMS))} generations end with EOS")
    write_json(out / "expected.json", {"forward": forward, "loss": loss_cases, "generate": gen})


def make_buckets():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = list(range(-300, 301))
    cases = []
    for nb, md in [(32, 128), (8, 20), (16, 32), (6, 7)]:
        for bidir in (True, False):
            buckets = T5Attention._relative_position_bucket(
                torch.tensor(rel), bidirectional=bidir, num_buckets=nb, max_distance=md)
            cases.append({"num_buckets": nb, "max_distance": md, "bidirectional": bidir,
                          "buckets": buckets.tolist()})
    write_json(OUT / "buckets.json", {"relative_positions": rel, "cases": cases})


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spiece = train_spiece(OUT / "tokenizer")
    tok, tok_dir = make_tokenizer(spiece)
    for i, (name, variant) in enumerate(VARIANTS.items()):
        make_model(name, variant, 1000 + i, tok, tok_dir)
    make_buckets()


if __name__ == "__main__":
    main()
