#!/usr/bin/env python3
"""Reference fixtures for ferrotune's BERT family, produced with PyTorch + transformers and
sentence-transformers.

Usage (from the repository root):

    .venv/bin/python reference/bert_fixtures.py tiny     # tests/fixtures/bert/tiny-bert/, tiny-roberta/
    .venv/bin/python reference/bert_fixtures.py minilm   # tests/fixtures/bert/minilm.json
    .venv/bin/python reference/bert_fixtures.py all

Determinism: one CPU thread, fixed seeds, float32, eager attention. Floats are written with the
shortest decimal that round-trips the float32 value (make_fixtures.write_json).

TINY MODELS (tests/fixtures/bert/tiny-bert/, tests/fixtures/bert/tiny-roberta/)
-----------------------------------------------------------------------------
One HF folder per flavor whose model.safetensors holds the union of what `save_pretrained` writes
for three classes sharing one encoder: `*ForMaskedLM`, `*ForSequenceClassification` and
`*ForTokenClassification` (3 labels; BERT's sequence and token classifiers share the `classifier`
weights, RoBERTa's sequence head is `classifier.dense` + `classifier.out_proj`). config.json is
the masked-LM model's (architectures ["BertForMaskedLM"], id2label of 3 labels). Each class is
reloaded from the folder with `from_pretrained` and must reproduce the in-memory model exactly.
The tokenizer is small and made here: WordPiece with BERT's normalizer / pre-tokenizer /
template (tiny-bert), byte-level BPE trained on a few sentences with RoBERTa's post-processor
(tiny-roberta). Weights: N(0, 0.2^2), biases N(0, 0.1^2), LayerNorm gains U(0.5, 1.5) and biases
N(0, 0.1^2), so a loader that skips any of them fails.

expected.json:
  {"cases": [{"name", "texts": [...], "pairs": [...] or null,
              "input_ids", "token_type_ids", "attention_mask": [[...] per row, padded right],
              "last_hidden_state": [b][t][hidden],
              "pooler_output": [b][hidden]            (BERT only),
              "seq_labels": [b], "seq_logits": [b][3], "seq_loss": mean CE,
              "token_labels": [b][t] (-100 on special tokens and padding),
              "token_logits": [b][t][3], "token_loss": mean CE over labelled tokens,
              "mlm_labels": [b][t] (-100 except a few positions), "mlm_logits": [b][t][vocab]
              (tiny-roberta: [b][t][48], the columns of "mlm_vocab_sample", which holds every
              label and every position's argmax), "mlm_loss": mean CE over labelled tokens}],
   "truncation": [{"text", "pair", "max_length", "input_ids", "token_type_ids"}]}
Every row is computed in one padded batch with transformers' attention mask.

ALL-MINILM-L6-V2 (tests/fixtures/bert/minilm.json)
--------------------------------------------------
The real model from the cache ($FERROTUNE_CACHE/models/all-minilm-l6-v2, scripts/fetch-models.sh)
through sentence-transformers: {"sentences": [...], "input_ids": [[...]] (its tokenizer, after its
truncation to max_seq_length 256), "embeddings": [[384]] (SentenceTransformer(folder).encode with
the folder's modules: mean pooling + Normalize), "cls_embeddings" and "mean_embeddings" (the
first 6 sentences, through Transformer + Pooling("cls") / Pooling("mean") without Normalize)}.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import ROOT, write_json  # noqa: E402

OUT = ROOT / "tests/fixtures/bert"

# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

WORDS = """the a cat dog sat ran on mat home quick quickly lazy jumped over and is was not good bad
very movie film story it this that of to in with for fun great awful plot actors , . ! ? '""".split()


def wordpiece_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = {}
    for t in specials + chars + ["##" + c for c in chars] + WORDS:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
        cls_token="[CLS]", mask_token="[MASK]", model_max_length=512)
    fast.save_pretrained(out_dir)
    return len(vocab)


ROBERTA_CORPUS = [
    "the cat sat on the mat and the dog ran home",
    "a very good movie with a great story and fun actors",
    "this film was awful, the plot is not good at all",
    "quick brown foxes jumped over the lazy dogs!",
    "is it good? it is very, very good.",
] * 4


def bpe_tokenizer(out_dir: Path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(ROBERTA_CORPUS, trainer)
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")),
        trim_offsets=True, add_prefix_space=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        sep_token="</s>", cls_token="<s>", pad_token="<pad>",
        mask_token=AddedToken("<mask>", lstrip=True, rstrip=False, special=True),
        model_max_length=512)
    fast.save_pretrained(out_dir)
    return tok.get_vocab_size()


# ---------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------

LABELS = {0: "negative", 1: "neutral", 2: "positive"}


@torch.no_grad()
def init_weights(model, seed: int) -> None:
    # Parameters by sorted name from one generator (independent of construction order); tied
    # weights appear once in named_parameters().
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        norm = "LayerNorm" in name or "layer_norm" in name
        if norm and name.endswith("weight"):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def build_models(flavor: str, vocab: int, seed: int):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, hidden_act="gelu", layer_norm_eps=1e-12,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
                  attn_implementation="eager")
    if flavor == "bert":
        cfg = tf.BertConfig(max_position_embeddings=40, type_vocab_size=2, pad_token_id=0, **common)
        classes = (tf.BertForMaskedLM, tf.BertForSequenceClassification, tf.BertForTokenClassification)
        enc = "bert"
    else:
        cfg = tf.RobertaConfig(max_position_embeddings=42, type_vocab_size=1, pad_token_id=1,
                               bos_token_id=0, eos_token_id=2, **common)
        classes = (tf.RobertaForMaskedLM, tf.RobertaForSequenceClassification,
                   tf.RobertaForTokenClassification)
        enc = "roberta"
    torch.manual_seed(seed)
    mlm, seq, tok = (c(cfg).float().eval() for c in classes)
    for i, m in enumerate((mlm, seq, tok)):
        init_weights(m, seed + i)
    # One encoder for all three (the sequence model's pooler, if any, stays its own).
    getattr(seq, enc).load_state_dict(getattr(mlm, enc).state_dict(), strict=False)
    getattr(tok, enc).load_state_dict(getattr(mlm, enc).state_dict(), strict=False)
    if flavor == "bert":
        tok.classifier.load_state_dict(seq.classifier.state_dict())
    return mlm, seq, tok


def union_folder(models, out_dir: Path) -> None:
    """save_pretrained each model; the folder gets the first one's config and every tensor."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, m in enumerate(models):
            d = Path(tmp) / str(i)
            m.save_pretrained(d, safe_serialization=True)
            for k, v in load_file(d / "model.safetensors").items():
                if k in tensors and not torch.equal(tensors[k], v):
                    raise SystemExit(f"{out_dir.name}: `{k}` differs between the classes")
                tensors[k] = v
            if i == 0:
                shutil.copy(d / "config.json", out_dir / "config.json")
    save_file(dict(sorted(tensors.items())), out_dir / "model.safetensors", metadata={"format": "pt"})


def check_reload(models, out_dir: Path, batch) -> None:
    for m in models:
        again = type(m).from_pretrained(out_dir, dtype=torch.float32,
                                        attn_implementation="eager").eval()
        with torch.no_grad():
            a, b = m(**batch).logits, again(**batch).logits
        if not torch.equal(a, b):
            raise SystemExit(f"{out_dir.name}: {type(m).__name__} reloaded differs by "
                             f"{(a - b).abs().max().item()}")


def token_labels(ids, mask, special, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, ids.shape, generator=g)
    ignore = (mask == 0) | torch.isin(ids, torch.tensor(special))
    return labels.masked_fill(ignore, -100)


def mlm_labels(ids, mask, special, vocab: int, seed: int):
    # Every third real token carries a label (a random id, so the loss is not trivially small).
    g = torch.Generator().manual_seed(seed)
    labels = torch.full_like(ids, -100)
    real = (mask == 1) & ~torch.isin(ids, torch.tensor(special))
    pos = real.nonzero()
    for k, (r, c) in enumerate(pos.tolist()):
        if k % 3 == 0:
            labels[r, c] = torch.randint(0, vocab, (1,), generator=g).item()
    return labels


@torch.no_grad()
def make_case(name, flavor, tokenizer, models, texts, pairs, seed):
    mlm, seq, tok = models
    # The tokenizer class made here does not list token_type_ids among its model inputs: ask
    # for them (BERT's template gives the second text type 1; RoBERTa's gives 0 throughout).
    enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=40,
                    return_token_type_ids=True, return_tensors="pt")
    batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    special = tokenizer.all_special_ids
    b = ids.shape[0]
    seq_labels = torch.tensor([(seed + i) % 3 for i in range(b)])
    tok_labels = token_labels(ids, mask, special, 3, seed)
    lm_labels = mlm_labels(ids, mask, special, mlm.config.vocab_size, seed + 1)
    encoder = getattr(seq, "bert" if flavor == "bert" else "roberta")
    base = encoder(**batch)
    seq_out = seq(**batch, labels=seq_labels)
    tok_out = tok(**batch, labels=tok_labels)
    mlm_out = mlm(**batch, labels=lm_labels)
    case = {
        "name": name, "texts": texts, "pairs": pairs,
        "input_ids": ids.tolist(), "token_type_ids": batch["token_type_ids"].tolist(),
        "attention_mask": mask.tolist(),
        "last_hidden_state": base.last_hidden_state.float().numpy(),
    }
    if flavor == "bert":
        case["pooler_output"] = base.pooler_output.float().numpy()
    case.update({
        "seq_labels": seq_labels.tolist(), "seq_logits": seq_out.logits.numpy(),
        "seq_loss": seq_out.loss.item(),
        "token_labels": tok_labels.tolist(), "token_logits": tok_out.logits.numpy(),
        "token_loss": tok_out.loss.item(),
        "mlm_labels": lm_labels.tolist(), "mlm_loss": mlm_out.loss.item(),
    })
    logits = mlm_out.logits
    if flavor == "roberta":
        # The full (b, t, vocab) logits of the larger byte-level vocabulary would make the
        # fixture several hundred KB: keep 48 sampled columns (with every label and every
        # position's argmax), as logits.json does for SmolLM2.
        g = torch.Generator().manual_seed(seed + 2)
        must = set(lm_labels[lm_labels >= 0].tolist()) | set(logits.argmax(-1).flatten().tolist())
        rest = [i for i in torch.randperm(logits.shape[-1], generator=g).tolist() if i not in must]
        sample = sorted(must | set(rest[:max(0, 48 - len(must))]))
        case["mlm_vocab_sample"] = sample
        logits = logits[..., sample]
    case["mlm_logits"] = logits.numpy()
    return case, batch


def make_tiny() -> None:
    from transformers import AutoTokenizer

    for flavor, seed in (("bert", 11), ("roberta", 23)):
        out_dir = OUT / f"tiny-{flavor}"
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        make_tok = wordpiece_tokenizer if flavor == "bert" else bpe_tokenizer
        vocab = make_tok(out_dir)
        models = build_models(flavor, vocab, seed)
        union_folder(models, out_dir)
        tokenizer = AutoTokenizer.from_pretrained(out_dir)
        mask = tokenizer.mask_token
        singles = [
            "The cat sat on the mat.",
            f"a {mask} ran home",
            "Zebras jumped over lazy dogs!",
        ]
        pairs = (["the movie was good", "a lazy dog"],
                 ["very good, a great story and fun actors", f"it {mask} not awful"])
        cases = []
        batch = None
        for i, (name, texts, second) in enumerate(
                [("single", singles, None), ("pair", pairs[0], pairs[1])]):
            case, batch = make_case(name, flavor, tokenizer, models, texts, second, seed + 10 * i)
            cases.append(case)
        check_reload(models, out_dir, batch)
        trunc = []
        for text, pair, n in (("the cat sat on the mat and the dog ran home", None, 8),
                              ("the cat sat on the mat", "a dog ran", 9),
                              ("a dog", "the cat sat on the very lazy mat", 10)):
            e = tokenizer(text, pair, truncation=True, max_length=n, return_token_type_ids=True)
            trunc.append({"text": text, "pair": pair, "max_length": n,
                          "input_ids": e["input_ids"], "token_type_ids": e["token_type_ids"]})
        write_json(out_dir / "expected.json", {"cases": cases, "truncation": trunc})
        size = sum(f.stat().st_size for f in out_dir.iterdir())
        print(f"  tiny-{flavor}: vocab {vocab}, {size} bytes")


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 through sentence-transformers
# ---------------------------------------------------------------------------------------------

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "",
    "Hi",
    "UPPER CASE and MiXeD cAsE words",
    "Numbers like 3.14159, 2,718 and 1e-9 appear here.",
    "Café, naïve, résumé, Zürich, São Paulo — accents and dashes.",
    "中文句子也应该被处理。",
    "Emoji 🙂 and symbols ©®™ and <html> tags & ampersands",
    "   leading and trailing spaces   ",
    "tab\tseparated\tand\nnew\nlines",
    "Don't stop believin' — it's what they'd've said.",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "The quick brown fox jumps over the lazy dog. " * 40,
    "Sentence embeddings map text to vectors; similar meanings end up close together.",
    "What is the capital of France? Paris is the capital of France.",
]


def minilm_dir() -> Path:
    cache = Path(os.environ.get("FERROTUNE_CACHE", ROOT / ".cache"))
    d = cache / "models/all-minilm-l6-v2"
    if not (d / "config.json").is_file():
        raise SystemExit(f"{d} is missing: run ./scripts/fetch-models.sh")
    return d


@torch.no_grad()
def make_minilm() -> None:
    from sentence_transformers import SentenceTransformer, models

    d = str(minilm_dir())
    st = SentenceTransformer(d, device="cpu")
    emb = st.encode(SENTENCES, batch_size=8, convert_to_tensor=True).float()
    ids = [st.tokenize([s])["input_ids"][0].tolist() for s in SENTENCES]
    out = {"sentences": SENTENCES, "max_seq_length": st.max_seq_length, "input_ids": ids,
           "embeddings": emb.numpy()}
    for mode in ("cls", "mean"):
        transformer = models.Transformer(d, max_seq_length=st.max_seq_length)
        pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode=mode)
        plain = SentenceTransformer(modules=[transformer, pooling], device="cpu")
        out[f"{mode}_embeddings"] = plain.encode(SENTENCES[:6], batch_size=4,
                                                 convert_to_tensor=True).float().numpy()
    write_json(OUT / "minilm.json", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["tiny", "minilm", "all"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.what in ("tiny", "all"):
        make_tiny()
    if args.what in ("minilm", "all"):
        make_minilm()


if __name__ == "__main__":
    main()
