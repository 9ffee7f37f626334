"""fp32 GEMM throughput of the ViT-B/16 linear shapes through PyTorch's default CPU path (MKL) and oneDNN.

    python benchmarks/gemm_backends.py [--reps 6]

Forward ``x W^T + b`` (W stored (out, in), as nn.Linear keeps it): ``torch.addmm`` vs oneDNN's
``mkldnn::_linear_pointwise``. Input gradient of a frozen layer ``dY W``: ``torch.mm`` vs oneDNN on ``W^T`` (which
it must reorder). Medians of REPS alternating measurements, GFLOP/s. This is what backbone/linear.py's choice
rests on: oneDNN forward, mm backward.
"""
import argparse
import json
import statistics
import time

import torch

SHAPES = {'fc1': (1576, 768, 3072), 'fc2': (1576, 3072, 768), 'kv': (1656, 768, 1536)}  # (tokens, in, out)


def gflops(fn, flops: float, iters: int = 8) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return flops / ((time.perf_counter() - t) / iters) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--reps', type=int, default=6)
    args = ap.parse_args()
    onednn = torch.ops.mkldnn._linear_pointwise
    torch.manual_seed(0)
    for name, (m, k, n) in SHAPES.items():
        x, w, b, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(n), torch.randn(m, n)
        flops = 2 * m * k * n
        runs = {'fwd_addmm': [], 'fwd_onednn': [], 'bwd_mm': [], 'bwd_onednn': []}
        for _ in range(args.reps):
            runs['fwd_addmm'].append(gflops(lambda: torch.addmm(b, x, w.t()), flops))
            runs['fwd_onednn'].append(gflops(lambda: onednn(x, w, b, 'none', [], ''), flops))
            runs['bwd_mm'].append(gflops(lambda: dy @ w, flops))
            runs['bwd_onednn'].append(gflops(lambda: onednn(dy, w.t(), None, 'none', [], ''), flops))
        print(json.dumps({'shape': name, 'm_k_n': [m, k, n], 'threads': torch.get_num_threads(),
                          'torch': torch.__version__,
                          **{key: round(statistics.median(v), 1) for key, v in runs.items()}}))


if __name__ == '__main__':
    main()
