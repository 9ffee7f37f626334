"""Registration: importing the package loads only the model side; ModelScope's builders load the rest on demand,
always our classes, never the built-in module. Runs in a fresh interpreter (the test session imports everything).
A trained folder of ours loaded without the plugin says which package it needs."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from colour_runs import trained  # noqa: F401  (a fixture)

SCRIPT = textwrap.dedent('''
    import sys
    import modelscope_utuning
    from modelscope_utuning.registration import ENTRIES

    lazy = ['modelscope_utuning.pipeline', 'modelscope_utuning.training.trainer', 'modelscope_utuning.training.metrics',
            'modelscope_utuning.preprocessing.preprocessor', 'modelscope_utuning.segmentation.pipeline',
            'modelscope_utuning.segmentation.trainer', 'modelscope_utuning.segmentation.metrics',
            'modelscope.pipelines.builder', 'modelscope.trainers.builder']
    print('loaded after import:', [m for m in lazy if m in sys.modules])

    from modelscope.metrics.builder import build_metric
    print('metric:', type(build_metric('vision-efficient-tuning-top5')).__module__)

    import importlib
    from modelscope.utils.import_utils import LazyImportModule
    for registry, group, name, module, qualname in ENTRIES:
        LazyImportModule.import_module((registry.upper(), group, name))  # what build_from_cfg does first
        builder = importlib.import_module('modelscope.%s.builder' % registry)
        cls = getattr(builder, registry.upper()).get(name, group_key=group)
        print('built:', registry, cls.__module__ + '.' + cls.__name__ == module + '.' + qualname)
    print('builtin imported:', any('cv.vision_efficient_tuning' in m for m in sys.modules))
''')


def test_import_is_light_and_builders_load_our_classes():
    out = subprocess.run([sys.executable, '-c', SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if ':' in line]
    assert lines[0] == 'loaded after import: []'
    assert lines[1] == 'metric: modelscope_utuning.training.metrics'
    built = [line for line in lines if line.startswith('built:')]
    # classification, then segmentation (the same registries in the same order)
    per_task = ('models', 'models', 'pipelines', 'pipelines', 'preprocessors', 'trainers', 'metrics')
    segmentation = ('models', 'pipelines', 'pipelines', 'preprocessors', 'trainers', 'metrics')
    assert built == [f'built: {r} True' for r in per_task + segmentation]
    assert lines[-1] == 'builtin imported: False'


# -- a folder of ours loaded without the plugin names the package (issue 11) -------------------------------------------
@pytest.mark.usefixtures('one_thread')
def test_a_folder_of_ours_without_the_plugin_names_the_package(trained):
    root, out = trained
    cfg = json.load(open(os.path.join(out, 'configuration.json')))
    assert cfg['model']['type'] == cfg['pipeline']['type'] == 'vision-efficient-tuning@modelscope-utuning'
    script = textwrap.dedent(f'''
        from modelscope.pipelines import pipeline
        try:
            pipeline('vision-efficient-tuning', {out!r}, device='cpu')
        except Exception as e:
            print('ERROR', e)
    ''')
    res = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
    assert 'ERROR' in res.stdout and 'modelscope-utuning' in res.stdout, res.stdout + res.stderr[-2000:]
