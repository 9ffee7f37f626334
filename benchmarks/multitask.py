"""Many tasks on one frozen backbone: wall time per batch and peak memory of N models served together against N
separate single-model pipelines (ViT-B/16, 224 px, batch 8, CPU).

    python benchmarks/multitask.py --prepare /tmp/mt          # a random ViT-B/16 backbone + 8 tasks per mode
    python benchmarks/multitask.py --root /tmp/mt --n 1 2 4 8  # every row, each in a process of its own

Tasks: the paper's tri-tuner (P-Adapter mha + ffn, P-Prefix block, size 10) with its own random tuners and head (10
classes), all on the same frozen backbone, as trained output/ folders would be; ``bypass`` tasks set
``model.backbone.bypass``. ``shared``: ``pipeline('vision-efficient-tuning', [task_1, ..., task_N])``; ``separate``:
N single-model pipelines, built one after another and called one after another on every batch. Each row: the
median seconds per batch of 8 images over ``--batches`` batches (after one warm-up batch), and the process's peak
RSS. Results: JSON lines to ``--out``; lscpu's model name and flags are in every line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
VITB = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
TRI = [{'type': 'adapter', 'op': 'mha', 'dim': 10}, {'type': 'adapter', 'op': 'ffn', 'dim': 10},
       {'type': 'prefix', 'op': 'block', 'length': 10}]
MODES = ('bypass', 'standard')


def prepare(root: str, tasks: int) -> None:
    import torch
    from safetensors.torch import save_file
    from modelscope_utuning import VisionEfficientTuningModel
    from modelscope_utuning.backbone.vit import VisionTransformer
    from modelscope_utuning.training.defaults import model_configuration
    from modelscope_utuning.training.export import export_output
    os.makedirs(root, exist_ok=True)
    weights = os.path.join(root, 'vitb16.safetensors')
    if not os.path.isfile(weights):
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in VisionTransformer(**VITB).state_dict().items()}, weights)
    for mode in MODES:
        for t in range(tasks):
            folder = os.path.join(root, f'{mode}_{t}')
            if os.path.isfile(os.path.join(folder, 'configuration.json')):
                continue
            backbone = dict(VITB, tuners=TRI, pretrained_weights=weights, **({'bypass': True} if mode == 'bypass'
                                                                                else {}))
            torch.manual_seed(100 + t)
            model = VisionEfficientTuningModel(backbone=backbone, head={'num_classes': 10},
                                               CLASSES=[f'class{i}' for i in range(10)])
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(0.02 * torch.randn(p.shape))
            export_output(model, model_configuration(backbone, {'num_classes': 10}), folder)
            print('wrote', folder, flush=True)


def run(root: str, mode: str, n: int, impl: str, batches: int, threads: int) -> dict:
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    import modelscope_utuning  # noqa: F401
    from modelscope.pipelines import pipeline
    from PIL import Image
    folders = [os.path.join(root, f'{mode}_{t}') for t in range(n)]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(8)]
    t0 = time.perf_counter()
    if impl == 'shared':
        p = pipeline('vision-efficient-tuning', folders, device='cpu', batch_size=8)

        def call():
            return p(images)
    else:
        ps = [pipeline('vision-efficient-tuning', f, device='cpu', batch_size=8) for f in folders]

        def call():
            return [q(images) for q in ps]
    load_s = time.perf_counter() - t0
    call()  # warm-up (kernel choices, allocator)
    times = []
    for _ in range(batches):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    from accuracy import lscpu
    cpu = lscpu()
    return {'mode': mode, 'n': n, 'impl': impl, 'sec_per_batch': statistics.median(times),
            'times': [round(x, 3) for x in times], 'load_s': round(load_s, 1),
            'peak_rss_gb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3),
            'threads': threads, 'torch': torch.__version__, 'cpu': cpu.get('model_name'),
            'cpu_flags': cpu.get('flags')}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--prepare', metavar='ROOT')
    ap.add_argument('--tasks', type=int, default=8)
    ap.add_argument('--root', default='/tmp/mt')
    ap.add_argument('--n', type=int, nargs='+', default=[1, 2, 4, 8])
    ap.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES)
    ap.add_argument('--impls', nargs='+', default=['shared', 'separate'], choices=['shared', 'separate'])
    ap.add_argument('--batches', type=int, default=3)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--out', default=os.path.join(HERE, 'results', 'multitask.jsonl'))
    ap.add_argument('--one', nargs=3, metavar=('MODE', 'N', 'IMPL'), help=argparse.SUPPRESS)
    s = ap.parse_args()
    if s.prepare:
        prepare(s.prepare, s.tasks)
        return 0
    if s.one:
        mode, n, impl = s.one
        print(json.dumps(run(s.root, mode, int(n), impl, s.batches, s.threads)), flush=True)
        return 0
    os.makedirs(os.path.dirname(s.out), exist_ok=True)
    for mode in s.modes:
        for n in s.n:
            for impl in s.impls:
                if impl == 'separate' and n == 1:
                    continue  # the same as shared with one model
                res = subprocess.run([sys.executable, __file__, '--root', s.root, '--batches', str(s.batches),
                                      '--threads', str(s.threads), '--one', mode, str(n), impl],
                                     capture_output=True, text=True)
                line = next((x for x in res.stdout.splitlines() if x.startswith('{')), None)
                if line is None:
                    print(res.stderr[-3000:], file=sys.stderr)
                    continue
                print(line, flush=True)
                with open(s.out, 'a') as f:
                    f.write(line + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
