"""Shared test fixtures."""
import pytest
import torch


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models run faster single-threaded on a busy 2-core machine; restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
