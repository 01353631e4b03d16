import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random Mixtral checkpoint folder, one per test module."""
    from tiny import save_tiny_checkpoint

    return save_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: tiny forwards only wait on a second thread (many times slower
    on 2 busy cores), and records of parallel workers then compare exactly (same summation order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
