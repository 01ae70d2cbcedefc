"""Test helpers (import them as `from tests.helpers import ...`): random-weight official models, tiny configs, and
tolerances scaled to the tensors' magnitude."""
from .models import TINY, official_sam, official_tiny_sam, randomize_
from .tolerance import assert_close_scaled, max_abs, scaled_atol

__all__ = ["TINY", "assert_close_scaled", "max_abs", "official_sam", "official_tiny_sam", "randomize_",
           "scaled_atol"]
