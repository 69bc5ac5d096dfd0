"""Backbone plumbing: one object per loaded ViT that owns preprocessing, tokens and image token.

`load_backbone` picks the family from the spec (MUSC_SPEC §2 for open_clip's CLIP ViTs, §8 for
DINO and DINOv2, built with timm in `timm_backbone`), so the pipeline stages never branch on it.

CLIP: the architecture comes from open_clip's config registry; weights are a separate step so
the positional embedding can be resized exactly as the reference does (MUSC_SPEC §2:
bicubic, align_corners=False, antialias=False; open_clip's own loader uses antialias=True).
open_clip is imported where a model is built or its weights are found, not with this module:
its import pulls torchvision and torch._dynamo (seconds), and the flow's process, which only
needs a patch size (`patch_size`: the config's JSON file), does without it.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .config import BackboneSpec
from .preprocess import Squash

logger = logging.getLogger(__name__)

__all__ = [
    "Backbone",
    "ClipBackbone",
    "WeightsUnavailable",
    "build_vit",
    "load_backbone",
    "read_state_dict",
    "resize_pos_embed_exact",
    "resolve_checkpoint",
    "resolve_device",
]


class WeightsUnavailable(FileNotFoundError):
    """The weights named by a BackboneSpec cannot be found or fetched."""


class Backbone(ABC):
    """A loaded ViT: how its images are preprocessed, its patch tokens and its image-level token.

    Attributes
    ----------
    spec : BackboneSpec
        What was asked for.
    device : torch.device
        Where the model runs.
    patch_size : int
        Pixels per patch side; the grid is ``image_size // patch_size`` per side.
    """

    spec: BackboneSpec
    device: torch.device
    patch_size: int

    @property
    def grid(self) -> tuple[int, int]:
        side = self.spec.image_size // self.patch_size
        return side, side

    @abstractmethod
    def preprocess(self, image: Image.Image) -> Tensor:
        """(3, S, S) float32 tensor of a PIL image, as this family's reference prepares it."""

    @abstractmethod
    def extract(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """Patch tokens of the chosen blocks and the image-level token.

        Parameters
        ----------
        images : (B, 3, S, S) float32 tensor
            Preprocessed images (`preprocess`).

        Returns
        -------
        layer_tokens : list of Y (B, L, C) float32 tensors on the CPU
            One per chosen block, patch tokens only (class and register tokens dropped).
        embeddings : (B, D) float32 tensor on the CPU
            The image-level token RsCIN compares images with (MUSC_SPEC §6, §8).
        """


@dataclass
class ClipBackbone(Backbone):
    """An open_clip vision tower, read out as MUSC_SPEC §1-2 say."""

    spec: BackboneSpec
    visual: nn.Module
    device: torch.device
    patch_size: int

    def preprocess(self, image: Image.Image) -> Tensor:
        """Bicubic squash, CLIP statistics (MUSC_SPEC §1)."""
        return Squash(self.spec.image_size)(image)

    @torch.inference_mode()
    def extract(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """Residual stream after each chosen block; ``ln_post(cls) @ proj``, L2-normalised."""
        images = images.to(self.device, non_blocking=True)
        with _autocast(self.device):
            out = self.visual.forward_intermediates(
                images,
                indices=list(self.spec.layers),
                output_fmt="NLC",
            )
        layer_tokens = [t.float().cpu() for t in out["image_intermediates"]]
        embeddings = F.normalize(out["image_features"].float(), dim=-1).cpu()
        return layer_tokens, embeddings


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no CUDA device")
    return torch.device(device)


def register_model_config(path: Path) -> str:
    """Register an open_clip model config JSON; its file stem becomes the model name."""
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} does not exist")
    open_clip.add_model_config(path)
    return path.stem


def build_vit(spec: BackboneSpec, *, quick_gelu: bool = False) -> nn.Module:
    """The randomly initialised vision tower of ``spec.name`` at ``spec.image_size``."""
    import open_clip

    if spec.model_config_path is not None:
        register_model_config(spec.model_config_path)
    if spec.name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {spec.name!r}; pass --model-config JSON to register it, "
            f"or pick one of: {', '.join(m for m in open_clip.list_models() if m.startswith('ViT'))}"
        )
    config = open_clip.get_model_config(spec.name)
    patch = config["vision_cfg"].get("patch_size")
    if not isinstance(patch, int) or "timm_model_name" in config["vision_cfg"]:
        raise ValueError(f"{spec.name} is not a plain open_clip ViT (no integer patch_size)")
    if spec.image_size % patch:
        raise ValueError(f"image_size {spec.image_size} is not a multiple of {spec.name}'s patch size {patch}")
    n_blocks = config["vision_cfg"]["layers"]
    if max(spec.layers) >= n_blocks:
        raise ValueError(f"layers {spec.layers} out of range: {spec.name} has {n_blocks} blocks")
    torch.manual_seed(spec.seed)
    model = open_clip.create_model(
        spec.name,
        pretrained=None,
        force_image_size=spec.image_size,
        force_quick_gelu=quick_gelu,
    )
    return model.visual.eval()


def resize_pos_embed_exact(pos_embed: Tensor, grid: tuple[int, int]) -> Tensor:
    """Resample a ViT positional embedding to a new patch grid (MUSC_SPEC §2).

    Parameters
    ----------
    pos_embed : (1 + h*w, C) tensor
        Class-token embedding first, then a square h x w grid.
    grid : (H, W)
        Target grid.

    Returns
    -------
    resized : (1 + H*W, C) tensor, same dtype
        Class token kept; the grid resampled bicubic, align_corners=False, antialias=False.
    """
    n_tokens, channels = pos_embed.shape
    old_side = int(round((n_tokens - 1) ** 0.5))
    if old_side * old_side != n_tokens - 1:
        raise ValueError(f"positional embedding of {n_tokens} tokens has no square grid")
    if (old_side, old_side) == tuple(grid):
        return pos_embed
    cls_embed, grid_embed = pos_embed[:1], pos_embed[1:]
    grid_embed = grid_embed.float().reshape(1, old_side, old_side, channels).permute(0, 3, 1, 2)
    grid_embed = F.interpolate(grid_embed, size=tuple(grid), mode="bicubic", align_corners=False, antialias=False)
    grid_embed = grid_embed.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], channels)
    return torch.cat([cls_embed.float(), grid_embed]).to(pos_embed.dtype)


def read_state_dict(checkpoint_path: Path) -> dict[str, Tensor]:
    """The vision-tower weights of an open_clip or OpenAI checkpoint, keys without ``visual.``."""
    from open_clip.factory import load_state_dict

    state = load_state_dict(str(checkpoint_path), weights_only=False)
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise ValueError(f"{checkpoint_path}: no 'visual.*' weights; is it an open_clip CLIP checkpoint?")
    return visual


def resolve_checkpoint(spec: BackboneSpec, *, cache_dir: str | None = None) -> Path | None:
    """Find or fetch the checkpoint file; None for random weights.

    A local file is used as is. A pretrained tag is looked up in the Hugging Face cache
    first, and downloaded only when the hub is reachable; otherwise `WeightsUnavailable`
    says what to do, quickly, instead of retrying for half a minute.
    """
    if spec.family != "clip":
        from .timm_backbone import resolve_timm_checkpoint

        return resolve_timm_checkpoint(spec, cache_dir=cache_dir)
    if spec.pretrained is None:
        return None
    if (local := local_checkpoint(spec.pretrained)) is not None:
        return local
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    tag_cfg = get_pretrained_cfg(spec.name, spec.pretrained)
    if not tag_cfg:
        tags = list_pretrained_tags_by_model(spec.name)
        raise WeightsUnavailable(
            f"{spec.pretrained!r} is neither a file nor a pretrained tag of {spec.name}; "
            f"known tags: {', '.join(tags) or 'none (pass a checkpoint file)'}"
        )
    cached = _hub_cached_file(tag_cfg, cache_dir)
    if cached is not None:
        return cached
    how_to = (
        f"no weights for {spec.name} / {spec.pretrained} in the local cache and the download "
        f"source is unreachable ({{reason}}). On a machine with internet run "
        f"`musc fetch-weights --backbone {spec.name} --pretrained {spec.pretrained}` and copy "
        f"the Hugging Face cache, or download the checkpoint and pass "
        f"--pretrained /path/to/checkpoint.bin"
    )
    host = _download_host(tag_cfg)
    require_download_source(host, how_to)
    logger.info("downloading %s / %s from %s", spec.name, spec.pretrained, host)
    return Path(open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir))


def load_backbone(spec: BackboneSpec, *, device: str = "auto", cache_dir: str | None = None) -> Backbone:
    """Build the ViT of ``spec`` and load its weights, resized to ``spec.image_size``."""
    if spec.family != "clip":
        from .timm_backbone import load_timm_backbone

        return load_timm_backbone(spec, device=device, cache_dir=cache_dir)
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    checkpoint = resolve_checkpoint(spec, cache_dir=cache_dir)
    quick_gelu = bool(get_pretrained_cfg(spec.name, spec.pretrained or "").get("quick_gelu", False))
    visual = build_vit(spec, quick_gelu=quick_gelu)
    patch_size = open_clip.get_model_config(spec.name)["vision_cfg"]["patch_size"]
    side = spec.image_size // patch_size
    if checkpoint is None:
        warnings.warn(
            f"{spec.name} runs with RANDOM weights (seed {spec.seed}): scores show the pipeline "
            "working end to end but mean nothing. Pass --pretrained TAG|PATH for real results.",
            stacklevel=2,
        )
    else:
        state = read_state_dict(checkpoint)
        state["positional_embedding"] = resize_pos_embed_exact(state["positional_embedding"], (side, side))
        visual.load_state_dict(state, strict=True)
    torch_device = resolve_device(device)
    return ClipBackbone(spec=spec, visual=visual.to(torch_device).eval(), device=torch_device, patch_size=patch_size)


def _autocast(device: torch.device):
    # bf16 halves the GPU's work; on the CPU it is far slower than float32, so stay exact there.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def require_download_source(host: str, how_to: str) -> None:
    """Raise `WeightsUnavailable` unless a download from ``host`` can start now.

    Its message is ``how_to`` with ``{reason}`` filled: HF_HUB_OFFLINE is set, or ``host``
    does not answer within seconds (rather than a download retrying for half a minute).
    """
    if _hf_offline():
        raise WeightsUnavailable(how_to.format(reason="HF_HUB_OFFLINE is set"))
    if not _reachable(host):
        raise WeightsUnavailable(how_to.format(reason=f"cannot connect to {host}"))


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cached_file(tag_cfg: dict, cache_dir: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return None
    # open_clip's convention: "org/model/" means the default weight file names.
    if hub.endswith("/"):
        model_id, names = hub.rstrip("/"), _DEFAULT_HUB_FILES
    else:
        model_id, name = os.path.split(hub)
        names = (name,)
    for name in names:
        found = try_to_load_from_cache(model_id, name, cache_dir=cache_dir)
        if isinstance(found, str):
            return Path(found)
    return None


_DEFAULT_HUB_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)


def hub_host() -> str:
    """The host of the Hugging Face hub that weights download from (``HF_ENDPOINT``'s: a mirror, if set)."""
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def _download_host(tag_cfg: dict) -> str:
    if tag_cfg.get("hf_hub"):
        return hub_host()
    return urlparse(tag_cfg.get("url", "")).hostname or "huggingface.co"


def _reachable(host: str, *, timeout_seconds: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout_seconds):
            return True
    except OSError:
        return False


def local_checkpoint(pretrained: str) -> Path | None:
    """The checkpoint file ``pretrained`` names, None when it is a tag; a missing file is an error."""
    candidate = Path(pretrained).expanduser()
    if candidate.is_file():
        return candidate
    if candidate.suffix in (".pt", ".pth", ".bin", ".safetensors") or os.sep in pretrained:
        raise WeightsUnavailable(f"checkpoint file {candidate} does not exist")
    return None
