"""Golden tokenizer fixtures from transformers (the reference the Rust tokenizer must match).

Run from the repository root (needs scripts/fetch-models.sh to have fetched the SmolLM2 GGUF,
and the reference environment from scripts/setup-reference.sh):

    .venv/bin/python reference/tokenizer_fixtures.py

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
  tests/fixtures/tokenizer/pre_tokenizers.json  how each `tokenizer.ggml.pre` we map splits text,
                                          by llama.cpp's regex lists run with Python's `regex`
The HF tokenizer folder that the from_hf_dir test reads is the one transformers saves with the
whole model: tests/fixtures/smollm2/hf-export (`reference/make_fixtures.py hf-export`).
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
import regex
import sentencepiece as spm
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
SMOL_DIR = os.path.join(ROOT, ".cache", "models", "smollm2")
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

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


# llama.cpp's regex lists (src/llama-vocab.cpp, llm_tokenizer_bpe), applied in order, each to every
# piece the previous ones produced, matches isolated. For tekken and gpt-4o llama.cpp runs a rewrite
# that approximates \p{Lu}/\p{Ll} with lookaheads; the tokenizer.json original (quoted in its
# comments, and what transformers uses) is the reference there.
LLAMA_CPP_SPLITS = {
    "DEFAULT": [
        "[\\p{P}\\$\\+<=>\\^~\\|]+",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        "\\p{N}+",
        "[0-9][0-9][0-9]",
    ],
    "GPT2": [
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ],
    "LLAMA3": [
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    "DBRX": [
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    "DEEPSEEK_LLM": [
        "[\r\n]",
        "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        "\\s+$",
        "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
        "\\p{N}+",
    ],
    "DEEPSEEK_CODER": [
        "[\r\n]",
        "\\s?\\p{L}+",
        "\\s?\\p{P}+",
        "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
        "\\p{N}",
    ],
    "FALCON": [
        "[\\p{P}\\$\\+<=>\\^~\\|`]+",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        "[0-9][0-9][0-9]",
    ],
    "STARCODER": [
        "\\p{N}",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ],
    "QWEN2": [
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    "TEKKEN": [
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    "GPT4O": [
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
}

# tokenizer.ggml.pre value -> llama.cpp's pre-tokenizer type (llama_vocab::impl::load).
PRE_TYPES = {
    "default": "DEFAULT",
    "gpt-2": "GPT2", "phi-2": "GPT2", "mpt": "GPT2", "olmo": "GPT2", "jais": "GPT2",
    "llama3": "LLAMA3", "llama-v3": "LLAMA3", "llama-bpe": "LLAMA3", "falcon3": "LLAMA3",
    "falcon-h1": "LLAMA3", "pixtral": "LLAMA3", "lfm2": "LLAMA3",
    "dbrx": "DBRX", "smaug-bpe": "DBRX",
    "deepseek-llm": "DEEPSEEK_LLM", "deepseek-coder": "DEEPSEEK_CODER", "falcon": "FALCON",
    "starcoder": "STARCODER", "refact": "STARCODER", "command-r": "STARCODER", "smollm": "STARCODER",
    "codeshell": "STARCODER", "exaone": "STARCODER", "minerva-7b": "STARCODER",
    "qwen2": "QWEN2", "deepseek-r1-qwen": "QWEN2", "stablelm2": "QWEN2", "megrez": "QWEN2",
    "tekken": "TEKKEN", "gpt-4o": "GPT4O", "llama4": "GPT4O",
}

PRE_STRESS = [
    "Hello world, it's 2024! I'M HERE; they'll see. DON'T",
    "1234567 12 3.14159 $100 #tag @user",
    "  leading\tand\t\ttabs   trailing   \n\n\r\nlines\n",
    "Ωμέγα Straße café naïve \u212a\u2126 ﬁ Ｆｕｌｌ",
    "日本語のテキスト 中文 한국어 😀👍🏽",
    "def f(x):\n    return x**2  # sq\n",
    "CamelCase snake_case kebab-case a.b/c?d=e&f",
    "!!!... ---- ~~~ <=> ^| `tick`",
]


def llama_cpp_split(text, regexes):
    """llama.cpp's unicode_regex_split semantics with Python's `regex` engine."""
    pieces = [text]
    for pattern in regexes:
        out = []
        for piece in pieces:
            last = 0
            for m in regex.finditer(pattern, piece):
                if m.start() > last:
                    out.append(piece[last : m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                last = m.end()
            if last < len(piece):
                out.append(piece[last:])
        pieces = out
    return pieces


def pre_tokenizers():
    write_json(
        "pre_tokenizers.json",
        {
            "source": "llama.cpp's regex lists run with Python's `regex` module (reference/tokenizer_fixtures.py)",
            "cases": [
                {"pre": pre, "text": t, "pieces": llama_cpp_split(t, LLAMA_CPP_SPLITS[kind])}
                for pre, kind in PRE_TYPES.items()
                for t in PRE_STRESS
            ],
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
    pre_tokenizers()
