"""Predictor parity with the official SamPredictor (same random weights), embeddings, prompt errors, decoder loading."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tests._masks_utils import liven_decoder_, samvit_models
from tests.helpers import TINY, official_sam, official_tiny_sam

from samvit import CheckpointError, Predictor, PromptError, load_decoder
from samvit.checkpoints.load import infer_decoder_config
from samvit.embeddings.files import save_embedding
from samvit.config import DecoderConfig

TOL = 1e-4
H, W = 400, 600  # skimage coffee
POINT = dict(point_coords=np.array([[350.0, 180.0]]), point_labels=np.array([1]))
POINTS = dict(point_coords=np.array([[350.0, 180.0], [120.5, 300.25]]), point_labels=np.array([1, 0]))
EDGES = dict(point_coords=np.array([[0.0, 0.0], [600.0, 400.0]]), point_labels=np.array([1, 1]))
BOX = dict(box=np.array([60.0, 40.0, 420.0, 350.0]))
POINT_BOX = dict(point_coords=np.array([[250.0, 200.0]]), point_labels=np.array([0]), box=np.array([60, 40, 420, 350]))
CASES = {"point": POINT, "points": POINTS, "edges": EDGES, "box": BOX, "point+box": POINT_BOX}


def assert_same_prediction(official, ours, kwargs, multimask):
    """Low-res logits and IoU within TOL; thresholded masks identical except where the logit is within TOL of 0."""
    m0, i0, l0 = official.predict(**kwargs, multimask_output=multimask)
    f0, _, _ = official.predict(**kwargs, multimask_output=multimask, return_logits=True)
    m1, i1, l1 = ours.predict(**kwargs, multimask_output=multimask)
    assert m1.dtype == np.bool_ and m1.shape == m0.shape == (3 if multimask else 1, H, W)
    assert l1.shape == l0.shape and i1.shape == i0.shape
    assert np.abs(l1 - l0).max() <= TOL
    assert np.abs(i1 - i0).max() <= TOL
    assert not ((m0 != m1) & (np.abs(f0) > TOL)).any()
    return l0


@pytest.fixture(scope="module")
def tiny(coffee):
    """(official SamPredictor, samvit Predictor) on the tiny random model, both with the coffee photo set."""
    from segment_anything import SamPredictor

    sam = liven_decoder_(official_tiny_sam())
    official = SamPredictor(sam)
    official.set_image(coffee)
    ours = Predictor(*samvit_models(sam, TINY, num_heads=2))
    ours.set_image(coffee)
    return official, ours


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_tiny_prompts_match_official(tiny, case, multimask):
    official, ours = tiny
    assert ours.input_size == tuple(official.input_size) and ours.original_size == (H, W)
    assert torch.equal(ours.features, official.features)  # reference attention: bit-identical embedding
    assert_same_prediction(official, ours, CASES[case], multimask)


def test_tiny_comparisons_are_not_vacuous(tiny):
    """Most masks of the cases above are neither empty nor full, and few logits are near 0."""
    official, _ = tiny
    fractions, near_zero = [], []
    for kwargs in CASES.values():
        logits = official.predict(**kwargs, multimask_output=True, return_logits=True)[0]
        fractions += list((logits > 0).mean((1, 2)))
        near_zero.append((np.abs(logits) <= TOL).mean())
    assert np.mean([0.01 < f < 0.99 for f in fractions]) >= 0.5, fractions
    assert max(near_zero) < 1e-3


@pytest.mark.parametrize("with_points", [True, False])
def test_tiny_mask_input_matches_official(tiny, with_points):
    official, ours = tiny
    _, scores, low = official.predict(**POINTS, multimask_output=True)
    mask_input = low[np.argmax(scores)][None]  # (1, 64, 64) for the tiny model
    kwargs = dict(POINTS if with_points else {}, mask_input=mask_input)
    for multimask in (True, False):
        assert_same_prediction(official, ours, kwargs, multimask)


def test_predict_torch_batches_match_official(tiny):
    """Several boxes, and point sets of unequal length padded with label -1, in one call."""
    official, ours = tiny
    boxes = torch.tensor([[60.0, 40.0, 420.0, 350.0], [0, 0, 600, 400], [300, 100, 310, 120]])
    coords = torch.tensor([[[350.0, 180.0], [120.0, 300.0]], [[10.0, 390.0], [0.0, 0.0]], [[500, 20], [0, 0]]])
    labels = torch.tensor([[1, 0], [1, -1], [0, -1]])
    m1, i1, l1 = ours.predict_torch(coords, labels, boxes, multimask_output=True)
    tf = official.transform  # numpy (float64) transforms, as official predict and the official AMG use
    c0 = torch.as_tensor(tf.apply_coords(coords.numpy(), (H, W)), dtype=torch.float)
    b0 = torch.as_tensor(tf.apply_boxes(boxes.numpy(), (H, W)), dtype=torch.float)
    m0, i0, l0 = official.predict_torch(c0, labels, b0, multimask_output=True)
    f0, _, _ = official.predict_torch(c0, labels, b0, multimask_output=True, return_logits=True)
    assert m1.shape == (3, 3, H, W) and m1.dtype == torch.bool
    assert (l1 - l0).abs().max() <= TOL and (i1 - i0).abs().max() <= TOL
    assert not ((m0 != m1) & (f0.abs() > TOL)).any()
    # an unpadded row of the batch equals predict with that prompt alone (a -1 padding token is still a token
    # the decoder attends to, in the official model too, so padded rows are not compared this way)
    _, i_one, l_one = ours.predict(box=boxes[0].numpy(), point_coords=coords[0].numpy(),
                                   point_labels=labels[0].numpy())
    assert np.abs(l_one - l1[0].numpy()).max() <= TOL and np.abs(i_one - i1[0].numpy()).max() <= TOL


def test_return_logits_and_threshold(tiny):
    _, ours = tiny
    masks, _, _ = ours.predict(**POINT)
    logits, _, _ = ours.predict(**POINT, return_logits=True)
    assert logits.dtype == np.float32
    assert np.array_equal(masks, logits > 0)


def test_set_embedding_from_file_and_tensor(tiny, tmp_path):
    """An embedding saved by samvit.embed gives the same masks with no encoder at all."""
    _, ours = tiny
    path = str(tmp_path / "coffee.safetensors")
    save_embedding(path, ours.features[0].cpu(), ours.original_size, ours.input_size, {"model": "tiny"})
    no_encoder = Predictor(None, ours.decoder)
    with pytest.raises(RuntimeError, match="no image set"):
        no_encoder.predict(**POINT)
    with pytest.raises(RuntimeError, match="no image encoder"):
        no_encoder.set_image(np.zeros((10, 10, 3), np.uint8))
    no_encoder.set_embedding(path)
    assert no_encoder.original_size == (H, W) and no_encoder.input_size == ours.input_size
    for kwargs in (POINTS, BOX):
        a, b = ours.predict(**kwargs), no_encoder.predict(**kwargs)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    no_encoder.set_embedding(ours.features, original_size=(H, W))  # input_size derived
    assert no_encoder.input_size == ours.input_size
    with pytest.raises(ValueError, match="expected shape"):
        no_encoder.set_embedding(torch.zeros(32, 8, 8), (H, W))
    with pytest.raises(ValueError, match="does not match original_size"):
        no_encoder.set_embedding(ours.features, (H, W), (256, 256))
    with pytest.raises(ValueError, match="original_size"):
        no_encoder.set_embedding(ours.features)


def test_bgr_and_path_inputs(tiny, coffee, tmp_path):
    from PIL import Image

    _, ours = tiny
    ref = ours.predict(**POINT)[2]
    p = Predictor(ours.encoder, ours.decoder)
    p.set_image(np.ascontiguousarray(coffee[..., ::-1]), image_format="BGR")
    assert np.array_equal(p.predict(**POINT)[2], ref)
    Image.fromarray(coffee).save(tmp_path / "c.png")
    p.set_image(str(tmp_path / "c.png"))
    assert np.array_equal(p.predict(**POINT)[2], ref)


BAD_PROMPTS = [
    (dict(point_coords=[[700.0, 10.0]], point_labels=[1]), "outside the image"),
    (dict(point_coords=[[10.0, -1.0]], point_labels=[1]), "outside the image"),
    (dict(point_coords=[[10.0, 10.0]], point_labels=[2]), "must be 1 .foreground. or 0"),
    (dict(point_coords=[[10.0, 10.0]], point_labels=[-1]), "must be 1 .foreground. or 0"),
    (dict(point_coords=[[10.0, 10.0]], point_labels=[0.5]), "integers"),
    (dict(point_coords=[[10.0, 10.0]]), "point_labels must be given"),
    (dict(point_labels=[1]), "without point_coords"),
    (dict(point_coords=[10.0, 10.0], point_labels=[1]), r"shape \(N, 2\)"),
    (dict(point_coords=[[10.0, 10.0, 1.0]], point_labels=[1]), r"shape \(N, 2\)"),
    (dict(point_coords=[[10.0, 10.0], [20, 20]], point_labels=[1]), "one label per point"),
    (dict(point_coords=[[float("nan"), 10.0]], point_labels=[1]), "NaN"),
    (dict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0)), "no points"),
    (dict(point_coords=[["a", "b"]], point_labels=[1]), "numeric"),
    (dict(box=[100.0, 10.0, 50.0, 200.0]), "x1 >= x0"),
    (dict(box=[10.0, 300.0, 50.0, 200.0]), "y1 >= y0"),
    (dict(box=[10.0, 10.0, 50.0, 500.0]), "outside the image"),
    (dict(box=[10.0, 10.0, 50.0]), "4 numbers"),
    (dict(box=[[0, 0, 10, 10], [0, 0, 20, 20]]), "predict_torch for many boxes"),
    (dict(mask_input=np.zeros((1, 256, 256))), r"mask_input: expected shape \(1, 64, 64\)"),
    (dict(), "no prompt"),
]


@pytest.mark.parametrize("kwargs,match", BAD_PROMPTS)
def test_bad_prompts_rejected(tiny, kwargs, match):
    _, ours = tiny
    with pytest.raises(PromptError, match=match):
        ours.predict(**kwargs)


def test_bad_batched_prompts_rejected(tiny):
    _, ours = tiny
    with pytest.raises(PromptError, match=r"shape \(B, N, 2\)"):
        ours.predict_torch(torch.zeros(2, 2), torch.ones(2))
    with pytest.raises(PromptError, match=r"shape \(B, 4\)"):
        ours.predict_torch(boxes=torch.zeros(4))
    with pytest.raises(PromptError, match="batch sizes differ"):
        ours.predict_torch(torch.zeros(2, 1, 2), torch.ones(2, 1), torch.tensor([[0.0, 0, 5, 5]] * 3))


def test_predict_before_set_image():
    sam = official_tiny_sam()
    p = Predictor(*samvit_models(sam, TINY, num_heads=2))
    with pytest.raises(RuntimeError, match="no image set"):
        p.predict(**POINT)
    with pytest.raises(RuntimeError, match="no image set"):
        p.get_image_embedding()


def test_mismatched_encoder_and_decoder():
    enc, _ = samvit_models(official_tiny_sam(), TINY, num_heads=2)
    from samvit.modeling.sam import SamDecoder

    with pytest.raises(ValueError, match="does not fit the decoder"):
        Predictor(enc, SamDecoder(DecoderConfig()))


def test_load_decoder_file_and_errors(tmp_path):
    sam = official_tiny_sam()
    sd = sam.state_dict()
    path = tmp_path / "tiny_sam.pth"
    torch.save(sd, path)
    cfg = infer_decoder_config(sd)
    assert (cfg.embed_dim, cfg.image_embedding_size, cfg.input_image_size, cfg.mlp_dim, cfg.iou_head_hidden_dim) == (
        32, 16, 256, 64, 64)
    dec = load_decoder(path, cfg.replace(num_heads=2))
    for k, v in dec.state_dict().items():
        assert torch.equal(v, sd[k]), k
    enc_only = tmp_path / "encoder.pth"
    torch.save({k: v for k, v in sd.items() if k.startswith("image_encoder.")}, enc_only)
    with pytest.raises(CheckpointError, match="prompt_encoder"):
        load_decoder(enc_only)
    bad = dict(sd)
    del bad["mask_decoder.iou_token.weight"]
    bad["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 7)
    bad["mask_decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_decoder(bad, cfg)
    msg = str(e.value)
    assert "missing keys: mask_decoder.iou_token.weight" in msg
    assert "unexpected keys: mask_decoder.extra.weight" in msg
    assert "prompt_encoder.no_mask_embed.weight: checkpoint (1, 7) vs model (1, 32)" in msg


def test_from_checkpoint_bfloat16_encoder(tmp_path, coffee):
    """dtype is the encoder's: the decoder stays float32, and bf16 masks agree with fp32 on most pixels."""
    path = tmp_path / "tiny.pth"
    torch.save(liven_decoder_(official_tiny_sam()).state_dict(), path)
    p32 = Predictor.from_checkpoint(path, model=TINY)
    p16 = Predictor.from_checkpoint(path, model=TINY, dtype=torch.bfloat16)
    assert p16.encoder.dtype == torch.bfloat16
    assert p16.decoder.mask_decoder.iou_token.weight.dtype == torch.float32
    for p in (p32, p16):
        p.set_image(coffee)
    assert p16.features.dtype == torch.float32
    a, b = p32.predict(**POINTS)[0], p16.predict(**POINTS)[0]
    assert (a == b).mean() > 0.9
    no_enc = Predictor.from_checkpoint(path, model=TINY, with_encoder=False)
    assert no_enc.encoder is None and no_enc.decoder.config == p32.decoder.config


def test_decoder_matches_transformers_sam(tiny):
    """The key map to transformers: the same weights in transformers.SamModel give the same low-res logits."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig
    from transformers import SamModel

    from samvit.checkpoints.keymaps import from_official, to_official
    from samvit.checkpoints.keymaps import decoder_state_dict

    _, ours = tiny
    sd = ours.decoder.state_dict()
    config = SamConfig(
        vision_config=SamVisionConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=256,
                                      patch_size=16, output_channels=32, global_attn_indexes=[0], mlp_dim=128,
                                      num_pos_feats=16),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=32, image_size=256, patch_size=16,
                                                     mask_input_channels=16),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 mlp_dim=64, iou_head_hidden_dim=64, iou_head_depth=3))
    hf = SamModel(config).eval()
    full = to_official(hf.state_dict())  # transformers' own (random) vision encoder, our decoder weights
    assert set(decoder_state_dict(full)) == set(sd)
    full.update(sd)
    hf.load_state_dict(from_official(full, "transformers"), strict=True)
    hf_full = hf.state_dict()  # load_decoder reads a transformers state dict too; sizes from vision_encoder.*
    cfg = infer_decoder_config(hf_full)
    assert (cfg.image_embedding_size, cfg.input_image_size, cfg.embed_dim) == (16, 256, 32)
    dec = load_decoder(hf_full, cfg.replace(num_heads=2))
    assert all(torch.equal(v, sd[k]) for k, v in dec.state_dict().items())
    coords = torch.tensor([[[350.0, 180.0], [120.0, 300.0]]])
    labels = torch.tensor([[1, 0]])
    _, iou1, low1 = ours.predict_torch(coords, labels, multimask_output=True)
    with torch.no_grad():
        out = hf(image_embeddings=ours.features, input_points=ours.to_input_frame(coords)[:, None],
                 input_labels=labels[:, None], multimask_output=True)
    # transformers' own arithmetic (sdpa attention) differs in the last bits, amplified by the livened decoder
    # (logits up to ~10); a wrong key would show as differences of order 1
    scale = low1.abs().max().item()
    assert (out.pred_masks[:, 0] - low1).abs().max() <= 1e-4 * scale
    assert (out.iou_scores[:, 0] - iou1).abs().max() <= 1e-4 * scale


# ---- full size: the official vit_b, end to end from a .pth file ----

@pytest.fixture(scope="module")
def vit_b(coffee, tmp_path_factory):
    from segment_anything import SamPredictor

    sam = liven_decoder_(official_sam("vit_b"))
    path = tmp_path_factory.mktemp("vit_b") / "sam_vit_b_random.pth"
    torch.save(sam.state_dict(), path)
    official = SamPredictor(sam)
    official.set_image(coffee)
    ours = Predictor.from_checkpoint(path, attn_impl="reference")
    ours.set_image(coffee)
    return official, ours


def test_vit_b_from_checkpoint_end_to_end(vit_b):
    official, ours = vit_b
    assert ours.encoder.config.name == "vit_b" and ours.decoder.config == DecoderConfig()
    print("vit_b embedding max abs diff", (ours.features - official.features).abs().max().item())
    for kwargs, multimask in ((POINTS, True), (POINT_BOX, False), (BOX, True)):
        low = assert_same_prediction(official, ours, kwargs, multimask)
        assert low.shape[-2:] == (256, 256)
