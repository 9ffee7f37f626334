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


# What `pytest -m "not slow"` leaves out for a short loop (CI and the README's command run everything): whole files
# and single tests that start other processes, a browser or a real backbone. Node ids by prefix.
SLOW = (
    'tests/test_real_training.py',       # the real DINOv2 backbone, trained
    'tests/test_real_segmentation.py',   # the same, segmentation
    'tests/test_fault_injection.py',     # training processes killed at each write
    'tests/test_web_app.py',             # a headless browser and a served app
    'tests/test_cli_resume.py',          # CLI runs killed and resumed
    'tests/test_demo.py::test_quick_demo_end_to_end',
    'tests/test_segmentation.py::test_segmentation_demo_runs_end_to_end_from_the_cli',
    'tests/test_segmentation.py::test_onnx_export_of_a_segmentation_model_answers_as_the_pipeline',
    'tests/test_segmentation.py::test_evaluate_on_two_ranks_counts_each_image_once',
    'tests/test_reported_metrics.py::test_evaluate_equals_pipeline_on_two_ranks_for_every_source',
    'tests/test_trainer.py::test_two_process_gloo_data_parallel',
    'tests/test_trainer.py::test_kill_and_resume_ends_like_an_uninterrupted_run',
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        node = item.nodeid.replace(os.sep, '/')
        if any(node == s or node.startswith(s + '::') or node.startswith(s + '[') for s in SLOW):
            item.add_marker(pytest.mark.slow)
