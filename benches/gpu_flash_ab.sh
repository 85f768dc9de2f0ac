#!/usr/bin/env bash
# WIP flash attention, first GPU check in one call: parity with and without GLM4_VERIFY_FLASH=1, then
# the 9B recipe alternately without and with it (same binary), then a profile with it.
#   BIN=… ANCHOR=… TOK=… FIXTURES=… benches/gpu_flash_ab.sh     (paths as for gpu_e2e.sh)
set -u
BIN=${BIN:?CUDA glm4-verify binary of this branch}
ANCHOR=${ANCHOR:?hf_peft_anchor.py}
TOK=${TOK:?tokenizer directory}
FIXTURES=${FIXTURES:?../shared/fixtures/glm4-tiny copy}
DIR=${DIR:-/tmp/glm4-9b-random}
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-/tmp/nv-cache} PYTHONUNBUFFERED=1
timeout -k 5 120 python3 benches/gpu_parity.py "$BIN" "$FIXTURES" 2>&1 | tail -1
GLM4_VERIFY_FLASH=1 timeout -k 5 120 python3 benches/gpu_parity.py "$BIN" "$FIXTURES" 2>&1 | cut -c1-170
# The model only (the anchor script up to its data, same seed).
python3 - "$ANCHOR" --dir "$DIR" --tokenizer "$TOK" <<'PY'
import sys
src = open(sys.argv[1]).read().split("rows = [json.loads")[0]
sys.argv = ["hf_peft_anchor.py"] + sys.argv[2:]
exec(compile(src, "hf_peft_anchor.py", "exec"))
PY
run() { # tag, env
  env $2 timeout -k 5 90 "$BIN" --adapter "$DIR/adapter" --base "$DIR/base" --data "$DIR/data.jsonl" --max-new-tokens 64 \
    --ignore-eos --device cuda --format json -o "/tmp/flash-$1.json" 2> "/tmp/flash-$1.err"
  python3 -c "
import json; r=json.load(open('/tmp/flash-$1.json')); t=r['timings']; s=r['samples']
print('$1', {k: round(v, 2) for k, v in t.items()}, 'mean dlp', round(sum(x['logprob_tuned'] - x['logprob_base'] for x in s) / len(s), 4), r.get('gpu_memory'))" 2>&1 | tail -1
}
run eager-a X=1; run flash-a GLM4_VERIFY_FLASH=1; run eager-b X=1; run flash-b GLM4_VERIFY_FLASH=1
run flash-profile "GLM4_VERIFY_FLASH=1 GLM4_VERIFY_PROFILE=1"; grep -E "^  score" /tmp/flash-flash-profile.err
