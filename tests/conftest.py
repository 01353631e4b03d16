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


@pytest.fixture(scope="module")
def shards_by_family(tmp_path_factory):
    """Expert shards of the tiny Mixtral and Qwen2-MoE, by (layer, expert)."""
    from tiny import tiny_model
    from wdmoe.models.split import split_model
    from wdmoe.runtime.cluster import shard_key

    out = {}
    for family in ("mixtral", "qwen2_moe"):
        folder = tmp_path_factory.mktemp(family)
        out[family] = {shard_key(p): p for p in split_model(tiny_model(family), folder)}
    return out


@pytest.fixture
def lab_factory(shards_by_family):
    """Labs (a BS and in-process devices on a tiny model), all closed after the test."""
    from lab import Lab

    labs = []

    def make(family="mixtral", **kwargs):
        labs.append(Lab(family, shards_by_family[family], **kwargs))
        return labs[-1]

    yield make
    for lab in labs:
        lab.close()
