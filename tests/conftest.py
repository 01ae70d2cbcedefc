"""Shared test helpers: random weights for official and samvit models, tiny configs, real test images."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import samvit
from samvit import EncoderConfig
from samvit.bench.weights import randomize_  # noqa: F401  (the tests import it from here)

# dtype="auto" (the default) picks bfloat16 on CPUs with AVX512-BF16/AMX: the tests compare float32 outputs with the
# reference packages on any machine, so "auto" means float32 here and in the CLI subprocesses (tests of "auto"
# itself unset it).
os.environ.setdefault("SAMVIT_DTYPE", "float32")
samvit.tune_allocator()  # the same allocator setting for samvit and the reference packages in every test

TINY = EncoderConfig(img_size=256, embed_dim=64, depth=3, num_heads=2, window_size=4, global_attn_indexes=(1,),
                     out_chans=32, name="tiny")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def official_sam(model_type: str = "vit_b", seed: int = 0, **encoder_overrides):
    """The official segment-anything Sam of a released type, every parameter randomised, in eval mode."""
    from segment_anything import sam_model_registry

    torch.manual_seed(seed)
    sam = sam_model_registry[model_type]()
    return randomize_(sam, seed).eval()


def official_tiny_sam(cfg: EncoderConfig = TINY, seed: int = 0):
    """An official Sam whose image encoder has the given (small) config, every parameter randomised."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    enc = ImageEncoderViT(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                          num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, out_chans=cfg.out_chans,
                          qkv_bias=cfg.qkv_bias, norm_layer=partial(torch.nn.LayerNorm, eps=cfg.norm_eps),
                          use_abs_pos=cfg.use_abs_pos, use_rel_pos=cfg.use_rel_pos, window_size=cfg.window_size,
                          global_attn_indexes=cfg.global_attn_indexes)
    grid = cfg.grid_size
    sam = Sam(image_encoder=enc,
              prompt_encoder=PromptEncoder(embed_dim=cfg.out_chans, image_embedding_size=(grid, grid),
                                           input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=16),
              mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                       transformer=TwoWayTransformer(depth=2, embedding_dim=cfg.out_chans,
                                                                     mlp_dim=64, num_heads=2),
                                       transformer_dim=cfg.out_chans, iou_head_depth=3, iou_head_hidden_dim=64))
    torch.manual_seed(seed)
    return randomize_(sam, seed).eval()


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
