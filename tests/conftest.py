"""Shared fixtures: the tiny random ViT, offline hub, Prefect isolation."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

DATA_DIR = Path(__file__).parent / "data"
TINY_CONFIG = DATA_DIR / "musc-tiny-vit.json"
TINY_CONFIG_B = DATA_DIR / "musc-tiny-vit-b.json"


@pytest.fixture(scope="session")
def tiny_spec():
    from musc_tasks.config import BackboneSpec

    return BackboneSpec(
        name="musc-tiny-vit", pretrained=None, image_size=112, layers=(1, 3), model_config_path=TINY_CONFIG
    )
