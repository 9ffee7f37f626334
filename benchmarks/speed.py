"""Train / inference throughput and peak memory of one implementation, in its own process.

    python benchmarks/speed.py --impl ours    --model-dir DIR --mode train --precision fp32
    /opt/refvenv/bin/python benchmarks/speed.py --impl builtin --model-dir DIR --mode train --precision fp32

Both load the same hub-layout directory (``Model.from_pretrained``). ``ours`` imports modelscope_utuning; ``builtin``
uses ModelScope's own vision-efficient-tuning code (needs torchvision, so run it from a venv that has it). The
built-in trains only what its trainer would: backbone frozen except the tuner modules, head trainable. Prints one
JSON line: img/s, seconds per step, peak RSS (GB), trainable parameters, achieved GFLOP/s and the machine's fp32
GEMM peak measured in the same run. GFLOP/s is nominal: 35.1 GFLOP per 224-px ViT-B/16 image forward, and a
training step with a frozen backbone counts 2x (forward + the input gradients; frozen weights get no weight
gradient), whatever work an implementation manages to skip - so the figure compares implementations.
"""
import argparse
import json
import os
import resource
import sys
import time

import torch

TUNER_KEYS = ('adapter', 'prefix', 'prompt', 'lora', 'sidetune', 'side', 'head', 'mha_', 'ffn_', 'block_')


def gemm_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def _torchvision_placeholder():
    """The built-in imports torchvision only for its AlexNet side network. PyPI's torchvision wheels are CUDA
    builds that cannot load beside a CPU torch wheel, so to run the built-in's model code on *our* CPU torch
    (same build, same libraries mapped, a like-for-like memory figure) this puts an empty module in its place
    after transformers has probed the real packages. Touching any attribute of it raises."""
    import types

    def missing(name):
        raise ImportError(f'torchvision is a benchmark placeholder here: torchvision.{name} is unavailable')
    module = types.ModuleType('torchvision')
    module.__getattr__ = missing
    sys.modules['torchvision'] = module


def set_cpu_allocator(kind: str) -> bool:
    """The package's own train.cpu_allocator code, loaded by file path so the built-in's venv can use it too."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'modelscope_utuning', 'training',
                        'memory.py')
    spec = importlib.util.spec_from_file_location('utuning_memory', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.use_cpu_allocator(kind)


def _cpu() -> dict:
    """lscpu's model name and the vector / matrix flags, recorded beside every figure."""
    import subprocess
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
    except OSError:
        return {}
    info = dict(line.split(':', 1) for line in out.splitlines() if ':' in line)
    flags = [f for f in info.get('Flags', '').split() if f.startswith(('avx', 'amx')) or f in ('fma', 'f16c')]
    return {'cpu': info.get('Model name', '').strip(), 'cpu_flags': ' '.join(flags)}


def _kernels(impl: str) -> dict:
    if impl != 'ours':
        return {}
    from modelscope_utuning.backbone import kernels
    return {k: v for k, v in kernels.chosen().items()}


def _int8_kernel() -> str:
    from modelscope_utuning.backbone import int8
    return int8.kernel()


def load(impl: str, model_dir: str):
    if impl == 'ours':
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
        import modelscope_utuning  # noqa: F401  (registers our model)
    from modelscope.models import Model
    if impl == 'builtin':
        try:
            import torchvision  # noqa: F401
        except Exception:
            _torchvision_placeholder()
    model = Model.from_pretrained(model_dir)
    if impl == 'builtin':
        # A stray import of our package (e.g. a module on sys.path shadowing one that another library probes)
        # would register our model under the same type and measure it in the built-in's place.
        if 'modelscope_utuning' in sys.modules or not type(model).__module__.startswith('modelscope.'):
            sys.exit(f'the built-in run loaded {type(model).__module__}: not ModelScope\'s own code')
        for name, p in model.named_parameters():
            p.requires_grad = any(k in name for k in TUNER_KEYS) and 'backbone.head' not in name
    return model


def run_onnx(args) -> None:
    """Inference of an ONNX export with onnxruntime (its configuration says fp32 or int8), same JSON line."""
    from modelscope_utuning.deploy.onnx_export import OnnxClassifier
    clf = OnnxClassifier(args.onnx_dir, threads=args.threads or None)
    size = clf.config['model']['img_size']
    x = torch.randn(args.batch, 3, *size).numpy()
    for _ in range(1 + args.warmup):
        clf.run(x)
    t = time.perf_counter()
    for _ in range(args.steps):
        clf.run(x)
    dt = (time.perf_counter() - t) / args.steps
    print(json.dumps({'impl': 'onnx', 'mode': 'infer', 'precision': clf.config['onnx'].get('precision', 'fp32'),
                      'batch': args.batch, 'img_per_s': round(args.batch / dt, 3), 's_per_step': round(dt, 3),
                      'peak_rss_gb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
                      'gflops_achieved': round(args.batch / dt * 35.1, 1), 'threads': args.threads or None,
                      'model_dir': args.onnx_dir, **_cpu()}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--impl', choices=('ours', 'builtin', 'onnx'), required=True)
    ap.add_argument('--model-dir', required=True)
    ap.add_argument('--mode', choices=('train', 'infer'), default='train')
    ap.add_argument('--precision', choices=('fp32', 'bf16', 'int8'), default='fp32',
                    help="int8: ours, inference: the frozen linears as int8 products (pipeline precision='int8')")
    ap.add_argument('--onnx-dir', help="--impl onnx: a folder written by 'modelscope-utuning export --onnx'")
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--steps', type=int, default=6)
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--threads', type=int, default=0)
    ap.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    ap.add_argument('--merge-lora', action='store_true', help='ours: fold LoRA into the weights first')
    ap.add_argument('--calibrate', action='store_true',
                    help='--precision int8: calibrate the smoothing on the (random) input batch first, as '
                         "pipeline(..., calibration=...) does on images (same kernels, one multiply more or less)")
    ap.add_argument('--cpu-allocator', choices=('default', 'lean'), default='default',
                    help="malloc setting of train.cpu_allocator, applied to either implementation")
    args = ap.parse_args()
    allocator_changed = set_cpu_allocator(args.cpu_allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.impl == 'onnx':
        return run_onnx(args)
    model = load(args.impl, args.model_dir)
    if args.precision == 'int8':
        if args.impl != 'ours' or args.mode != 'infer':
            raise SystemExit('--precision int8 is our inference path (--impl ours --mode infer)')
        from modelscope_utuning.backbone.linear import quantize_frozen_linears
        quantize_frozen_linears(model)
    if args.merge_lora:
        from modelscope_utuning.model import merge_lora
        model = merge_lora(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    device = torch.device(args.device)
    model.to(device)
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    if args.calibrate:
        if args.precision != 'int8':
            raise SystemExit('--calibrate goes with --precision int8')
        from modelscope_utuning.backbone import int8
        model.eval()
        with torch.no_grad(), int8.calibrating(model):
            model({'imgs': x})
    y = torch.randint(0, 10, (args.batch,), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == 'bf16' else \
        (lambda: torch.autocast(device.type, enabled=False))

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()
    model.train(args.mode == 'train')

    def step():
        if args.mode == 'train':
            with ctx():
                loss = model({'imgs': x, 'labels': y})['loss']
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), ctx():
                model({'imgs': x})

    step()  # the first step chooses our kernels for these shapes (backbone/kernels.py): measure after it
    activation_bytes = None
    if args.mode == 'train':  # bytes autograd keeps for backward during one forward (the activation memory)
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())  # views of one storage count once per save: an upper bound
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx():
            loss = model({'imgs': x, 'labels': y})['loss']
        activation_bytes = sum(saved)
        loss.backward()
        opt.zero_grad(set_to_none=True)
    for _ in range(args.warmup):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t) / args.steps
    ips = args.batch / dt
    flops_per_img = 35.1e9 * (2 if args.mode == 'train' else 1)
    print(json.dumps({
        'impl': args.impl, 'mode': args.mode, 'precision': args.precision, 'batch': args.batch,
        'img_per_s': round(ips, 3), 's_per_step': round(dt, 3),
        'peak_rss_gb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
        'activation_gb': None if activation_bytes is None else round(activation_bytes / 1e9, 3),
        'trainable_params': trainable, 'gflops_achieved': round(ips * flops_per_img / 1e9, 1),
        'gemm_peak_gflops_fp32': round(gemm_peak_gflops(), 1) if device.type == 'cpu' else None,
        'cuda_peak_gb': round(torch.cuda.max_memory_allocated() / 1e9, 3) if device.type == 'cuda' else None,
        'device_name': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu', 'torch': torch.__version__,
        'threads': torch.get_num_threads(), 'model_dir': args.model_dir, 'merge_lora': args.merge_lora,
        **({'int8_kernel': _int8_kernel(), 'calibrated': args.calibrate} if args.precision == 'int8' else {}),
        **_cpu(), 'kernels': _kernels(args.impl),
        'cpu_allocator': args.cpu_allocator if allocator_changed or args.cpu_allocator == 'default' else 'unchanged'}))


if __name__ == '__main__':
    main()
