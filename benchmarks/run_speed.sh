#!/usr/bin/env bash
# Speed / memory rows of benchmarks/README.md. Needs the model folders (benchmarks/make_models.py +
# tests/fixtures/make_builtin_vitb16_reference.py) and the built-in in two venvs: REF_PY, the issue's own venv
# (torch 2.14.1 CUDA wheel + torchvision), and REF_CPU_PY, a venv over this interpreter's CPU torch 2.13.0
# (`python -m venv --system-site-packages DIR && DIR/bin/pip install opencv-python-headless`; speed.py stands
# in for torchvision there, which the built-in only needs for its AlexNet side network). Each configuration runs
# in its own process, ours and the built-in alternating, REPS times; JSON lines go to OUT. PRECISIONS adds bf16
# rows (only worth it on a CPU with native bf16, or with DEVICE=cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
REF_PY=${REF_PY:-/opt/refvenv/bin/python}
REF_CPU_PY=${REF_CPU_PY:-/opt/refcpu/bin/python}
ROOT=${ROOT:-/tmp/bench}
OUT=${OUT:-benchmarks/results/speed.jsonl}
REPS=${REPS:-2}
STEPS=${STEPS:-3}
WARMUP=${WARMUP:-1}
PRECISIONS=${PRECISIONS:-fp32}
EXTRAS=${EXTRAS:-1}  # 0: only ours vs the built-in (the targets), not the variants only we have
mkdir -p "$(dirname "$OUT")"
[ -d "$ROOT/utuning" ] || $REF_PY tests/fixtures/make_builtin_vitb16_reference.py "$ROOT/utuning"
[ "$EXTRAS" = 0 ] || [ -d "$ROOT/tri" ] || python benchmarks/make_models.py "$ROOT"
run() { local py=$1; shift; $py benchmarks/speed.py --steps "$STEPS" --warmup "$WARMUP" "$@" >> "$OUT"; }
for rep in $(seq "$REPS"); do
  for mode in train infer; do
    for prec in $PRECISIONS; do
      run python --impl ours --model-dir "$ROOT/utuning" --mode $mode --precision $prec
      run "$REF_CPU_PY" --impl builtin --model-dir "$ROOT/utuning" --mode $mode --precision $prec
      run "$REF_PY" --impl builtin --model-dir "$ROOT/utuning" --mode $mode --precision $prec
    done
  done
  [ "$EXTRAS" = 0 ] && continue
  run python --impl ours --model-dir "$ROOT/utuning" --mode train --cpu-allocator lean
  run "$REF_CPU_PY" --impl builtin --model-dir "$ROOT/utuning" --mode train --cpu-allocator lean
  run python --impl ours --model-dir "$ROOT/tri" --mode train
  run python --impl ours --model-dir "$ROOT/tri_bypass" --mode train
  run python --impl ours --model-dir "$ROOT/lora" --mode infer
  run python --impl ours --model-dir "$ROOT/lora" --mode infer --merge-lora
  run python --impl ours --model-dir "$ROOT/plain" --mode infer
done
