"""Times the candidate kernels of ``modelscope_utuning/backbone/kernels.py`` on this machine, per shape and dtype.

    python benchmarks/kernel_choices.py                       # JSON lines to benchmarks/results/kernel_choices.jsonl
    python benchmarks/kernel_choices.py --dtypes fp32 bf16    # bf16 only where the CPU has native bf16 (else minutes)

The package makes these choices itself, once per shape class, when a model first runs (and caches them per
machine); this script shows the timings behind them, so that the tables in benchmarks/README.md can say, per CPU,
which path won and by how much. Shapes: ViT-B/16 at 224 px, batch 8 (the speed benchmark's model) and DINOv2
ViT-S/14 at 112 px, batch 25 (the accuracy benchmark's), attention with its backward (training) and without
(inference), and the frozen fp32 linears (forward kernel, with and without the backward that follows). Each line: the operation, shape, dtype, the median and best of
``--reps`` interleaved timings per candidate, the candidate the package's rule picks (the fastest best time,
replacing the default only when more than 10 % faster), ``lscpu``'s model name and flags, torch, threads.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from modelscope_utuning.backbone import kernels  # noqa: E402
from modelscope_utuning.backbone.linear import _fp32_runners  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# name -> (batch, heads, tokens, head dim, width)
MODELS = {'vit_b16_224_b8': (8, 12, 197, 64, 768), 'dinov2_s14_112_b25': (25, 6, 65, 64, 384)}
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}


def cpu() -> dict:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
    info = dict(line.split(':', 1) for line in out.splitlines() if ':' in line)
    flags = [f for f in info.get('Flags', '').split() if f.startswith(('avx', 'amx')) or f in ('fma', 'f16c')]
    return {'cpu': info.get('Model name', '').strip(), 'cpu_flags': ' '.join(flags)}


def timings(runners: dict, reps: int) -> dict:
    """Per candidate: every time of ``reps`` interleaved runs after one warm-up of each."""
    for run in runners.values():
        run()
    times = {name: [] for name in runners}
    for _ in range(reps):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return times


def attention_runners(B, H, n, d, dtype, grad):
    q, k, v = (torch.randn(B, H, n, d, dtype=dtype, requires_grad=grad) for _ in range(3))
    g = torch.randn(B, H, n, d, dtype=dtype)

    def make(fn):
        def run():
            if grad:
                torch.autograd.grad(fn(q, k, v), (q, k, v), g)
            else:
                with torch.no_grad():
                    fn(q, k, v)
        return run
    return {'sdpa': make(torch.nn.functional.scaled_dot_product_attention), 'math': make(kernels.math_attention)}


def linear_runners(rows, width_in, width_out, grad):
    """The package's own candidates (backbone/linear.py): forward by oneDNN or addmm, input gradient by mm."""
    w = torch.randn(width_out, width_in) * width_in ** -0.5
    return _fp32_runners(torch.empty(rows, width_in), w, torch.zeros(width_out), grad)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--dtypes', nargs='+', default=['fp32'], choices=list(DTYPES))
    ap.add_argument('--reps', type=int, default=7)
    ap.add_argument('--threads', type=int, default=torch.get_num_threads())
    ap.add_argument('--out', default=os.path.join(HERE, 'results', 'kernel_choices.jsonl'))
    s = ap.parse_args(argv)
    torch.set_num_threads(s.threads)
    common = dict(cpu(), torch=torch.__version__, threads=torch.get_num_threads())
    lines = []
    for model, (B, H, n, d, width) in MODELS.items():
        for dname in s.dtypes:
            for grad in (True, False):
                times = timings(attention_runners(B, H, n, d, DTYPES[dname], grad), s.reps)
                lines.append(dict(op='attention', model=model, shape=f'B={B} H={H} n={n} d={d}', dtype=dname,
                                  backward=grad, **summary(times, 'sdpa'), **common))
        if 'fp32' in s.dtypes:  # the oneDNN path is fp32-only (bf16 autocast takes F.linear)
            for w_in, w_out, what in ((width, 3 * width, 'qkv'), (width, 4 * width, 'fc1'),
                                      (4 * width, width, 'fc2')):
                for grad in (True, False):
                    times = timings(linear_runners(B * n, w_in, w_out, grad), s.reps)
                    lines.append(dict(op='linear', model=model, shape=f'{what} rows={B * n} {w_in}->{w_out}',
                                      dtype='fp32', backward=grad, **summary(times, 'onednn'), **common))
    os.makedirs(os.path.dirname(os.path.abspath(s.out)), exist_ok=True)
    with open(s.out, 'a') as f:
        for line in lines:
            print(json.dumps(line))
            f.write(json.dumps(line) + '\n')
    return 0


def summary(times: dict, default: str) -> dict:
    return {'ms_median': {n: round(1e3 * statistics.median(t), 2) for n, t in times.items()},
            'ms_best': {n: round(1e3 * min(t), 2) for n, t in times.items()},
            'picked': kernels.pick({n: min(t) for n, t in times.items()}, default)}


if __name__ == '__main__':
    sys.exit(main())
