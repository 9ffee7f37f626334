#!/usr/bin/env bash
# The GPU rows (issue 6): ViT-B/16 U-Tuning train / inference img/s and peak memory at batch 64 and 128, bf16,
# ours vs the built-in, each in its own process. Run on a machine with a CUDA GPU, as one prepared script:
#   REF_PY=/path/to/venv-with-torchvision/bin/python bash benchmarks/gpu.sh
# (without REF_PY only our rows are measured). Model folders as in run_speed.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${ROOT:-/tmp/bench}
OUT=${OUT:-benchmarks/results/gpu.jsonl}
mkdir -p "$(dirname "$OUT")"
[ -d "$ROOT/tri" ] || python benchmarks/make_models.py "$ROOT"
MODEL=${MODEL:-$ROOT/utuning}
[ -d "$MODEL" ] || MODEL=$ROOT/tri
for batch in 64 128; do
  for mode in train infer; do
    python benchmarks/speed.py --impl ours --device cuda --model-dir "$MODEL" --mode $mode --precision bf16 \
      --batch $batch --steps 10 --warmup 3 >> "$OUT"
    if [ -n "${REF_PY:-}" ]; then
      $REF_PY benchmarks/speed.py --impl builtin --device cuda --model-dir "$MODEL" --mode $mode --precision bf16 \
        --batch $batch --steps 10 --warmup 3 >> "$OUT"
    fi
  done
done
python benchmarks/speed.py --impl ours --device cuda --model-dir "$ROOT/tri_bypass" --mode train --precision bf16 \
  --batch 128 --steps 10 --warmup 3 >> "$OUT"
cat "$OUT"
