"""train.cpu_allocator (training/memory.py): 'lean' makes freed tensor memory leave the process at once.

mallopt is process-wide, so each case runs in a fresh interpreter.
"""
import subprocess
import sys
import textwrap

import pytest

from modelscope_utuning.training import memory
from modelscope_utuning.training.memory import use_cpu_allocator

SCRIPT = textwrap.dedent('''
    import importlib.util
    import sys
    import torch

    # the module alone, by path: importing the package would import ModelScope (seconds) for nothing
    spec = importlib.util.spec_from_file_location('memory', sys.argv[2])
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    use_cpu_allocator = memory.use_cpu_allocator

    def rss():
        return int(open('/proc/self/statm').read().split()[1]) * 4096

    changed = use_cpu_allocator(sys.argv[1])
    # glibc raises its mmap threshold to the size of a freed mapped block (here 16 MiB); smaller blocks then come
    # from the heap, and a small allocation kept after each one keeps it from merging into a trimmable heap top
    first = torch.ones(4 * 1024 * 1024)
    del first
    base = rss()
    blocks, pins = [], []
    for _ in range(24):  # 24 x 8 MiB
        blocks.append(torch.ones(2 * 1024 * 1024))
        pins.append(torch.ones(1024))
    del blocks
    print(changed, (rss() - base) / 2 ** 20)
''')


def run(kind):
    out = subprocess.run([sys.executable, '-c', SCRIPT, kind, memory.__file__], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    changed, retained_mib = out.stdout.split()
    return changed == 'True', float(retained_mib)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings')
def test_lean_returns_freed_tensors_that_the_default_keeps():
    changed, retained = run('lean')
    assert changed and retained < 8
    changed, retained = run('default')
    assert not changed and retained > 32  # glibc keeps part of the 192 MiB (64-128 MiB in repeated runs)


def test_unknown_allocator_is_named():
    with pytest.raises(ValueError, match=r"train.cpu_allocator='fast'.*default.*lean"):
        use_cpu_allocator('fast')
