"""Preprocessing against the official SamPredictor path, and the conversion of odd image files."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import samvit
from samvit.data.images import ImageError, array_to_rgb, load_image
from samvit.data.preprocess import preprocess


def official_input(image: np.ndarray) -> torch.Tensor:
    """What SamPredictor.set_image feeds the encoder: ResizeLongestSide + Sam.preprocess."""
    from segment_anything.modeling import Sam
    from segment_anything.utils.transforms import ResizeLongestSide

    resized = ResizeLongestSide(1024).apply_image(image)
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None]
    mean = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    sam = Sam.__new__(Sam)  # only preprocess() is used: no weights needed
    torch.nn.Module.__init__(sam)
    sam.image_encoder = type("E", (), {"img_size": 1024})()
    sam.register_buffer("pixel_mean", mean, False)
    sam.register_buffer("pixel_std", std, False)
    return Sam.preprocess(sam, x)[0]


@pytest.mark.parametrize("shape", [(400, 600), (600, 400), (512, 512), (7, 5), (1, 300), (1500, 977)])
def test_preprocess_is_bit_identical_to_official(shape, coffee):
    rng = np.random.default_rng(sum(shape))
    img = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    if shape == (400, 600):
        img = coffee
    ours = preprocess(img)
    ref = official_input(img)
    assert ours.tensor.shape == (3, 1024, 1024)
    assert torch.equal(ours.tensor, ref)
    assert ours.original_size == shape
    h, w = ours.input_size
    assert max(h, w) == 1024 and (ours.tensor[:, h:, :] == 0).all() and (ours.tensor[:, :, w:] == 0).all()


def _save(img: Image.Image, path, **kw) -> str:
    img.save(path, **kw)
    return str(path)


def test_file_conversions(tmp_path, astronaut):
    rgb = Image.fromarray(astronaut)
    gray = rgb.convert("L")
    cases = {
        "gray.png": (_save(gray, tmp_path / "gray.png"), np.repeat(np.asarray(gray)[:, :, None], 3, 2)),
        "rgba.png": (_save(rgb.convert("RGBA"), tmp_path / "rgba.png"), astronaut),
        "la.png": (_save(gray.convert("LA"), tmp_path / "la.png"), np.repeat(np.asarray(gray)[:, :, None], 3, 2)),
        "palette.png": (_save(rgb.quantize(64), tmp_path / "palette.png"), np.asarray(rgb.quantize(64).convert("RGB"))),
        "cmyk.jpg": (_save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg", quality=100), None),
    }
    for name, (path, expected) in cases.items():
        out = load_image(path)
        assert out.dtype == np.uint8 and out.shape == (512, 512, 3), name
        if expected is not None:
            assert np.array_equal(out, expected), name
    cmyk = load_image(cases["cmyk.jpg"][0]).astype(int)
    assert np.abs(cmyk - astronaut).mean() < 8  # lossy JPEG, but the same picture


def test_16bit_png(tmp_path):
    a = (np.arange(64 * 80, dtype=np.uint32).reshape(64, 80) * 13 % 65536).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)
    out = load_image(path)
    assert np.array_equal(out[:, :, 0], np.rint(a / 257.0).astype(np.uint8))
    assert np.array_equal(array_to_rgb(a), out)


def test_exif_orientation_is_applied(tmp_path, coffee):
    img = Image.fromarray(coffee)  # 400 x 600 (H x W)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    out = load_image(path)
    assert out.shape == (600, 400, 3)
    assert np.abs(out.astype(int) - np.rot90(coffee, k=-1).astype(int)).mean() < 6
    assert preprocess(path).original_size == (600, 400)


def test_arrays_and_pil_inputs(astronaut):
    assert np.array_equal(load_image(Image.fromarray(astronaut)), astronaut)
    assert np.array_equal(load_image(astronaut), astronaut)
    f = astronaut.astype(np.float32) / 255.0
    assert np.abs(load_image(f).astype(int) - astronaut).max() <= 1
    assert load_image(np.zeros((4, 5), dtype=bool)).shape == (4, 5, 3)
    rgba = np.concatenate([astronaut, np.zeros_like(astronaut[:, :, :1])], axis=2)
    assert np.array_equal(load_image(rgba), astronaut)  # alpha dropped, colours kept


def test_bad_inputs_have_clear_errors(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), "red").save(buf, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    big = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(big)
    with pytest.raises(ImageError, match="empty file"):
        load_image(empty)
    with pytest.raises(ImageError, match="notes.jpg: cannot decode"):
        load_image(text)
    with pytest.raises(ImageError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(big, max_pixels=1_000_000)
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((3, 4, 5, 6), dtype=np.uint8))
    with pytest.raises(ImageError, match="expected an image path"):
        load_image(12345)
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_tiny_image_is_upscaled():
    p = samvit.preprocess(np.full((3, 2, 3), 200, dtype=np.uint8))
    assert p.original_size == (3, 2) and p.input_size == (1024, 683)
