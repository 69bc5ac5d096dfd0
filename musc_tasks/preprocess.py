"""Image decoding and the reference preprocessing (MUSC_SPEC §1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .config import CLIP_MEAN, CLIP_STD

__all__ = ["squash_normalise", "resize_mask", "read_mask"]

_MEAN = np.asarray(CLIP_MEAN, dtype=np.float32)
_STD = np.asarray(CLIP_STD, dtype=np.float32)


def squash_normalise(image: Image.Image, size: int) -> Tensor:
    """Squash an RGB image to size x size (bicubic) and normalise with the CLIP statistics.

    Parameters
    ----------
    image : PIL image
        Any mode; converted to RGB first.
    size : int
        Side S in pixels; the aspect ratio is not kept, as in the reference.

    Returns
    -------
    pixels : (3, S, S) float32 tensor
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    resized = rgb.resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(resized, dtype=np.float32) / np.float32(255.0)  # (S, S, 3)
    pixels = (pixels - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def resize_mask(mask: np.ndarray, size: int, *, mode: str = "paper") -> np.ndarray:
    """A ground-truth mask at the evaluation size (MUSC_SPEC §7).

    Parameters
    ----------
    mask : (h, w) array
        Non-zero marks an anomalous pixel (MVTec AD masks are 0/255).
    size : int
        Evaluation side S.
    mode : {"paper", "half"}
        "paper": PIL bilinear resize of the 0/255 mask, then only pixels that are exactly 255
        count, as in the paper's figures (borders erode by about a pixel). "half": a pixel
        counts when the resized value is >= 127.5.

    Returns
    -------
    mask : (S, S) bool array
    """
    if mode not in ("paper", "half"):
        raise ValueError(f"mode must be 'paper' or 'half', got {mode!r}")
    binary = np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8)
    resized = np.asarray(Image.fromarray(binary, mode="L").resize((size, size), Image.Resampling.BILINEAR))
    return resized == 255 if mode == "paper" else resized >= 127.5


def read_mask(path: Path) -> np.ndarray:
    """A mask file as an (h, w) bool array (any non-zero pixel is anomalous)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 0
