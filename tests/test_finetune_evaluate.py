"""`samvit evaluate`: the protocol's points and clicks on known masks, a perfect predictor scores 1.0 and a
half-mask predictor 0.5 on every metric, the JSON keys, and two checkpoints side by side."""
from __future__ import annotations

import json

import numpy as np
import torch

from samvit.cli import main
from samvit.train.evaluate import centre_point, evaluate, next_click
from samvit.train.masks_data import ShapeMasks

from tests._finetune_utils import write_tiny_checkpoint


def test_centre_point_and_next_click_on_known_masks():
    m = np.zeros((20, 30), dtype=bool)
    m[4:13, 6:15] = True  # 9 x 9: the centre pixel is 5 from the outside
    assert centre_point(m) == (10, 8, 5.0)
    m[4:13, 6:21] = True  # 9 x 15: a plateau along the middle row; the first in raster order
    assert centre_point(m) == (10, 8, 5.0)
    edge = np.zeros((10, 10), dtype=bool)
    edge[:, :3] = True  # the image border counts as boundary: column 1 (not 0), from row 1 on
    assert centre_point(edge) == (1, 1, 2.0)
    assert next_click(np.zeros_like(m), m) == (10, 8, 1)  # nothing predicted: a positive click in the centre
    spill = m.copy()
    spill[13:20, 0:30] = True  # a false-positive band below, deeper than any miss: a negative click in it
    assert next_click(spill, m)[2] == 0 and next_click(spill, m)[1] >= 13
    assert next_click(m, m) == (0, 0, -1)


class OraclePredictor:
    """Returns, for every prompt, the ground-truth instance it points at (or a fixed part of it): the clicks, the
    box and the mask prompt are read the way samvit's Predictor reads them."""

    def __init__(self, source, part: float = 1.0) -> None:
        self.source, self.part = source, part

    def set_image(self, rgb):
        self.masks = next(m for i in range(len(self.source))
                          for img, m, _ in [self.source.load(i)] if np.array_equal(img, rgb))

    def _pick(self, m: np.ndarray) -> np.ndarray:
        if self.part == 1.0:
            return m
        out = np.zeros_like(m)
        rows = np.flatnonzero(m.any(1))
        out[rows[0]:rows[0] + round(len(rows) * self.part)] = m[rows[0]:rows[0] + round(len(rows) * self.part)]
        return out

    def predict_torch(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                      multimask_output=True):
        n = len(point_coords) if point_coords is not None else len(boxes)
        picked = []
        for i in range(n):
            if point_coords is not None:  # the first point is a positive click inside its instance
                x, y = point_coords[i, 0].long().tolist()
                k = next(k for k, m in enumerate(self.masks) if m[y, x])
            else:
                from samvit.masks.automatic import masks_to_boxes

                k = next(k for k, m in enumerate(self.masks)
                         if masks_to_boxes(torch.from_numpy(m[None]).bool())[0].tolist() == boxes[i].tolist())
            picked.append(self._pick(self.masks[k]))
        full = torch.from_numpy(np.stack(picked))[:, None]
        m = 3 if multimask_output else 1
        return full.expand(-1, m, -1, -1), torch.linspace(0.5, 0.9, m).expand(n, m), torch.zeros(n, m, 8, 8)


def test_a_perfect_predictor_scores_one_and_a_half_mask_predictor_one_half():
    source = ShapeMasks(4, size=64, seed=2)
    perfect = evaluate(OraclePredictor(source), {"shapes": source})
    n = sum(len(source.load(i)[1]) for i in range(4))
    assert perfect["n_objects"] == n and perfect["n_images"] == 4
    for k in ("point1_miou", "box_miou", "clicks1_miou", "clicks3_miou", "clicks5_miou"):
        assert perfect[k] == 1.0 and perfect["per_dataset"]["shapes"][k] == 1.0
    assert sum(s["n_objects"] for s in perfect["per_size"].values()) == n
    # the top half of the rows of each instance, so a row-count of half: an IoU of exactly rows/2 / rows
    half = evaluate(OraclePredictor(source, part=0.5), {"shapes": source})
    expected = []
    for i in range(4):
        for m in source.load(i)[1]:
            rows = np.flatnonzero(m.any(1))
            top = m[rows[0]:rows[0] + round(len(rows) * 0.5)].sum()
            expected.append(top / m.sum())
    assert abs(half["point1_miou"] - np.mean(expected)) < 1e-9 and abs(half["box_miou"] - np.mean(expected)) < 1e-9


def test_evaluate_cli_json_keys_and_side_by_side_markdown(tmp_path, capsys):
    a = write_tiny_checkpoint(tmp_path / "a.safetensors", seed=0)
    b = write_tiny_checkpoint(tmp_path / "b.safetensors", seed=1)
    out, md = tmp_path / "out.json", tmp_path / "out.md"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["evaluate", "--data", "synthetic", "--synthetic-size", "3", "--checkpoint", a, "--compare", b,
                     "--json", str(out), "--markdown", str(md), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    r = json.loads(out.read_text())
    assert isinstance(r["point1_miou"], float) and isinstance(r["box_miou"], float)
    assert isinstance(r["clicks5_miou"], float) and isinstance(r["n_objects"], int) and r["n_objects"] > 0
    assert 0 <= r["point1_miou"] <= 1 and r["compare"]["n_objects"] == r["n_objects"]
    assert set(r["per_size"]) == {"small", "medium", "large"} and "synthetic" in r["per_dataset"]
    table = md.read_text()
    assert table.splitlines()[0] == f"| subset | objects | prompt | {a} | {b} |"
    row = next(ln for ln in table.splitlines() if ln.startswith("| all |") and "1 box" in ln)
    assert row.endswith(f"| {r['box_miou']:.4f} | {r['compare']['box_miou']:.4f} |")
    assert main(["evaluate", "--data", "synthetic", "--checkpoint", a, "--json", a]) == 2  # never over an input
    assert "would replace one of this run's inputs" in capsys.readouterr().err
