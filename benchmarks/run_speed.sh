#!/usr/bin/env bash
# Speed / memory rows of benchmarks/README.md. Needs: the built-in's venv (REF_PY, with torchvision) and the
# model folders (benchmarks/make_models.py + tests/fixtures/make_builtin_vitb16_reference.py). Runs each
# configuration in its own process, alternating ours / built-in, REPS times; appends JSON lines to OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
REF_PY=${REF_PY:-/opt/refvenv/bin/python}
ROOT=${ROOT:-/tmp/bench}
OUT=${OUT:-benchmarks/results/speed.jsonl}
REPS=${REPS:-2}
STEPS=${STEPS:-6}
WARMUP=${WARMUP:-2}
mkdir -p "$(dirname "$OUT")"
[ -d "$ROOT/utuning" ] || $REF_PY tests/fixtures/make_builtin_vitb16_reference.py "$ROOT/utuning"
[ -d "$ROOT/tri" ] || python benchmarks/make_models.py "$ROOT"
for rep in $(seq "$REPS"); do
  for mode in train infer; do
    for prec in fp32 bf16; do
      python benchmarks/speed.py --impl ours --model-dir "$ROOT/utuning" --mode $mode --precision $prec --steps $STEPS --warmup $WARMUP >> "$OUT"
      $REF_PY benchmarks/speed.py --impl builtin --model-dir "$ROOT/utuning" --mode $mode --precision $prec --steps $STEPS --warmup $WARMUP >> "$OUT"
    done
  done
  python benchmarks/speed.py --impl ours --model-dir "$ROOT/tri" --mode train --steps $STEPS --warmup $WARMUP >> "$OUT"
  python benchmarks/speed.py --impl ours --model-dir "$ROOT/tri_bypass" --mode train --steps $STEPS --warmup $WARMUP >> "$OUT"
  python benchmarks/speed.py --impl ours --model-dir "$ROOT/lora" --mode infer --steps $STEPS --warmup $WARMUP >> "$OUT"
  python benchmarks/speed.py --impl ours --model-dir "$ROOT/lora" --mode infer --merge-lora --steps $STEPS --warmup $WARMUP >> "$OUT"
  python benchmarks/speed.py --impl ours --model-dir "$ROOT/plain" --mode infer --steps $STEPS --warmup $WARMUP >> "$OUT"
done
