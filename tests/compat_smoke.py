"""ModelScope compatibility smoke: the package's whole user flow on whatever ModelScope release is installed.

    python tests/compat_smoke.py

Standalone (not collected by pytest), offline (every socket lookup or connect fails and is counted), about half
a minute on 2 CPU cores. It builds a tiny hub-layout model folder whose configuration carries the usual training
section (AdamW, cosine schedule with ModelScope's LinearWarmup), then:
  1. ``import modelscope_utuning``;
  2. ``pipeline('vision-efficient-tuning', folder)(image)``;
  3. ``build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(model=folder, work_dir, train_dataset
     (an MsDataset), eval_dataset (an image folder), cfg_modify_fn))`` with the README's cfg_modify_fn edits
     (head.num_classes, finetune, max_epochs, lr_scheduler.T_max), ``train()`` for one epoch, ``evaluate()``;
  4. reloads ``work_dir/output`` with ``pipeline()`` (as a relative ``work/output`` path, which reads like a
     hub id) and ``Model.from_pretrained``: same weights and the same predictions as the trained model.
Exit status 0 when everything holds; the first failure raises.
"""
import json
import os
import socket
import sys
import tempfile
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

NETWORK_ATTEMPTS = []


def _refuse_lookup(host, *args, **kwargs):
    NETWORK_ATTEMPTS.append(host)
    raise socket.gaierror(f'compat smoke runs offline ({host})')


_connect = socket.socket.connect


def _refuse_connect(sock, address, *args):
    if sock.family not in (socket.AF_INET, socket.AF_INET6):  # local sockets (multiprocessing) are fine
        return _connect(sock, address, *args)
    NETWORK_ATTEMPTS.append(address)
    raise OSError(f'compat smoke runs offline ({address})')


socket.getaddrinfo = _refuse_lookup
socket.socket.connect = _refuse_connect

T0 = time.time()
TASK = 'vision-efficient-tuning'
CLASSES = ['bright', 'dark', 'mid']  # sorted: an image folder lists its classes in this order too


def step(message):
    print(f'[{time.time() - T0:6.1f}s] {message}', flush=True)


def write_images(root, per_class=4):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    rows = []
    for label, name in enumerate(CLASSES):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        level = {'dark': 20, 'mid': 110, 'bright': 200}[name]
        for i in range(per_class):
            path = os.path.join(root, name, f'{i}.png')
            Image.fromarray((rng.random((40, 48, 3)) * 50 + level).astype('uint8')).save(path)
            rows.append({'img_path:FILE': path, 'label': label})
    return rows


def make_model_dir(folder):
    """A tiny ViT (embed 32, depth 2) with an adapter and 5 classes, in the hub layout, configured like the
    hub's U-Tuning models (a LinearWarmup in the training schedule)."""
    import torch
    from modelscope_utuning import VisionEfficientTuningModel
    backbone = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=4, num_classes=0,
                    tuners=[{'type': 'adapter', 'dim': 8}])
    head = {'num_classes': 5}
    cfg = {
        'framework': 'pytorch', 'task': TASK, 'pipeline': {'type': TASK},
        'model': {'type': TASK, 'backbone': backbone, 'head': head, 'finetune': False,
                  'pretrained_cfg': {'unload_part': {'head': ['fc']}}},
        'preprocessor': {'type': 'vision-efficient-tuning-preprocessor', 'img_size': 32, 'resize': 36},
        'train': {
            'max_epochs': 100,
            'dataloader': {'batch_size_per_gpu': 4, 'workers_per_gpu': 0},
            'optimizer': {'type': 'AdamW', 'lr': 1e-3, 'weight_decay': 1e-4},
            'lr_scheduler': {'type': 'CosineAnnealingLR', 'T_max': 100,
                             'options': {'by_epoch': True, 'warmup': {'type': 'LinearWarmup', 'warmup_iters': 10}}},
            'hooks': [{'type': 'CheckpointHook', 'interval': 1}, {'type': 'TextLoggerHook', 'interval': 1},
                      {'type': 'IterTimerHook'}, {'type': 'EvaluationHook', 'interval': 1}]},
        'evaluation': {'dataloader': {'batch_size_per_gpu': 4, 'workers_per_gpu': 0, 'shuffle': False},
                       'metrics': ['accuracy']},
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'configuration.json'), 'w') as f:
        json.dump(cfg, f, indent=2)
    torch.manual_seed(0)
    model = VisionEfficientTuningModel(model_dir=None, backbone=backbone, head=head,
                                       CLASSES=['ant', 'bee', 'cat', 'dog', 'eel'])
    model.save_hub_checkpoint(folder)
    return folder


def keys_anywhere(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from keys_anywhere(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from keys_anywhere(v)


def main():
    import torch
    torch.set_num_threads(min(2, torch.get_num_threads()))

    step('1. import modelscope_utuning')
    import modelscope
    import modelscope_utuning
    print(f'    modelscope {modelscope.__version__}, torch {torch.__version__}, '
          f'modelscope_utuning {modelscope_utuning.__version__}', flush=True)
    import datasets
    from modelscope.metainfo import Trainers
    from modelscope.models import Model
    from modelscope.msdatasets import MsDataset
    from modelscope.pipelines import pipeline
    from modelscope.trainers import build_trainer
    from modelscope_utuning.pipeline import VisionEfficientTuningPipeline

    tmp = tempfile.mkdtemp(prefix='utuning-compat-smoke-')
    os.chdir(tmp)
    model_dir = make_model_dir(os.path.join(tmp, 'model'))
    rows = write_images(os.path.join(tmp, 'train'))
    write_images(os.path.join(tmp, 'val'), per_class=2)
    image = rows[0]['img_path:FILE']

    step('2. pipeline() on a local model folder')
    out = pipeline(TASK, model_dir, device='cpu')(image)
    assert len(out['scores']) == 5 and out['labels'][0] in ('ant', 'bee', 'cat', 'dog', 'eel'), out

    step('3. build_trainer() + train() one epoch + evaluate()')
    features = datasets.Features({'img_path:FILE': datasets.Value('string'),
                                  'label': datasets.ClassLabel(names=CLASSES)})
    train_ds = MsDataset.to_ms_dataset(datasets.Dataset.from_list(rows, features=features))

    def cfg_modify_fn(cfg):
        cfg.model.head.num_classes = len(CLASSES)
        cfg.model.finetune = True
        cfg.train.max_epochs = 1
        cfg.train.lr_scheduler.T_max = 1
        return cfg

    work_dir = os.path.join(tmp, 'work')
    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=model_dir, work_dir=work_dir, train_dataset=train_ds, eval_dataset=os.path.join(tmp, 'val'),
        cfg_modify_fn=cfg_modify_fn))
    trainer.train()
    results = trainer.evaluate()
    print(f'    evaluate(): {results}', flush=True)
    assert 0.0 <= results['accuracy'] <= 1.0, results
    trained = trainer.model_unwrapped.eval()

    step('4. reload work_dir/output with pipeline() and Model.from_pretrained')
    output = os.path.join(work_dir, 'output')
    saved = json.load(open(os.path.join(output, 'configuration.json')))
    assert saved['model']['head']['num_classes'] == len(CLASSES), saved['model']
    assert saved['train']['lr_scheduler']['options']['warmup']['type'] == 'LinearWarmup', saved['train']
    assert 'trust_remote_code' not in set(keys_anywhere(saved)), 'a stray trust_remote_code in the saved config'
    reloaded = pipeline(TASK, os.path.relpath(output, tmp), device='cpu')  # 'work/output': one slash
    in_memory = VisionEfficientTuningPipeline(trained, preprocessor=reloaded.preprocessor, device='cpu')
    images = [r['img_path:FILE'] for r in rows]
    got, expected = reloaded(images), in_memory(images)
    for g, e in zip(got, expected):
        assert g['labels'] == e['labels'] and max(abs(a - b) for a, b in zip(g['scores'], e['scores'])) < 1e-6, \
            (g, e)
    assert got[0]['labels'][0] in CLASSES, got[0]
    model = Model.from_pretrained(output)
    state, trained_state = model.state_dict(), trained.state_dict()
    assert state.keys() == trained_state.keys()
    assert all(torch.equal(state[k], trained_state[k]) for k in state), 'reloaded weights differ'

    assert not NETWORK_ATTEMPTS, f'network attempts: {NETWORK_ATTEMPTS}'
    step(f'compat smoke OK on modelscope {modelscope.__version__}: top-1 {got[0]["labels"][0]} '
         f'{got[0]["scores"][0]:.4f}, accuracy {results["accuracy"]:.3f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
