"""Shared test fixtures."""
import os
import tempfile

import pytest
import torch

# The kernel choices (backbone/kernels.py) of this test session live in a file of its own, shared with the
# subprocesses the tests start (a run and its resume make the same choices), and not in the user's cache.
os.environ.setdefault('UTUNING_KERNEL_CACHE', os.path.join(tempfile.mkdtemp(prefix='utuning-kernels-'),
                                                           'kernels.json'))


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models run faster single-threaded on a busy 2-core machine; restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
