"""Shared fixtures: the tiny random ViT, offline hub, Prefect isolation."""

import os
from pathlib import Path

import pytest

from musc_tasks.config import BackboneSpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

DATA_DIR = Path(__file__).parent / "data"
TINY_CONFIG = DATA_DIR / "musc-tiny-vit.json"
TINY_CONFIG_B = DATA_DIR / "musc-tiny-vit-b.json"
# timm-built test architectures, both 8 x 8 patches natively:
# DINOv2 (patch 14, layer scale) at 112 px, DINO (patch 16) at 128 px
TINY_DINOV2_CONFIG = DATA_DIR / "musc-tiny-dinov2.json"
TINY_DINO_CONFIG = DATA_DIR / "musc-tiny-dino.json"


# The tiny random ViT at 112 px (8 x 8 patches), two layers scored
TINY_SPEC = BackboneSpec(
    name="musc-tiny-vit", pretrained=None, image_size=112, layers=(1, 3), model_config_path=TINY_CONFIG
)


@pytest.fixture(scope="session")
def tiny_spec():
    return TINY_SPEC


def backbone_options(spec, device: str = "cpu") -> list[str]:
    """The `musc` options that select the BackboneSpec ``spec`` (``--pretrained none`` for random weights)."""
    return [
        *(
            "--backbone",
            spec.name,
            "--model-config",
            str(spec.model_config_path),
            "--pretrained",
            spec.pretrained or "none",
        ),
        *("--image-size", str(spec.image_size), "--layers", ",".join(map(str, spec.layers)), "--device", device),
    ]
