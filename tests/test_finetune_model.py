"""The trainable SAM: official key names, what trains, LoRA (exact at start, merged into plain weights), layer-wise
lr decay groups, and the decoder call equal to samvit's SamDecoder."""
from __future__ import annotations

import pytest
import torch

from samvit.modeling.lora import LoRALinear, add_lora, merge_lora
from samvit.train.finetune import build_sam, parse_parts
from samvit.train.optim import param_groups

from tests._finetune_utils import SMALL, official_small_sam, tiny_sam, write_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.safetensors")


def test_state_dict_keys_are_the_official_ones():
    ours, official = tiny_sam().state_dict(), official_small_sam().state_dict()
    assert list(ours) == list(official)  # same names, same order
    assert all(ours[k].shape == official[k].shape for k in ours)


def test_decoder_call_equals_samdecoder():
    from samvit.modeling.sam import SamDecoder

    sam = tiny_sam().eval()
    dec = SamDecoder(sam.decoder_config).eval()
    dec.load_state_dict({k: v for k, v in sam.state_dict().items() if not k.startswith("image_encoder.")})
    emb = sam(images=torch.randn(1, 3, 128, 128))
    pts = (torch.tensor([[[40.0, 50.0]]]), torch.tensor([[1]]))
    with torch.no_grad():
        low, iou = sam(image_embeddings=emb, points=pts)
        ref_low, ref_iou = dec(emb, pts, multimask_output=True)
        ref0, _ = dec(emb, pts, multimask_output=False)
    assert low.shape == (1, 4, 32, 32)
    torch.testing.assert_close(low[:, 1:], ref_low, rtol=0, atol=0)
    torch.testing.assert_close(low[:, :1], ref0, rtol=0, atol=0)
    torch.testing.assert_close(iou[:, 1:], ref_iou, rtol=0, atol=0)


def test_train_parts_freeze_the_rest(checkpoint):
    sam = build_sam(checkpoint, train_parts="prompt,decoder")
    trainable = {n.split(".")[0] for n, p in sam.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder", "mask_decoder"}
    assert build_sam(checkpoint, train_parts=["encoder"]).mask_decoder.iou_token.weight.requires_grad is False
    with pytest.raises(ValueError, match="subset of encoder, prompt, decoder"):
        parse_parts("decoder,neck")
    with pytest.raises(ValueError, match="instead of the encoder"):
        build_sam(checkpoint, train_parts="encoder,decoder", lora_rank=4)


def test_lora_starts_exact_trains_only_adapters_and_merges_into_plain_weights(checkpoint):
    base = build_sam(checkpoint, train_parts="encoder,decoder").eval()
    sam = build_sam(checkpoint, train_parts="decoder", lora_rank=4, lora_targets=("qkv", "proj", "mlp")).eval()
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    # lora_b starts at zero: exact on the training path, both with activations that need grad (SDPA picks its
    # CPU path by that). The no-grad inference path fuses plain Linears into workspace buffers, which LoRALinear
    # skips, so there the two differ by rounding only.
    torch.testing.assert_close(sam(images=x), base(images=x), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(sam(images=x), base(images=x), rtol=1e-5, atol=1e-5)
    enc_trainable = {n for n, p in sam.image_encoder.named_parameters() if p.requires_grad}
    assert enc_trainable and all(".lora_a." in n or ".lora_b." in n for n in enc_trainable)
    assert sum(isinstance(m, LoRALinear) for m in sam.modules()) == SMALL.depth * 4
    with torch.no_grad():  # a trained adapter
        for m in sam.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.weight.normal_(0, 0.05)
        lora_out = sam(images=x)
    assert (lora_out - base(images=x)).abs().max() > 1e-3
    assert merge_lora(sam) == SMALL.depth * 4
    assert list(sam.state_dict()) == list(official_small_sam().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(sam(images=x), lora_out, rtol=1e-5, atol=1e-5)


def test_lora_targets_and_errors():
    enc = tiny_sam().image_encoder
    assert add_lora(enc.blocks, 2, ["qkv"]) == SMALL.depth
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        add_lora(enc.blocks, 2, ["qkv"])
    with pytest.raises(ValueError, match="unknown LoRA target"):
        add_lora(enc.blocks, 2, ["attn"])


def test_layer_decay_groups(checkpoint):
    sam = build_sam(checkpoint, train_parts="encoder,prompt,decoder", layer_decay=0.5)
    scale_of = {}
    for g in param_groups(sam, 0.05):
        for n in g["param_names"]:
            scale_of[n] = g.get("lr_scale", 1.0)
    depth = SMALL.depth
    assert scale_of["image_encoder.patch_embed.proj.weight"] == 0.5 ** (depth + 1)
    assert scale_of["image_encoder.pos_embed"] == 0.5 ** (depth + 1)
    for i in range(depth):
        assert scale_of[f"image_encoder.blocks.{i}.attn.qkv.weight"] == 0.5 ** (depth - i)
    assert scale_of["image_encoder.neck.0.weight"] == 1.0 and scale_of["mask_decoder.iou_token.weight"] == 1.0
    nd = {n for g in param_groups(sam, 0.05) if g["weight_decay"] == 0 for n in g["param_names"]}
    assert {"image_encoder.pos_embed", "image_encoder.blocks.0.attn.rel_pos_h", "mask_decoder.iou_token.weight",
            "prompt_encoder.point_embeddings.0.weight", "image_encoder.blocks.1.norm1.weight"} <= nd
    assert "image_encoder.blocks.0.attn.qkv.weight" not in nd


def test_drop_path_is_stochastic_in_training_and_the_identity_in_eval():
    sam = tiny_sam()
    enc = sam.image_encoder
    x = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = enc.eval()(x)
        enc.set_drop_path(0.5)
        # linear from 0 in the first block (a module: nn.Identity when off, DropPath otherwise)
        assert [getattr(b.drop_path, "drop_prob", 0.0) for b in enc.blocks] == [0.0, 0.5]
        torch.testing.assert_close(enc.eval()(x), ref, rtol=0, atol=0)
        enc.train()
        torch.manual_seed(1)
        a = enc(x)
        torch.manual_seed(2)
        b = enc(x)
    assert not torch.equal(a, b) and not torch.equal(a, ref)
    with pytest.raises(ValueError, match="drop path rate"):
        enc.set_drop_path(1.0)


def test_exported_decoder_config_gives_the_head_count(tmp_path):
    """The head count is in no tensor: final.safetensors records the DecoderConfig and the loaders use it (a
    2-head decoder then predicts as segment-anything's 2-head Sam with the same weights)."""
    import numpy as np
    from segment_anything import SamPredictor

    from samvit.masks.predictor import Predictor
    from samvit.train.finetune import export_model

    from tests._finetune_utils import SMALL_DECODER

    two = SMALL_DECODER.replace(num_heads=2)
    sam = tiny_sam(decoder=two)
    _, st = export_model(sam, str(tmp_path))
    ours = Predictor.from_checkpoint(st)
    assert ours.decoder.config.num_heads == 2
    official = official_small_sam(two)
    official.load_state_dict(sam.state_dict())
    ref = SamPredictor(official)
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    ref.set_image(image)
    ours.set_image(image)
    box = np.array([10.0, 20.0, 80.0, 70.0])
    want = ref.predict(box=box, return_logits=True)[0]
    got = ours.predict(box=box, return_logits=True)[0]
    assert np.abs(got - want).max() <= 1e-4
