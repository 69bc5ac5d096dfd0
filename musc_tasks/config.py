"""Typed parameters: what decides a result is parsed once into these frozen models."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, computed_field, field_validator

from .identity import file_digest

# Bump when a change alters any stored token, map, score or table, so caches keyed on it miss.
CODE_VERSION = "2026.11.1"

# The OpenAI CLIP statistics, used for every open_clip backbone as the reference implementation does.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The ImageNet statistics, used for the DINO and DINOv2 backbones (MUSC_SPEC §8).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Backbone families: how a ViT is built, preprocessed and read out (MUSC_SPEC §2 and §8).
FAMILIES = ("clip", "dinov2", "dino", "timm")
TIMM_PREFIX = "timm:"

RANDOM_WEIGHTS = ("none", "random", "")

# The names the authors' code uses (torch.hub names of Meta's models): (family, timm
# architecture, default pretrained tag). Here, not beside the timm code, so the CLI's
# preflight can check a name without importing torch or timm.
AUTHORS_TIMM_MODELS: dict[str, tuple[str, str, str]] = {
    "dinov2_vits14": ("dinov2", "vit_small_patch14_dinov2", "lvd142m"),
    "dinov2_vitb14": ("dinov2", "vit_base_patch14_dinov2", "lvd142m"),
    "dinov2_vitl14": ("dinov2", "vit_large_patch14_dinov2", "lvd142m"),
    "dino_vitbase16": ("dino", "vit_base_patch16_224", "dino"),
    "dino_vitbase8": ("dino", "vit_base_patch8_224", "dino"),
}

# How known-good references score a night (README: Known-good references; core.REFERENCE_MODES).
ReferenceMode = Literal["few-shot", "plus", "combined"]


class BackboneSpec(BaseModel):
    """Which ViT, which weights, which size, which layers."""

    model_config = ConfigDict(frozen=True)

    # An open_clip model, an authors' DINO name (dinov2_vitl14, dino_vitbase16, ...), or timm:<model>.
    name: str = "ViT-L-14-336"
    # A pretrained tag (open_clip, or timm / Hugging Face for the timm-built families), a local
    # checkpoint file (Meta's *_pretrain.pth for DINO), or None for random weights.
    pretrained: str | None = "openai"
    # Images are squashed to image_size x image_size; must be a multiple of the patch size.
    image_size: int = 518
    # 0-based transformer blocks whose residual-stream output is scored.
    layers: tuple[int, ...] = (5, 11, 17, 23)
    # Extra model config JSON: an open_clip config, or {"family", "timm_model", "timm_kwargs"}
    # for a timm-built architecture (registers architectures neither library ships).
    model_config_path: Path | None = None
    # Seed of the random initialisation when pretrained is None.
    seed: int = 0

    @field_validator("pretrained")
    @classmethod
    def _none_means_random(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() in RANDOM_WEIGHTS:
            return None
        return value

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"image_size must be positive, got {value}")
        return value

    @field_validator("layers")
    @classmethod
    def _sorted_layers(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(layer < 0 for layer in value) or len(set(value)) != len(value):
            raise ValueError(f"layers must be distinct non-negative block indices, got {value}")
        return tuple(sorted(value))

    @computed_field
    @property
    def family(self) -> str:
        """Which family's semantics the backbone follows: one of `FAMILIES`."""
        return backbone_family(self.name, self.model_config_path)

    @property
    def is_random(self) -> bool:
        return self.pretrained is None

    @property
    def key(self) -> str:
        """A file-name-safe identity of the tokens this backbone produces.

        Local checkpoints are identified by content, random weights by seed and config
        content, so two files with the same name never share a cache entry.
        """
        if self.pretrained is None:
            weights = f"random{self.seed}"
        elif Path(self.pretrained).is_file():
            weights = "ckpt-" + file_digest(self.pretrained)[:12]
        else:
            weights = self.pretrained
        if self.model_config_path is not None:
            weights += "-cfg" + file_digest(self.model_config_path)[:8]
        layers = "-".join(str(layer) for layer in self.layers)
        raw = f"{self.name}__{weights}__{self.image_size}__L{layers}"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)


class MsmParams(BaseModel):
    """What decides a pool's patch scores besides its tokens (MUSC_SPEC §3-4); sent whole to workers."""

    model_config = ConfigDict(frozen=True)

    r_list: tuple[int, ...]
    interval: float
    precision: Literal["float32", "bfloat16", "float16"]


class RscinParams(BaseModel):
    """What decides a product's image scores and thresholds given its patch scores (MUSC_SPEC §5-6)."""

    model_config = ConfigDict(frozen=True)

    k_list: tuple[int, ...]
    threshold: Literal["auto"] | float
    pixel_threshold: Literal["auto"] | float


class ScoringParams(BaseModel):
    """How patches and images are scored once tokens exist (MUSC_SPEC §3-6)."""

    model_config = ConfigDict(frozen=True)

    r_list: tuple[int, ...] = (1, 3, 5)
    interval: float = Field(0.3, gt=0.0, le=1.0)
    rscin_k: tuple[int, ...] = (1, 2, 3)
    # Largest pool scored together; bigger products are split into seeded, balanced pools.
    pool_size: int = Field(200, ge=2)
    pool_seed: int = 42
    # "auto" or a fixed value on the RsCIN image score / the pixel map score.
    threshold: Literal["auto"] | float = "auto"
    pixel_threshold: Literal["auto"] | float = "auto"
    # Images per task block of mutual scoring (one Dask task per pair of blocks); None picks by size.
    # Read under its old name too, so saved deployments and configs keep working.
    task_images: int | None = Field(None, ge=1, validation_alias=AliasChoices("task_images", "block_images"))
    # dtype of the MSM GEMM inputs: float32 reproduces the reference; bfloat16 or float16 run
    # the GEMMs on a GPU's tensor cores with float32 accumulation (errors: docs/performance.md).
    msm_precision: Literal["float32", "bfloat16", "float16"] = "float32"

    @property
    def msm(self) -> MsmParams:
        return MsmParams(r_list=self.r_list, interval=self.interval, precision=self.msm_precision)

    @property
    def rscin(self) -> RscinParams:
        return RscinParams(k_list=self.rscin_k, threshold=self.threshold, pixel_threshold=self.pixel_threshold)

    @field_validator("r_list", "rscin_k")
    @classmethod
    def _positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(v < 1 for v in value):
            raise ValueError(f"must be a non-empty list of integers >= 1, got {value}")
        return value

    @field_validator("r_list")
    @classmethod
    def _odd(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(v % 2 == 0 for v in value):
            raise ValueError(f"aggregation degrees must be odd, got {value}")
        return value


class OutputPolicy(BaseModel):
    """How the published heatmaps are sized and encoded; changes no score, mask or table value.

    Flagged images and the ``full_resolution_top`` best-ranked images of each product get their
    heatmap at the capture's resolution; every other heatmap is scaled so that its long side is
    at most ``long_side`` pixels (never enlarged). Masks are always lossless PNG at full size.
    """

    model_config = ConfigDict(frozen=True)

    heatmap_format: Literal["jpeg", "webp", "png"] = "jpeg"
    # JPEG quality 85: about 1/6 of the bytes of a PNG overlay of a photo (docs/performance.md);
    # WebP at 100 is lossless, as is png.
    heatmap_quality: int = Field(85, ge=1, le=100)
    long_side: int = Field(1024, ge=64)
    full_resolution_top: int = Field(10, ge=0)


def backbone_family(name: str, model_config_path: Path | None = None) -> str:
    """The family of a backbone name: `timm:` prefix, the authors' DINO names, a timm config, or CLIP."""
    if name.startswith(TIMM_PREFIX):
        return "timm"
    if name.startswith("dinov2_"):
        return "dinov2"
    if name.startswith("dino_"):
        return "dino"
    if model_config_path is not None and Path(model_config_path).is_file():
        config = json.loads(Path(model_config_path).read_text())
        if "timm_model" in config:
            family = config.get("family", "timm")
            if family not in FAMILIES[1:]:
                raise ValueError(f"{model_config_path}: family must be one of {FAMILIES[1:]}, got {family!r}")
            return family
    return "clip"


def open_clip_config_dir() -> Path | None:
    """open_clip's shipped model config folder, found without importing open_clip."""
    found = importlib.util.find_spec("open_clip")
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations))) / "model_configs"


def open_clip_model_config(name: str, model_config_path: Path | None = None) -> dict | None:
    """The open_clip config of model ``name`` read from its JSON file; None when no file registers that name.

    As open_clip's registry reads the files, without importing open_clip (its import pulls
    torchvision and torch._dynamo: seconds): ``model_config_path`` registers its file stem and
    wins over the JSON open_clip ships for that name, and a file counts only with
    ``embed_dim``, ``vision_cfg`` and ``text_cfg``. Names open_clip resolves elsewhere
    (``hf-hub:``, ``local-dir:``) get None here.
    """
    shipped = open_clip_config_dir()
    candidates = [Path(model_config_path)] if model_config_path is not None else []
    candidates += [shipped / f"{name}.json"] if shipped is not None else []
    for path in candidates:
        if path.stem == name and path.is_file():
            config = json.loads(path.read_text())
            if all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
                return config
    return None


def native_geometry(name: str, model_config_path: Path | None = None) -> tuple[int, int]:
    """(native image size, number of blocks) of a ViT of any family."""
    if backbone_family(name, model_config_path) != "clip":
        from .timm_backbone import timm_native_geometry

        return timm_native_geometry(name, model_config_path)
    config = clip_model_config(name, model_config_path)
    if config is None:
        raise ValueError(f"unknown open_clip model {name!r}; pass --model-config JSON to register it")
    vision = config["vision_cfg"]
    size = vision["image_size"]
    return (size if isinstance(size, int) else size[0]), vision["layers"]


def patch_size(spec: BackboneSpec) -> int:
    """Pixels per patch side of the spec's ViT."""
    if spec.family != "clip":
        from .timm_backbone import timm_patch_size

        return timm_patch_size(spec.name, spec.model_config_path)
    config = clip_model_config(spec.name, spec.model_config_path)
    if config is None:
        raise ValueError(f"unknown open_clip model {spec.name!r}; pass --model-config JSON to register it")
    return int(config["vision_cfg"]["patch_size"])


def clip_model_config(name: str, model_config_path: Path | None = None) -> dict | None:
    """open_clip's config of model ``name`` once ``model_config_path`` (if any) is registered; None if unknown.

    Read from the JSON file when one registers the name (`open_clip_model_config`,
    no open_clip import); open_clip itself answers for the names it resolves elsewhere
    (``hf-hub:``, ``local-dir:``) and for unknown names.
    """
    config = open_clip_model_config(name, model_config_path)
    if config is not None:
        return config
    import open_clip

    from .backbone import register_model_config

    if model_config_path is not None:
        register_model_config(model_config_path)
    return open_clip.get_model_config(name)


def default_pretrained(name: str, model_config_path: Path | None = None) -> str | None:
    """The weights a bare ``--backbone NAME`` gets.

    Meta's for the authors' DINO names, the tag of a ``timm:<model>.<tag>`` name, else None
    (random weights, with a warning: open_clip has no default tag).
    """
    if backbone_family(name, model_config_path) != "clip":
        from .timm_backbone import timm_default_tag

        return timm_default_tag(name, model_config_path)
    return None


PRESETS: dict[str, BackboneSpec] = {
    "paper": BackboneSpec(name="ViT-L-14-336", pretrained="openai", image_size=518, layers=(5, 11, 17, 23)),
    "fast": BackboneSpec(name="ViT-B-16-plus-240", pretrained="laion400m_e31", image_size=512, layers=(2, 5, 8, 11)),
    # The authors' best backbone for segmentation on MVTec AD (their README).
    "dinov2": BackboneSpec(name="dinov2_vitl14", pretrained="lvd142m", image_size=518, layers=(5, 11, 17, 23)),
}
