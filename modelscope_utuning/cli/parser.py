"""The argument parser: one sub-command per job, each calling its ``cmd_*`` function."""
from __future__ import annotations

import argparse

from .. import __version__
from .common import PROG, TOKEN_ENV, Parser
from .export import cmd_export
from .predict import cmd_predict
from .publish import cmd_demo, cmd_presets, cmd_push, cmd_serve
from .train import cmd_eval, cmd_train

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description='U-Tuning (arXiv 2303.00690) for ModelScope: parameter-efficient '
                     'tuning of vision transformers.', epilog='See `modelscope-utuning COMMAND --help`.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    parser.add_argument('--traceback', action='store_true', help='show the full traceback when a command fails')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')

    p = sub.add_parser('train', help='fine-tune a model (U-Tuners + head) on a dataset',
                       description='Fine-tune MODEL on --train-data through ModelScope\'s trainer; the result is '
                       'WORK_DIR/output, a model folder for pipeline() / predict / push. Overrides: key=value '
                       '(JSON values), e.g. train.max_epochs=20 model.backbone.tuners=\'[{"type": "adapter", '
                       '"op": "ffn", "form": "parallel", "dim": 10}]\'.')
    p.add_argument('model', help='model folder, hub id, preset name or configuration .json')
    p.add_argument('overrides', nargs='*', metavar='key=value', help='configuration overrides')
    p.add_argument('--train-data', required=True, metavar='DATA', help='image folder, manifest or list file')
    p.add_argument('--eval-data', metavar='DATA', help='evaluated after training (class names as --train-data)')
    p.add_argument('--work-dir', help='default: work_dirs/<model>-<time>')
    p.add_argument('--epochs', type=int, help='train.max_epochs (and the cosine schedule\'s T_max)')
    p.add_argument('--batch-size', type=int, help='train.dataloader.batch_size_per_gpu')
    p.add_argument('--lr', type=float, help='train.optimizer.lr')
    p.add_argument('--backbone-weights', metavar='FILE',
                   help='pre-trained backbone (timm / HF / hub layout) for a model folder or preset without weights')
    p.add_argument('--resume', action='store_true',
                   help='continue the run in --work-dir from its newest readable epoch_N.pth (an unreadable newest '
                   'one falls back to the one before; none: start at epoch 1); without it, a work dir holding epoch '
                   'files is refused')
    p.add_argument('--json', action='store_true', help='print the result as JSON')
    p.set_defaults(func=cmd_train)

    p = sub.add_parser('eval', help='evaluate a trained model on a dataset',
                       description='Accuracy (and top-5 with more than 5 classes) of MODEL on --data; image-folder '
                       'classes are matched to the model\'s class names.')
    p.add_argument('model', help='trained model folder or hub id')
    p.add_argument('--data', required=True, metavar='DATA', help='image folder, manifest or list file')
    p.add_argument('--batch-size', type=int)
    p.add_argument('--work-dir', help='keep the evaluation logs here (default: a temporary folder)')
    p.add_argument('--json', action='store_true', help='print the metrics as JSON')
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser('predict', help='classify images (files, folders or URLs)',
                       description='Top-k classes of each image through pipeline(\'vision-efficient-tuning\').')
    p.add_argument('model', help='trained model folder or hub id; several, comma-separated, give one column each '
                              '(models on one backbone share it)')
    p.add_argument('inputs', nargs='+', metavar='IMAGE', help='image files, folders (searched recursively) or URLs')
    p.add_argument('--also', action='append', metavar='MODEL', help='a further model (repeatable)')
    p.add_argument('--backbone', metavar='FILE_OR_FOLDER',
                   help='the frozen backbone for model folders that hold only tuners (export --tuner-only)')
    p.add_argument('--topk', type=int, default=1, help='classes per image (default 1)')
    p.add_argument('--batch-size', type=int, default=16, help='images per forward pass (default 16)')
    p.add_argument('--device', default=None, help="'cpu', 'gpu' or 'cuda:N' (default: a GPU when there is one)")
    p.add_argument('--json', action='store_true', help='print a JSON list instead of a table')
    p.add_argument('--output', '-o', metavar='FILE', help='write the table / JSON to FILE')
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser('export', help='write tuner-only weights, a model folder with LoRA merged, or ONNX',
                       description='--tuner-only: adapter_model.safetensors + adapter_config.json (tuners, BitFit '
                       'biases, head; no backbone). --merge-lora: fold LoRA into the frozen weights and write a '
                       'new model folder that runs without the low-rank branch. --onnx: model.onnx (dynamic batch, '
                       'mergeable tuners folded in) + configuration.json + preprocessing.json, checked against '
                       'torch with onnxruntime (extra [onnx]).')
    p.add_argument('model', help='trained model folder or hub id')
    p.add_argument('out_dir', help='folder to write (must be new or empty unless --force)')
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument('--tuner-only', action='store_true')
    mode.add_argument('--merge-lora', action='store_true')
    mode.add_argument('--onnx', action='store_true')
    p.add_argument('--opset', type=int, help='with --onnx: ONNX opset (default: the exporter\'s)')
    p.add_argument('--int8', action='store_true',
                   help='with --onnx: int8 weights for the matrix products (onnxruntime\'s dynamic quantizer; '
                        'the head stays fp32)')
    p.add_argument('--base-weights', metavar='FILE',
                   help='with --tuner-only: record this frozen backbone file for model_from_tuners()')
    p.add_argument('--force', action='store_true', help='write into a non-empty folder')
    p.set_defaults(func=cmd_export)

    p = sub.add_parser('push', help='upload a model folder to the ModelScope hub',
                       description=f'Create OWNER/NAME if needed and upload MODEL_DIR with HubApi; the token comes '
                       f'from ${TOKEN_ENV}.')
    p.add_argument('model_dir', help='model folder (e.g. WORK_DIR/output)')
    p.add_argument('repo_id', metavar='OWNER/NAME')
    p.add_argument('--public', action='store_true', help='create the repository public (default private)')
    p.add_argument('--message', '-m', help='commit message')
    p.add_argument('--revision', default=None, help='branch to commit to (default master)')
    p.set_defaults(func=cmd_push)

    p = sub.add_parser('serve', help='web demo: upload an image, see its top-5 labels (Gradio)',
                       description='A Gradio page for MODEL through pipeline(\'vision-efficient-tuning\'); offline '
                       '(no analytics, no share link, system fonts). Needs the extra [gradio].')
    p.add_argument('model', help='trained model folder or hub id')
    p.add_argument('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1; 0.0.0.0 for all)')
    p.add_argument('--port', type=int, default=7860, help='default 7860')
    p.add_argument('--topk', type=int, default=5, help='labels shown (default 5)')
    p.add_argument('--device', default=None, help="'cpu', 'gpu' or 'cuda:N' (default: a GPU when there is one)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser('demo', help='the embedded demo: pre-train a tiny ViT, U-Tune it, predict (CPU, offline)',
                       description='Runs offline in a few minutes on 2 CPU cores on Fashion-MNIST images shipped '
                       'with the package; --quick takes well under a minute.')
    p.add_argument('--quick', action='store_true', help='a smaller, faster run')
    p.add_argument('--work-dir', help='default: a new temporary folder (kept)')
    p.add_argument('--show-logs', action='store_true', help="show ModelScope's training logs on the console")
    p.add_argument('--threads', type=int, help='torch threads (default 1: steady on a busy 2-core machine; '
                   '0: torch default)')
    p.add_argument('--json', action='store_true', help='also print the measured numbers as JSON')
    p.add_argument('--segmentation', action='store_true',
                   help='the semantic-segmentation demo instead: scenes composed from the same images')
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser('presets', help='list the configuration presets')
    p.set_defaults(func=cmd_presets)
    return parser

