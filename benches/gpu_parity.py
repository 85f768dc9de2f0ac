"""GPU parity: glm4-verify's CUDA build against the transformers + PEFT ground truth of
../shared/fixtures/glm4-tiny, in f32 (within 1e-4 relative) and bf16 (tolerance measured and printed);
each also under a tight --gpu-memory (batches fitted, the input embedding read from host memory).

  python3 benches/gpu_parity.py BIN FIXTURES        (run on the GPU machine)
"""
import json, subprocess, sys

bin_, fx = sys.argv[1], sys.argv[2]
ref = json.load(open(f"{fx}/reference.json"))
train = [s for s in ref["samples"] if s["split"] == "train"]
cases = [("good", "adapters/good", "base"), ("untrained", "adapters/untrained", "base"),
         ("good-0414", "adapters/good-0414", "base-0414"), ("good", "adapters/good-chatglm", "base-chatglm"),
         ("merged-good-bf16", "merged/good-bf16", "base")]
base_name = {"base": "base", "base-0414": "base-0414", "base-chatglm": "base"}
ok = True
for dtype, budget in [(d, b) for b in ([], ["--gpu-memory", "0.85GB"]) for d in ("f32", "bf16")]:
    for variant, adapter, base in cases:
        r = subprocess.run([bin_, "--adapter", f"{fx}/{adapter}", "--base", f"{fx}/{base}", "--data", f"{fx}/data/train.jsonl",
                            "--device", "cuda", "--dtype", dtype, "--max-new-tokens", "24", "--format", "json"] + budget,
                           capture_output=True, text=True)
        if r.returncode not in (0, 1):
            print("FAILED TO RUN", adapter, dtype, budget, r.stderr); ok = False; continue
        rep = json.loads(r.stdout)
        if budget and not rep["run"].get("embedding_in_host_memory"):
            print("NOT IN HOST MEMORY", adapter, dtype, budget); ok = False
        worst_b = worst_t = 0.0
        greedy_same = 0
        for s, want in zip(rep["samples"], train):
            wb, wt = sum(want[base_name[base]]["target_logprobs"]), sum(want[variant]["target_logprobs"])
            worst_b = max(worst_b, abs(s["logprob_base"] - wb) / abs(wb))
            worst_t = max(worst_t, abs(s["logprob_tuned"] - wt) / abs(wt))
            greedy_same += s["generation_tuned"] == want[variant]["greedy_text"].replace("<|user|>", "").replace("<|endoftext|>", "")
        tol = 1e-4 if dtype == "f32" else 2e-2
        good = worst_b < tol and worst_t < tol
        ok &= good if dtype == "f32" else True
        print(f"{dtype:5}{' budget' if budget else '':7} {adapter:24} verdict {rep['verdict']:9} worst rel err base {worst_b:.2e} tuned {worst_t:.2e} "
              f"greedy text equal {greedy_same}/{len(train)} {'OK' if good else 'OVER ' + str(tol)}")
print("GPU parity:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
