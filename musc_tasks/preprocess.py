"""Image decoding and the reference preprocessing (MUSC_SPEC §1, §8)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .config import CLIP_MEAN, CLIP_STD

__all__ = ["Squash", "squash_normalise", "resize_mask", "read_mask"]


@dataclass(frozen=True)
class Squash:
    """A backbone's preprocessing: squash to S x S with one filter, scale to [0, 1], normalise.

    The CLIP backbones use bicubic and the CLIP statistics (MUSC_SPEC §1); the DINO backbones
    torchvision's default bilinear and the ImageNet statistics (§8). The resize is PIL's,
    which is what torchvision's ``Resize`` runs on a PIL image.
    """

    # Side S in pixels; the aspect ratio is not kept, as in the reference.
    size: int
    resample: Image.Resampling = Image.Resampling.BICUBIC
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, image: Image.Image) -> Tensor:
        """(3, S, S) float32 tensor of a PIL image of any mode (converted to RGB first)."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        resized = rgb.resize((self.size, self.size), self.resample)
        pixels = np.asarray(resized, dtype=np.float32) / np.float32(255.0)  # (S, S, 3)
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


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
    return Squash(size)(image)


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
