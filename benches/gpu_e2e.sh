#!/usr/bin/env bash
# GPU end-to-end benchmark: transformers + PEFT (../shared/bench/hf_peft_anchor.py) and glm4-verify
# on the same generated GLM-4-9B-shaped model, adapter and data, in one run, side by side.
#
# On the GPU machine (no Rust there): build the binary on a CPU box with
#   source ../shared/tools/cuda-env.sh && CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda
# copy target-cuda/release/glm4-verify, ../shared/bench/hf_peft_anchor.py and a tokenizer directory
# (../shared/fixtures/glm4-tiny/tokenizer) into one folder, then:
#   BIN=devbox/glm4-verify ANCHOR=devbox/hf_peft_anchor.py TOK=devbox/tokenizer benches/gpu_e2e.sh
# Env: DIR (generated model, default /tmp/glm4-9b-random), LAYERS (default 40), OUT (results folder),
# SKIP_BEST=1 to skip the anchor's --gen-batch 128 setting, PROFILE=1 for a profiled run of glm4-verify,
# LEAN=limits for one more run with GLM4_VERIFY_LIMITS=limits (smaller batches: peak memory vs speed),
# BUDGET=size for one more run with --gpu-memory size (e.g. 21.67GB: the weights + 15%).
# Every step has its own time limit (STEP_S, default 300 s) so one stuck step cannot take the rest.
set -euo pipefail
BIN=${BIN:?path to the CUDA glm4-verify binary}
ANCHOR=${ANCHOR:?path to hf_peft_anchor.py}
TOK=${TOK:?tokenizer directory}
DIR=${DIR:-/tmp/glm4-9b-random}
LAYERS=${LAYERS:-40}
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
STEP_S=${STEP_S:-300}
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-/tmp/nv-cache} PYTHONUNBUFFERED=1
step() { timeout -k 10 "$STEP_S" "$@"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# 1. The anchor (builds the model, adapter and data under $DIR on its first run).
step python3 "$ANCHOR" --dir "$DIR" --tokenizer "$TOK" --layers "$LAYERS" > "$OUT/anchor-default.log" 2>&1 || true
tail -1 "$OUT/anchor-default.log" | tee "$OUT/anchor-default.json"
# The page cache holds the weights for both tools alike (the anchor read them last).
# 2. glm4-verify: the same work (target log-probs with and without the adapter, 64 greedy tokens
#    per prompt with and without), cold (PTX JIT) then warm; peak GPU memory sampled alongside.
run_ours() { # name, env (VAR=value or -), adapters... (and $EXTRA: more flags)
  local name=$1 envs=$2; shift 2
  local args=()
  for a in "$@"; do args+=(--adapter "$a"); done
  [ -n "${EXTRA:-}" ] && args+=($EXTRA)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$OUT/mem-$name.txt" &
  local smi=$!
  local t0; t0=$(date +%s%N)
  [ "$envs" = - ] && envs=GLM4_VERIFY_BENCH=1
  step env "$envs" "$BIN" "${args[@]}" --base "$DIR/base" --data "$DIR/data.jsonl" --max-new-tokens 64 --ignore-eos \
    --device cuda --format json -o "$OUT/ours-$name.json" || true
  local t1; t1=$(date +%s%N)
  kill $smi 2>/dev/null || true
  echo "{\"name\": \"$name\", \"wall_s\": $(( (t1 - t0) / 1000000 ))e-3, \"peak_mem_mib\": $(sort -n "$OUT/mem-$name.txt" | tail -1)}" | tee "$OUT/wall-$name.json"
}
run_ours cold - "$DIR/adapter"
run_ours warm - "$DIR/adapter"
mkdir -p "$DIR/four"
for k in 1 2 3 4; do [ -e "$DIR/four/a$k" ] || cp -r "$DIR/adapter" "$DIR/four/a$k"; done
run_ours four - "$DIR/four/a1" "$DIR/four/a2" "$DIR/four/a3" "$DIR/four/a4"
# The anchor's best setting (generation batched 128 rows).
if [ -z "${SKIP_BEST:-}" ]; then
  step python3 "$ANCHOR" --dir "$DIR" --tokenizer "$TOK" --layers "$LAYERS" --gen-batch 128 > "$OUT/anchor-best.log" 2>&1 || true
  tail -1 "$OUT/anchor-best.log" | tee "$OUT/anchor-best.json"
fi
# Again after the anchor's second run: the same numbers as "warm" say the machine did not change under us.
run_ours again - "$DIR/adapter"
[ -n "${LEAN:-}" ] && run_ours lean "GLM4_VERIFY_LIMITS=$LEAN" "$DIR/adapter"
[ -n "${BUDGET:-}" ] && EXTRA="--gpu-memory $BUDGET" run_ours budget - "$DIR/adapter"
# Where the time goes (device time per forward-pass section, synchronised: slower than a plain run).
if [ -n "${PROFILE:-}" ]; then
  step env GLM4_VERIFY_PROFILE=1 "$BIN" --adapter "$DIR/adapter" --base "$DIR/base" --data "$DIR/data.jsonl" --max-new-tokens 64 \
    --ignore-eos --device cuda --format json -o "$OUT/ours-profile.json" 2> "$OUT/profile.txt" || true
  cat "$OUT/profile.txt"
fi
# 3. Side by side.
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(n):
    p = os.path.join(out, n)
    try:
        return json.load(open(p))
    except (OSError, ValueError):
        return None
a, b = load("anchor-default.json"), load("anchor-best.json")
warm, cold, four = load("ours-warm.json"), load("ours-cold.json"), load("ours-four.json")
again, lean, budget = load("ours-again.json"), load("ours-lean.json"), load("ours-budget.json")
ww, wc, wf = load("wall-warm.json"), load("wall-cold.json"), load("wall-four.json")
wa, wl_, wb = load("wall-again.json"), load("wall-lean.json"), load("wall-budget.json")
def ours(r):
    if r is None: return None
    if "reports" in r: r = r["reports"][0]
    t = r["timings"]; return {"load_s": t["load_s"], "score_s": t["score_s"], "gen_s": t["generate_s"], "total_s": t["total_s"]}
rows = [("transformers+PEFT default", a), ("transformers+PEFT --gen-batch 128", b), ("glm4-verify cold", ours(cold)), ("glm4-verify warm", ours(warm)),
        ("glm4-verify again (after anchor)", ours(again)), ("glm4-verify lean limits", ours(lean)),
        ("glm4-verify --gpu-memory " + os.environ.get("BUDGET", ""), ours(budget))]
print(f"{'':36}{'load_s':>9}{'score_s':>9}{'gen_s':>9}{'total_s':>9}")
for n, r in rows:
    if r: print(f"{n:36}{r['load_s']:>9.2f}{r['score_s']:>9.2f}{r['gen_s']:>9.2f}{r['total_s']:>9.2f}")
w = ours(warm)
if w and a:
    toks = 2 * (a["prompt_tokens"] + a["target_tokens"])
    print(f"scoring: {toks / w['score_s']:.0f} tokens/s (anchor {a['score_tokens_per_s']}); generation: {a['gen_tokens'] / w['gen_s']:.0f} tokens/s (anchor {a['gen_tokens_per_s']})")
    print(f"total speed-up vs default anchor: {a['total_s'] / w['total_s']:.2f}x" + (f", vs best anchor: {b['total_s'] / w['total_s']:.2f}x" if b else ""))
    print(f"mean delta logprob per sample: anchor {a['mean_delta_logprob']:.3f}")
if warm:
    r = warm["reports"][0] if "reports" in warm else warm
    s = r["samples"]; print(f"glm4-verify: mean delta logprob per sample {sum(x['logprob_tuned'] - x['logprob_base'] for x in s) / len(s):.3f}; verdict {r['verdict']}")
for n, wl, rep in (("cold", wc, cold), ("warm", ww, warm), ("four adapters", wf, four), ("again", wa, again), ("lean", wl_, lean),
                     ("budget", wb, budget)):
    if not wl: continue
    line = f"glm4-verify {n}: wall {wl['wall_s']:.2f}s, peak GPU memory {wl['peak_mem_mib']} MiB (nvidia-smi)"
    m = rep and (rep["reports"][0] if "reports" in rep else rep).get("gpu_memory")
    if m: line += f"; its report: {m['after_load_gb']:.1f} GB after load, peak {m['peak_used_gb']:.1f} GB in use, {m['peak_reserved_gb']:.1f} GB reserved"
    print(line)
f = ours(four)
if f and w: print(f"four adapters of one base: load {f['load_s']:.2f}s (one adapter: {w['load_s']:.2f}s), total {f['total_s']:.2f}s")
PY
