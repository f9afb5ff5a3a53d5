"""Shared helpers for the processor parity tests (test_<family>_processor.py).

``tests/`` and ``tests/parity/`` are on ``sys.path`` (see conftest.py), so tests import this module and
``tiny`` directly.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

#: (height, width, PIL mode) of test images: extreme aspect ratios, square, grey, alpha, palette
SIZES = [(30, 500, "RGB"), (480, 640, "RGB"), (224, 224, "RGB"), (100, 1000, "RGB"), (47, 33, "L"),
         (64, 40, "RGBA"), (17, 23, "P")]


def make_image(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random ``h`` x ``w`` PIL image in *mode* (deterministic for given arguments)."""
    a = np.random.default_rng(seed + h * 7 + w).integers(0, 256, (h, w, 4), dtype=np.uint8)
    return Image.fromarray(a if mode == "RGBA" else a[..., :3]).convert(mode)


def assert_same(hf_out, ours: dict, ignore: tuple[str, ...] = ()) -> None:
    """Processor outputs equal HF's: same keys (less *ignore*), identical int64 ids / masks, pixels within 1e-6."""
    keys = set(hf_out.keys()) - set(ignore)
    assert set(ours) == keys, (set(ours), keys)
    for k in keys:
        v = hf_out[k]
        assert ours[k].shape == v.shape, k
        if k == "pixel_values":
            assert ours[k].dtype == torch.float32
            torch.testing.assert_close(ours[k], v, atol=1e-6, rtol=0)
        else:
            assert ours[k].dtype == torch.long, k
            assert torch.equal(ours[k], v), k
