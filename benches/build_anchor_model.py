"""Builds the anchor's GLM-4-9B-shaped model, adapter and data without timing anything: runs only the
building part of ../shared/bench/hf_peft_anchor.py (same code, same seed, same directory layout), for
development runs of glm4-verify alone. On the GPU machine:

  python3 benches/build_anchor_model.py path/to/hf_peft_anchor.py --dir /tmp/glm4-9b-random --tokenizer TOKDIR
"""
import sys

src = open(sys.argv[1]).read().split("rows = [json.loads")[0]
sys.argv = ["hf_peft_anchor.py"] + sys.argv[2:]
exec(compile(src, "hf_peft_anchor.py", "exec"))
