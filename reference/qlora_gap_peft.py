#!/usr/bin/env python3
"""How far QLoRA (NF4 base) trails LoRA on the f32 base in the reference tools, for the recipe of
`examples/dialogsum-qlora.toml` (issue 13: ferrotune measures +3.9% validation loss after 100
steps on SmolLM2-135M; is that NF4 on a 135M model, or ferrotune?).

    .venv/bin/python reference/qlora_gap_peft.py [--steps 100] [--eval-every 50] [--threads 2]

Both rows are transformers + PEFT on the CPU from the f32 HF folder (`scripts/convert-smollm2-hf.sh`):
- LoRA: the f32 model;
- QLoRA: the same folder loaded with `BitsAndBytesConfig(load_in_4bit, nf4, double quant, f32
  compute)` (bitsandbytes' CPU kernels; ferrotune's NF4 is bit-identical to them).
Recipe as the example: LoRA r=16, alpha 32, dropout 0.05 on the seven linears; batch 4, at most
256 tokens (the prompt cut from its start when longer, as ferrotune's `truncate_prompt_start`),
loss on the summary tokens; AdamW lr 2e-4 (betas 0.9/0.999, eps 1e-8, no weight decay), 10
warmup steps then cosine to 0, gradient norm clipped to 1; the same shuffled batches (seed 42) for
both rows. Validation loss: token-weighted mean over the first 20 batches of 4 of DialogSum dev.
Prints one JSON line per evaluation and the relative gap at each.
"""
import argparse
import json
import math
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("FERROTUNE_CACHE", os.path.join(ROOT, ".cache"))
HF_DIR = os.path.join(CACHE, "models/smollm2-hf")
SHARED = os.environ.get("FERROTUNE_SHARED_DIR", os.path.join(os.path.dirname(ROOT), "shared"))
TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def encode(tok, rows, max_len):
    out = []
    for r in rows:
        p = tok(TEMPLATE.format(dialogue=r["dialogue"]))["input_ids"]
        c = tok(" " + r["summary"])["input_ids"] + [tok.eos_token_id]
        c = c[:max_len]
        p = p[max(0, len(p) + len(c) - max_len):]
        out.append((p + c, len(p)))
    return out


def collate(torch, items, pad):
    n = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), n), pad)
    labels = torch.full((len(items), n), -100)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, (x, np_) in enumerate(items):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, np_:len(x)] = torch.tensor(x[np_:])
        mask[i, :len(x)] = 1
    return ids, labels, mask


def loss_sum(torch, model, batch):
    ids, labels, mask = batch
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    tgt = labels[:, 1:]
    lp = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                           ignore_index=-100, reduction="sum")
    return lp, int((tgt != -100).sum())


def run(quant, train_batches, val_batches, a):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    torch.manual_seed(a.seed)
    kw = {"dtype": torch.float32}
    if quant:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(HF_DIR, **kw)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def lr_at(step):  # step counts from 0 (the first update)
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        t = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * 0.5 * (1 + math.cos(math.pi * t))

    def evaluate():
        model.eval()
        s, n = 0.0, 0
        with torch.no_grad():
            for b in val_batches:
                ls, k = loss_sum(torch, model, b)
                s += float(ls)
                n += k
        model.train()
        return s / n

    rows = [{"quant": quant, "step": 0, "val_loss": evaluate()}]
    print(json.dumps(rows[-1]), flush=True)
    train_s = 0.0
    for step in range(a.steps):
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ls, k = loss_sum(torch, model, train_batches[step % len(train_batches)])
        (ls / k).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_s += time.time() - t0
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            rows.append({"quant": quant, "step": step + 1, "val_loss": evaluate(),
                         "train_loss": float(ls.detach()) / k, "s_per_step": train_s / (step + 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    if not os.path.exists(os.path.join(HF_DIR, "config.json")):
        sys.exit(f"{HF_DIR}: missing; run scripts/convert-smollm2-hf.sh")
    import torch
    from transformers import AutoTokenizer
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(HF_DIR)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    load = lambda n: [json.loads(line) for line in open(os.path.join(SHARED, "data/dialogsum", n))]
    train = encode(tok, load("dialogsum.train.jsonl"), 256)
    random.Random(a.seed).shuffle(train)
    train_batches = [collate(torch, train[i:i + 4], pad) for i in range(0, 4 * a.steps, 4)]
    val = encode(tok, load("dialogsum.dev.jsonl")[:80], 256)
    val_batches = [collate(torch, val[i:i + 4], pad) for i in range(0, 80, 4)]
    lora = run(False, train_batches, val_batches, a)
    qlora = run(True, train_batches, val_batches, a)
    for x, y in zip(lora, qlora):
        print(json.dumps({"step": x["step"], "lora_f32": round(x["val_loss"], 4), "qlora_nf4": round(y["val_loss"], 4),
                          "gap": f"{100 * (y['val_loss'] / x['val_loss'] - 1):+.1f}%"}), flush=True)


if __name__ == "__main__":
    main()
