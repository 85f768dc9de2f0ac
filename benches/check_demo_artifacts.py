"""Checks that `glm4-verify demo` writes real artefacts: the base loads in transformers
(GlmForCausalLM), the adapters load in PEFT, and transformers + PEFT compute the same target
log-probs as glm4-verify's JSON reports.

  glm4-verify demo --dir demo --keep
  glm4-verify --adapter demo/adapters/good --base demo/base --data demo/data/train.jsonl \
      --config demo/lora.yaml --device cpu --format json -o demo/good.json
  python3 benches/check_demo_artifacts.py demo            (where torch, transformers, peft exist)
"""
import json, sys

import torch
from peft import PeftModel
from transformers import AutoTokenizer, GlmForCausalLM

d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(f"{d}/base")
rows = [json.loads(l) for l in open(f"{d}/data/train.jsonl")]
uid = tok.convert_tokens_to_ids("<|user|>")


def process(conv):  # finetune_demo process_batch, combine=False, no cut (64 + 64 exceeds every row)
    ids, mask = tok.convert_tokens_to_ids(["[gMASK]", "<sop>"]), [False, False]
    for m in conv:
        x = tok.apply_chat_template([m], tokenize=True, return_dict=False)[2:]
        ids += x
        mask += [m["role"] == "assistant"] * len(x)
    ids.append(uid)
    mask = [False, *mask]
    return ids, [t if k else -100 for t, k in zip(ids, mask)]


ok = True
for name in ("good", "untrained", "truncated"):
    model = GlmForCausalLM.from_pretrained(f"{d}/base", dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, f"{d}/adapters/{name}").eval()
    ours = json.load(open(f"{d}/{name}.json"))
    worst = 0.0
    for row, s in zip(rows, ours["samples"]):
        ids, labels = process(row["messages"])
        with torch.no_grad():
            lp = torch.log_softmax(peft(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        want = sum(float(lp[j - 1, t]) for j, t in enumerate(labels) if t != -100 and j > 0)
        worst = max(worst, abs(want - s["logprob_tuned"]) / abs(want))
    good = worst < 1e-4
    ok &= good
    print(f"{name}: PEFT loads it; worst relative difference of per-sample target log p vs glm4-verify {worst:.2e} {'OK' if good else 'FAIL'}")
print("demo artefacts:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
