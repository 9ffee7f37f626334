"""Make the ViT-B/16 model folders the speed benchmark loads (random weights, hub layout, our code only).

    python benchmarks/make_models.py /tmp/bench

The U-Tuning folder the built-in also loads (prompt + prefix + adapter, length 10, 100 classes) comes from
``/opt/refvenv/bin/python tests/fixtures/make_builtin_vitb16_reference.py /tmp/bench/utuning`` (ModelScope's own
code); this script adds the variants only we have: the parallel tri-tuner, its bypass form, LoRA and a plain
backbone (for the merged-LoRA comparison).
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from modelscope_utuning.model import VisionEfficientTuningModel  # noqa: E402
from modelscope_utuning.training.defaults import model_configuration  # noqa: E402

VIT_B16 = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=0)
TRI = [{'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 10},
       {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 10},
       {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 10}]
VARIANTS = {
    'tri': dict(VIT_B16, tuners=TRI),
    'tri_bypass': dict(VIT_B16, tuners=TRI, bypass=True),
    'lora': dict(VIT_B16, lora_length=10),
    'plain': dict(VIT_B16),
}


def main(root):
    for name, backbone in VARIANTS.items():
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        torch.manual_seed(0)
        model = VisionEfficientTuningModel(backbone=backbone, head={'num_classes': 100})
        for n, p in model.named_parameters():
            if p.requires_grad:  # tuners start silent; give them values so they cost what they cost
                p.data.normal_(0, 0.02)
        model.save_hub_checkpoint(folder)
        cfg = model_configuration(backbone, {'type': 'ClassifierHead', 'dim': 768, 'num_classes': 100})
        with open(os.path.join(folder, 'configuration.json'), 'w') as f:
            json.dump(cfg, f, indent=2)
        print('wrote', folder)


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else '/tmp/bench')
