"""Golden tokenizer fixtures from transformers (the reference the Rust tokenizer must match).

Run from the repository root (needs scripts/fetch-models.sh to have fetched the SmolLM2 GGUF):

    /work/cache/venv/bin/python reference/tokenizer_fixtures.py

Writes
  tests/fixtures/tokenizer/smollm2.json   ids of stress strings, decodes, rendered chat templates,
                                          for SmolLM2-135M-Instruct's GGUF tokenizer loaded by
                                          `AutoTokenizer.from_pretrained(dir, gguf_file=...)`
  tests/fixtures/tokenizer/tiny-spm.gguf  a small sentencepiece-BPE vocabulary (byte fallback,
                                          scores, no merges) trained here, in a `tokenizer.ggml.model
                                          = llama` GGUF, like Llama 2 / TinyLlama / Mistral files
  tests/fixtures/tokenizer/tiny-spm.json  ids sentencepiece gives for it, applied to each stretch of
                                          text between special tokens as llama.cpp does (and, for
                                          information, transformers' GGUF-loader ids, which differ)
  .cache/models/smollm2-hf-tokenizer/     `tok.save_pretrained` of the SmolLM2 tokenizer (an HF
                                          tokenizer folder; git-ignored, for the from_hf_dir test)
"""

import io
import json
import os
import re
import sys
import tempfile
import time

import gguf
import numpy as np
import sentencepiece as spm
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
SMOL_DIR = os.path.join(ROOT, ".cache", "models", "smollm2")
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_DIR = os.path.join(ROOT, ".cache", "models", "smollm2-hf-tokenizer")

STRESS = [
    "1234567",
    "Hello world",
    " leading space",
    "tabs\tand\t\tmore\ttabs",
    "runs   of    spaces     and\n\n\nnewlines\n",
    "   ",
    "\n",
    "Unicode: café naïve Straße 日本語 Ελληνικά русский",
    "Emoji: 😀👍🏽 🚀✨ 👨\u200d👩\u200d👧",
    "def f(x):\n    return x**2  # square\n\tpass",
    "I'm sure they're here, we've seen he'll come; she'd know. DON'T",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "mixed<|im_end|>special<|endoftext|>tokens",
    "Price: $1,234.56 (approx. 3.14159%) in 2024-11-24",
    "  \t \n x",
    "CamelCaseIdentifier snake_case_var kebab-case https://example.com/a?b=1&c=2",
]

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."}] + CONVERSATION

# Exercises what our minijinja setup must share with transformers' jinja2 one: trim_blocks /
# lstrip_blocks, loop controls, Python string methods, undefined-key truth tests, tojson, filters.
STRESS_TEMPLATE = """{%- for m in messages %}
  {%- if loop.index0 == 3 %}{% break %}{% endif %}
  {%- if m.tool_calls %}TOOL{% endif %}
<{{ m.role | upper }}>{{ m.content.strip() }}{% if m.content.startswith(' ') %}(lead){% endif %}
  {% for w in m.content.split() %}
    {% if w == 'skip' %}{% continue %}{% endif %}
[{{ w | lower }}]
  {% endfor %}
{% endfor %}
{{ info | tojson }}
{{ info | tojson(indent=2) }}
{% if tools is none %}no tools{% endif %}
{%- if add_generation_prompt %}GEN{{ bos_token }}|{{ eos_token }}{% endif %}"""
STRESS_MESSAGES = [
    {"role": "user", "content": "  Hello skip World  "},
    {"role": "assistant", "content": "Two words"},
    {"role": "user", "content": "third"},
    {"role": "assistant", "content": "never shown"},
]
# Keys already sorted: serde_json (without preserve_order) sorts object keys, Python keeps them.
STRESS_INFO = {"a": "é\"\n<tag>&", "b": [1, 2.5, None, True, -0.001], "c": {}, "d": [], "e": 1e-07}

# Instants for strftime_now: (format, unix seconds).
STRFTIME = [
    ("%d %b %Y", 1709211909),
    ("%Y-%m-%d %H:%M:%S %j %a %A %B %y %I %p %e %%", 1709211909),
    ("%d %B %Y %H:%M", 0),
    ("%d %b %Y %I%p %j", 4102444799),
]


def smollm2():
    if not os.path.exists(os.path.join(SMOL_DIR, SMOL_GGUF)):
        sys.exit(f"{SMOL_DIR}/{SMOL_GGUF} is missing: run scripts/fetch-models.sh first")
    tok = AutoTokenizer.from_pretrained(SMOL_DIR, gguf_file=SMOL_GGUF)
    cases = []
    for s in STRESS:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        cases.append(
            {
                "text": s,
                "ids": ids,
                "ids_with_special": tok(s)["input_ids"],
                "tokens": tok.convert_ids_to_tokens(ids),
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
        )
        assert cases[-1]["decoded"] == s, (s, cases[-1]["decoded"])

    def render(messages, gen, template=None, **kw):
        return tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen, chat_template=template, **kw
        )

    chat = [
        {"name": name, "messages": msgs, "add_generation_prompt": gen, "rendered": render(msgs, gen)}
        for name, msgs in [("two_turns", CONVERSATION), ("with_system", WITH_SYSTEM)]
        for gen in (False, True)
    ]
    stress_chat = [
        {
            "add_generation_prompt": gen,
            "rendered": render(STRESS_MESSAGES, gen, STRESS_TEMPLATE, info=STRESS_INFO),
        }
        for gen in (False, True)
    ]
    fixture = {
        "source": f"transformers AutoTokenizer.from_pretrained(.cache/models/smollm2, gguf_file={SMOL_GGUF})",
        "vocab_size": len(tok),
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "eos_token_id": tok.eos_token_id,
        "chat_template": tok.chat_template,
        "cases": cases,
        "chat": chat,
        "stress_template": {
            "template": STRESS_TEMPLATE,
            "messages": STRESS_MESSAGES,
            "extra": {"info": STRESS_INFO},
            "renders": stress_chat,
        },
        "strftime": [
            {"format": f, "unix": t, "text": time.strftime(f, time.gmtime(t))} for f, t in STRFTIME
        ],
    }
    write_json("smollm2.json", fixture)

    os.makedirs(HF_DIR, exist_ok=True)
    tok.save_pretrained(HF_DIR)
    print(f"saved HF tokenizer folder to {HF_DIR}: {sorted(os.listdir(HF_DIR))}")


SPM_CORPUS = """The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
Tokenizers split text into pieces; sentencepiece treats the input as a raw stream of characters.
Numbers like 12345 and 3.14159 appear, as do symbols: #, @, %, &, *, (, ), [, ], {, }.
Common words: the, of, and, to, in, is, you, that, it, he, was, for, on, are, as, with, his, they.
Training a tiny model is enough for a test: the merges and scores are what matter here.
"""

SPM_STRESS = [
    "The quick brown fox",
    "  two leading spaces",
    "Hello\nworld\n\nagain",
    "unseen: Ωμέγα 日本 😀",
    "numbers 12345 3.14159",
    "<s>bos in text</s> and <unk>",
    "tabs\tare\tbytes",
    "",
]


def tiny_spm():
    """Train a small byte-fallback BPE sentencepiece model and write it as a llama-type GGUF."""
    with tempfile.TemporaryDirectory() as d:
        corpus = os.path.join(d, "corpus.txt")
        with open(corpus, "w") as f:
            f.write(SPM_CORPUS * 20)
        prefix = os.path.join(d, "m")
        spm.SentencePieceTrainer.train(
            input=corpus,
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=420,
            byte_fallback=True,
            character_coverage=1.0,
            bos_id=1,
            eos_id=2,
            unk_id=0,
            pad_id=-1,
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            split_digits=True,
            normalization_rule_name="identity",  # as Llama's model: no NFKC, newlines stay
            minloglevel=2,
        )
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")

    # Same token types and layout as llama.cpp's convert script writes for sentencepiece vocabularies.
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.NORMAL)

    path = os.path.join(OUT, "tiny-spm.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    # A tensor so that the file is a complete model file for loaders that expect one.
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # The reference is sentencepiece itself, applied to each stretch of text between special tokens
    # (as llama.cpp does, and these models' own tokenizer.json with its Prepend normalizer).
    # transformers' GGUF loader is recorded too but differs on purpose: its Metaspace(first) adds no
    # "▁" to text that starts with a space or follows a special token.
    specials = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}
    split = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")

    def reference_ids(text):
        ids = []
        for piece in split.split(text):
            if piece in specials:
                ids.append(specials[piece])
            elif piece:
                ids.extend(sp.encode(piece))
        return ids

    tok = AutoTokenizer.from_pretrained(OUT, gguf_file="tiny-spm.gguf")
    cases = []
    for s in SPM_STRESS:
        ids = reference_ids(s)
        plain = split.search(s) is None
        cases.append(
            {
                "text": s,
                "ids": ids,
                "ids_with_special": [1] + ids,  # add_bos_token is true
                "tokens": [sp.id_to_piece(i) for i in ids],
                # sentencepiece's decode of plain text must give the text back.
                "decoded": sp.decode(ids) if plain else None,
                "transformers_ids": tok(s, add_special_tokens=False)["input_ids"],
            }
        )
        if plain:
            assert cases[-1]["decoded"] == s, (s, cases[-1]["decoded"])
    write_json(
        "tiny-spm.json",
        {
            "source": "sentencepiece (per stretch between special tokens) on the model trained by "
            "reference/tokenizer_fixtures.py, stored as tests/fixtures/tokenizer/tiny-spm.gguf",
            "vocab_size": sp.get_piece_size(),
            "cases": cases,
        },
    )


def write_json(name, obj):
    path = os.path.join(OUT, name)
    with io.open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    smollm2()
    tiny_spm()
