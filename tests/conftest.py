"""pytest hooks and shared fixtures (the helpers themselves live in tests/helpers: `from tests.helpers import ...`)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import samvit
from tests.helpers import TINY, official_sam, official_tiny_sam, randomize_  # noqa: F401  (former `from conftest`)

# dtype="auto" (the default) picks bfloat16 on CPUs with AVX512-BF16/AMX: the tests compare float32 outputs with the
# reference packages on any machine, so "auto" means float32 here and in the CLI subprocesses (tests of "auto"
# itself unset it).
os.environ.setdefault("SAMVIT_DTYPE", "float32")
samvit.tune_allocator()  # the same allocator setting for samvit and the reference packages in every test


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def official_vit_b(tmp_path_factory):
    """ONE official segment-anything ViT-B Sam with random weights (seed 1) for the whole session, and its
    checkpoint file (official keys). Tests must not modify it."""
    sam = official_sam("vit_b", seed=1)
    path = tmp_path_factory.mktemp("vit_b") / "sam_vit_b_random.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


@pytest.fixture
def one_thread():
    """torch on one thread for the test, as the subprocesses run (OMP_NUM_THREADS=1): in-process runs then compute
    bit for bit what they compute. Modules take it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """A real photo, 512x512 RGB uint8."""
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def coffee() -> np.ndarray:
    """A real photo of non-square size, 400x600 RGB uint8."""
    from skimage import data

    return data.coffee()


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> str:
    """A TINY encoder with random weights (seed 1) as samvit safetensors; modules may define their own `ckpt`."""
    from samvit.modeling.encoder import ImageEncoder

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    samvit.save_encoder(randomize_(ImageEncoder(TINY), seed=1), path)
    return str(path)
