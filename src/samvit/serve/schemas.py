"""Request and response bodies of the HTTP API (pydantic models; they make the OpenAPI schema)."""
from __future__ import annotations

import base64
import binascii
from typing import Annotated, Dict, List, Literal, Optional, Tuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

ID_PATTERN = r"^[0-9a-f]{64}$"  # sha256 hex of the image file's bytes

# The cost of one request is bounded by its schema, checked before any image is decoded or model run (422 otherwise).
MAX_POINTS = 64  # points (and labels) in one /v1/segment prompt; the decoder's cost grows with the square of it
MAX_POINTS_PER_SIDE = 64  # /v1/segment/auto grid: at most 64 x 64 = 4096 point prompts
MAX_POINTS_PER_BATCH = 256  # /v1/segment/auto prompts per decoder pass (the server may use fewer, see app.py)
MAX_ARRAY_VALUES = 4 * 256 * 256  # an Array in a request (mask_input is 1 x 256 x 256)

Finite = Annotated[float, Field(allow_inf_nan=False)]
Point = Tuple[Finite, Finite]


class Array(BaseModel):
    """A float32 array: shape and the base64 of its C-order little-endian bytes."""

    shape: List[Annotated[int, Field(ge=0, le=MAX_ARRAY_VALUES)]] = Field(max_length=4)
    dtype: Literal["float32"] = "float32"
    data: str = Field(description="base64 of the array's bytes", max_length=4 * (4 * MAX_ARRAY_VALUES // 3 + 4))

    @classmethod
    def of(cls, a: np.ndarray) -> "Array":
        a = np.ascontiguousarray(a, dtype="<f4")
        return cls(shape=list(a.shape), data=base64.b64encode(a.tobytes()).decode())

    def numpy(self, name: str) -> np.ndarray:
        """The array; ValueError naming `name` when data and shape disagree."""
        try:
            raw = base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{name}.data: not valid base64") from None
        n = int(np.prod(self.shape, dtype=object)) if self.shape else 1
        if len(raw) != 4 * n:
            raise ValueError(f"{name}: {len(raw)} bytes of data for shape {self.shape} of float32 ({4 * n} expected)")
        return np.frombuffer(raw, "<f4").reshape(self.shape).copy()


class EmbeddingInfo(BaseModel):
    id: str = Field(description="sha256 of the image file's bytes: use it as image_id in /v1/segment")
    original_size: Tuple[int, int] = Field(description="(H, W) of the decoded image")
    input_size: Tuple[int, int] = Field(description="(H, W) after the long-side resize, before padding")
    shape: List[int] = Field(description="shape of the embedding, (C, h, w)")
    model: str
    compute_dtype: str = Field(description="dtype the image encoder computed in (also the X-Samvit-Dtype header)")
    cached: bool = Field(description="true when the embedding came from the cache or the store (no encoder run)")


class ImageRef(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field (a typo, crop_n_layers) is a 422, never ignored

    image_id: Optional[str] = Field(None, pattern=ID_PATTERN, description="id from POST /v1/embeddings")
    image: Optional[str] = Field(None, description="base64 of an image file (PNG, JPEG, ...) instead of image_id")

    @model_validator(mode="after")
    def _one_image(self):
        if (self.image_id is None) == (self.image is None):
            raise ValueError("give exactly one of image_id (from POST /v1/embeddings) and image (base64 image file)")
        return self


class SegmentRequest(ImageRef):
    points: Optional[List[Point]] = Field(None, max_length=MAX_POINTS,
                                          description=f"[[x, y], ...] in image pixels, at most {MAX_POINTS}")
    labels: Optional[List[int]] = Field(None, max_length=MAX_POINTS,
                                        description="one per point: 1 = foreground, 0 = background")
    box: Optional[Tuple[Finite, Finite, Finite, Finite]] = Field(None, description="x0, y0, x1, y1 in image "
                                                                 "pixels (one box per request)")
    mask_input: Optional[Array] = Field(None, description="low-res logits (1, 256, 256) from an earlier answer's "
                                        "low_res_logits (one mask of it)")
    multimask: bool = Field(False, description="three candidate masks (best for one ambiguous click) instead of one")
    hq_token_only: bool = Field(False, description="HQ-SAM checkpoints: the HQ token's mask alone (default: SAM's "
                                "mask plus the HQ mask, as the official predictor)")
    format: Literal["png", "rle"] = Field("png", description="masks as PNG (base64, 0/255 grey) or COCO RLE")
    return_low_res: bool = Field(True, description="include the low-res logits (M, 256, 256) for the next click")


class MaskOut(BaseModel):
    score: float = Field(description="predicted IoU")
    area: int
    bbox: List[int] = Field(description="x, y, width, height (COCO), [0, 0, 0, 0] when empty")
    png: Optional[str] = Field(None, description="base64 PNG, H x W, 255 inside the mask (format png)")
    rle: Optional[Dict[str, object]] = Field(None, description="COCO RLE {size: [H, W], counts: str} (format rle)")


class SegmentResponse(BaseModel):
    id: str
    original_size: Tuple[int, int]
    masks: List[MaskOut]
    best: int = Field(description="index of the mask with the highest score")
    low_res_logits: Optional[Array] = None
    decoder_ms: float = Field(description="time spent in the prompt decoder and mask resizing, milliseconds")


class AutoRequest(ImageRef):
    points_per_side: int = Field(32, ge=1, le=MAX_POINTS_PER_SIDE)
    points_per_batch: int = Field(64, ge=1, le=MAX_POINTS_PER_BATCH, description="prompts per decoder pass (the "
                                  "server lowers it to keep each pass's masks within its memory budget)")
    pred_iou_thresh: Finite = Field(0.88, ge=0.0, le=1.0)
    stability_score_thresh: Finite = Field(0.95, ge=0.0, le=1.0)
    box_nms_thresh: Finite = Field(0.7, ge=0.0, le=1.0)
    min_mask_region_area: int = Field(0, ge=0, le=2**31)


class AutoResponse(BaseModel):
    id: str
    original_size: Tuple[int, int]
    annotations: List[Dict[str, object]] = Field(description="records as the official SamAutomaticMaskGenerator's "
                                                 "(segmentation as COCO RLE, area, bbox, predicted_iou, "
                                                 "point_coords, stability_score, crop_box)")


class CvatRequest(BaseModel):
    image: str = Field(description="base64 of an image file, as CVAT's SAM interactor sends it")


class CvatResponse(BaseModel):
    blob: str = Field(description="base64 of the float32 (1, 256, 64, 64) embedding's bytes")


class Health(BaseModel):
    status: Literal["ok", "stopped"]
    model: str
    encoder_seconds_per_image: Optional[float] = Field(None, description="recent average, for progress estimates")
    queued_images: int
