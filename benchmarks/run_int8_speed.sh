#!/usr/bin/env bash
# int8 speed rows of benchmarks/README.md ("int8 inference"): ViT-B/16 at batch 8, inference, each configuration in
# its own process, alternating, REPS times; JSON lines to OUT. Needs the model folders of run_speed.sh
# (benchmarks/make_models.py, tests/fixtures/make_builtin_vitb16_reference.py), the built-in's venvs (REF_PY,
# REF_CPU_PY, see run_speed.sh) and ONNX exports of the tri-tuner folder:
#   modelscope-utuning export $ROOT/tri $ROOT/tri_onnx --onnx
#   modelscope-utuning export $ROOT/tri $ROOT/tri_onnx_int8 --onnx --int8
set -euo pipefail
cd "$(dirname "$0")/.."
REF_PY=${REF_PY:-/opt/refvenv/bin/python}
REF_CPU_PY=${REF_CPU_PY:-/opt/refcpu/bin/python}
ROOT=${ROOT:-/tmp/bench}
OUT=${OUT:-benchmarks/results/speed_int8.jsonl}
REPS=${REPS:-3}
STEPS=${STEPS:-6}
WARMUP=${WARMUP:-2}
run() { local py=$1; shift; $py benchmarks/speed.py --mode infer --steps "$STEPS" --warmup "$WARMUP" "$@" >> "$OUT"; }
for rep in $(seq "$REPS"); do
  run python --impl ours --model-dir "$ROOT/tri" --precision fp32
  run python --impl ours --model-dir "$ROOT/tri" --precision int8
  run python --impl ours --model-dir "$ROOT/tri" --precision int8 --calibrate
  run python --impl ours --model-dir "$ROOT/utuning" --precision fp32
  run python --impl ours --model-dir "$ROOT/utuning" --precision int8 --calibrate
  run "$REF_CPU_PY" --impl builtin --model-dir "$ROOT/utuning" --precision fp32
  run "$REF_PY" --impl builtin --model-dir "$ROOT/utuning" --precision fp32
  run python --impl onnx --model-dir "$ROOT/tri" --onnx-dir "$ROOT/tri_onnx"
  run python --impl onnx --model-dir "$ROOT/tri" --onnx-dir "$ROOT/tri_onnx_int8"
done
