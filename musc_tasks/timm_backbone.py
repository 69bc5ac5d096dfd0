"""ViTs built with timm: DINOv2 and DINO as the MuSc authors run them, and any timm ViT.

MUSC_SPEC §8 fixes the DINO semantics: bilinear squash with the ImageNet statistics, each
chosen block's output through the final LayerNorm (patch tokens only), the final-norm class
token as the image-level token for RsCIN (not L2-normalised), and the positional embedding
resampled by DINO's own run-time rule at sizes other than the native one.

One resolution path, as in `backbone`: name -> architecture (`TimmArch`) -> model built at
its native size -> weights (Meta's ``*_pretrain.pth`` converted by timm's checkpoint filter,
a timm/Hugging Face tag from the cache, or random) -> positional embedding resampled to the
run's grid -> the model at ``spec.image_size``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor

from .backbone import (
    Backbone,
    WeightsUnavailable,
    _autocast,
    _hf_offline,
    hub_host,
    local_checkpoint,
    require_download_source,
    resolve_device,
)
from .config import AUTHORS_TIMM_MODELS, IMAGENET_MEAN, IMAGENET_STD, TIMM_PREFIX, BackboneSpec
from .preprocess import Squash

logger = logging.getLogger(__name__)

__all__ = [
    "AUTHORS_BACKBONES",
    "TimmArch",
    "TimmBackbone",
    "dino_pos_embed",
    "load_timm_backbone",
    "read_checkpoint",
    "resolve_timm_checkpoint",
    "timm_arch",
]

# DINO's run-time rule adds this to the target grid before taking the scale factor
# (`interpolate_offset` in DINOv2, a literal 0.1 in DINO), so the floor lands on the grid.
DINO_INTERPOLATE_OFFSET = 0.1
# Weight files timm publishes on the Hugging Face hub, in the order timm tries them.
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class TimmArch:
    """A timm-built architecture and the semantics its family's reference code gives it."""

    # "dinov2" or "dino" (MUSC_SPEC §8), or "timm" (timm's own preprocessing and resize).
    family: str
    # timm architecture name, e.g. "vit_large_patch14_dinov2".
    timm_name: str
    # Default pretrained tag (timm's, on the Hugging Face hub); None: no default weights.
    tag: str | None = None
    # Extra constructor arguments (architectures registered from a JSON config), sorted items.
    kwargs: tuple[tuple[str, object], ...] = ()

    def build(self, image_size: int | None = None, *, seed: int = 0) -> VisionTransformer:
        """The randomly initialised model (seeded), at its native size or at ``image_size``."""
        kwargs = dict(self.kwargs)
        if image_size is not None:
            kwargs["img_size"] = image_size
        torch.manual_seed(seed)
        try:
            model = timm.create_model(self.timm_name, pretrained=False, num_classes=0, **kwargs)
        except RuntimeError as error:  # timm: "Unknown model (...)"
            raise ValueError(f"{error}; timm.list_models('vit_*') lists the ViTs timm knows") from None
        if not isinstance(model, VisionTransformer):
            raise ValueError(f"timm model {self.timm_name!r} is not a plain ViT (timm VisionTransformer)")
        return model.eval()


# The authors' DINO names and the timm architectures they stand for.
AUTHORS_BACKBONES: dict[str, TimmArch] = {name: TimmArch(*arch) for name, arch in AUTHORS_TIMM_MODELS.items()}


def timm_arch(name: str, model_config_path: Path | None = None) -> TimmArch:
    """The architecture of an authors' name, a ``timm:<model>[.<tag>]`` name, or a config JSON."""
    if name.startswith(TIMM_PREFIX):
        model, _, tag = name[len(TIMM_PREFIX) :].partition(".")
        return TimmArch("timm", model, tag or None)
    if model_config_path is not None:
        config = json.loads(Path(model_config_path).read_text())
        if "timm_model" not in config:
            raise ValueError(f"{model_config_path}: a timm-built backbone's config needs 'timm_model'")
        if Path(model_config_path).stem != name:
            raise ValueError(f"{model_config_path} registers {Path(model_config_path).stem!r}, not {name!r}")
        kwargs = tuple(sorted(config.get("timm_kwargs", {}).items()))
        return TimmArch(config.get("family", "timm"), config["timm_model"], config.get("tag"), kwargs)
    if name not in AUTHORS_BACKBONES:
        raise ValueError(
            f"unknown DINO backbone {name!r}; known: {', '.join(AUTHORS_BACKBONES)}, "
            "or timm:<model name> for any timm ViT"
        )
    return AUTHORS_BACKBONES[name]


@functools.lru_cache(maxsize=32)
def _geometry(arch: TimmArch) -> tuple[int, int, int]:
    # Built on the meta device: shapes without allocating or initialising ViT-L's weights.
    with torch.device("meta"):
        model = arch.build()
    return int(model.patch_embed.img_size[0]), int(model.patch_embed.patch_size[0]), len(model.blocks)


def timm_native_geometry(name: str, model_config_path: Path | None = None) -> tuple[int, int]:
    """(native image size, number of blocks) of a timm-built ViT."""
    size, _, blocks = _geometry(timm_arch(name, model_config_path))
    return size, blocks


def timm_patch_size(name: str, model_config_path: Path | None = None) -> int:
    """Pixels per patch side of a timm-built ViT."""
    return _geometry(timm_arch(name, model_config_path))[1]


def timm_default_tag(name: str, model_config_path: Path | None = None) -> str | None:
    return timm_arch(name, model_config_path).tag


def dino_pos_embed(pos_embed: Tensor, grid: tuple[int, int], *, prefix_tokens: int = 1) -> Tensor:
    """DINO's and DINOv2's own positional-embedding resampling (MUSC_SPEC §8).

    Parameters
    ----------
    pos_embed : (1, prefix_tokens + M*M, C) tensor
        The embedding trained for an M x M grid (37 x 37 for DINOv2), class token first.
    grid : (H, W)
        The run's patch grid, ``S // patch`` per side.
    prefix_tokens : int
        Leading embeddings kept as they are (the class token).

    Returns
    -------
    resized : (1, prefix_tokens + H*W, C) tensor, same dtype
        Unchanged at the native grid. Otherwise the grid resampled bicubic, no antialias, with
        the *scale factor* ``(H + 0.1) / M`` (not a target size): PyTorch then maps output
        pixels back with that factor, which is what DINO computes at every forward.
    """
    _, n_tokens, channels = pos_embed.shape
    side = math.isqrt(n_tokens - prefix_tokens)
    if side * side != n_tokens - prefix_tokens:
        raise ValueError(f"positional embedding of {n_tokens} tokens has no square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    prefix, patches = pos_embed[:, :prefix_tokens], pos_embed[:, prefix_tokens:]
    patches = patches.float().reshape(1, side, side, channels).permute(0, 3, 1, 2)  # (1, C, M, M)
    scale = tuple((g + DINO_INTERPOLATE_OFFSET) / side for g in grid)
    patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(patches.shape[-2:]) != tuple(grid):
        raise ValueError(f"resampled grid {tuple(patches.shape[-2:])} is not {tuple(grid)}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], channels)  # (1, H*W, C)
    return torch.cat([prefix.float(), patches], dim=1).to(pos_embed.dtype)


def read_checkpoint(path: Path) -> dict[str, Tensor]:
    """The tensors of a ``.pth``/``.bin``/``.pt`` or ``.safetensors`` file, as stored."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict (a {type(state).__name__})")
    return state


@dataclass
class TimmBackbone(Backbone):
    """A timm ViT, preprocessed and read out as its family's reference does (MUSC_SPEC §8)."""

    spec: BackboneSpec
    model: VisionTransformer
    device: torch.device
    patch_size: int
    preprocessing: Squash

    def preprocess(self, image: Image.Image) -> Tensor:
        """(3, S, S) float32 tensor: the family's squash and statistics."""
        return self.preprocessing(image)

    @torch.inference_mode()
    def extract(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """Final-norm outputs of the chosen blocks (patch tokens) and the final-norm class token.

        The image-level token is not L2-normalised: RsCIN uses DINO's raw tokens (§8).
        """
        images = images.to(self.device, non_blocking=True)
        with _autocast(self.device):
            out = self.model.forward_intermediates(
                images, indices=list(self.spec.layers), norm=True, output_fmt="NLC", output_dict=True
            )
        layer_tokens = [t.float().cpu() for t in out["image_intermediates"]]
        final = out["image_features"]  # (B, prefix + L, C), after the final norm
        if self.spec.family == "timm":
            embeddings = self.model.forward_head(final, pre_logits=True)  # the model's own pooling
        else:
            embeddings = final[:, 0]  # DINOv2's x_norm_clstoken
        return layer_tokens, embeddings.float().cpu()


def load_timm_backbone(spec: BackboneSpec, *, device: str = "auto", cache_dir: str | None = None) -> TimmBackbone:
    """Build the timm ViT of ``spec``, load its weights, and resample to ``spec.image_size``."""
    arch = timm_arch(spec.name, spec.model_config_path)
    checkpoint = resolve_timm_checkpoint(spec, cache_dir=cache_dir)
    if checkpoint is None:
        warnings.warn(
            f"{spec.name} runs with RANDOM weights (seed {spec.seed}): scores show the pipeline "
            "working end to end but mean nothing. Pass --pretrained TAG|PATH for real results.",
            stacklevel=2,
        )
        native = arch.build(seed=spec.seed)  # the seeded init at the native grid, then resampled below
        state = native.state_dict()
    else:
        # Shapes only: initialising ViT-L's weights to overwrite them costs more than reading them.
        with torch.device("meta"):
            native = arch.build()
        try:
            # Meta's parameter names -> timm's; at the native grid the filter resizes nothing.
            state = checkpoint_filter_fn(read_checkpoint(checkpoint), native)
        except (OSError, RuntimeError, pickle.UnpicklingError) as error:
            raise ValueError(f"{checkpoint}: cannot read weights ({error})") from None
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    patch = int(native.patch_embed.patch_size[0])
    if spec.image_size % patch:
        raise ValueError(f"image_size {spec.image_size} is not a multiple of {spec.name}'s patch size {patch}")
    if max(spec.layers) >= len(native.blocks):
        raise ValueError(f"layers {spec.layers} out of range: {spec.name} has {len(native.blocks)} blocks")
    with torch.device("meta"):
        model = arch.build(spec.image_size)  # every tensor is assigned from the state below
    if arch.family == "timm":
        # timm's own semantics: its loader resamples the embedding (bicubic, antialiased).
        state = checkpoint_filter_fn(state, model)
    else:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        side = spec.image_size // patch
        state["pos_embed"] = dino_pos_embed(state["pos_embed"], (side, side), prefix_tokens=prefix)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{checkpoint}: weights do not fit {spec.name} ({arch.timm_name}): {error}") from None
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ValueError(f"{spec.name}: the state dict left tensors of {arch.timm_name} unset")
    if arch.family == "timm":
        config = model.pretrained_cfg
        resample = Image.Resampling.BILINEAR if config.get("interpolation") == "bilinear" else Image.Resampling.BICUBIC
        preprocessing = Squash(spec.image_size, resample, tuple(config["mean"]), tuple(config["std"]))
    else:
        # torchvision's Resize default on a PIL image is PIL's bilinear (MUSC_SPEC §8).
        preprocessing = Squash(spec.image_size, Image.Resampling.BILINEAR, IMAGENET_MEAN, IMAGENET_STD)
    torch_device = resolve_device(device)
    return TimmBackbone(
        spec=spec,
        model=model.to(torch_device).eval(),
        device=torch_device,
        patch_size=patch,
        preprocessing=preprocessing,
    )


def resolve_timm_checkpoint(spec: BackboneSpec, *, cache_dir: str | None = None) -> Path | None:
    """Find or fetch a timm-built backbone's weights; None for random weights.

    A local file (Meta's ``*_pretrain.pth``, or a timm ``.safetensors``) is used as is. A
    tag is looked up in the Hugging Face cache and downloaded only when the hub is reachable;
    offline, `WeightsUnavailable` names the file to fetch, within a second.
    """
    if spec.pretrained is None:
        return None
    if (local := local_checkpoint(spec.pretrained)) is not None:
        return local
    arch = timm_arch(spec.name, spec.model_config_path)
    full_name = f"{arch.timm_name}.{spec.pretrained}"
    known = timm.list_pretrained(f"{arch.timm_name}.*")
    if full_name not in known:
        tags = [name.split(".", 1)[1] for name in known]
        raise WeightsUnavailable(
            f"{spec.pretrained!r} is neither a file nor a timm pretrained tag of {spec.name} ({arch.timm_name}); "
            f"known tags: {', '.join(tags) or 'none (pass a checkpoint file)'}"
        )
    config = timm.models.get_pretrained_cfg(full_name)
    repo = config.hf_hub_id
    cached = _hub_cached_file(repo, cache_dir) if repo else None
    if cached is not None:
        return cached
    source = config.url or f"the Hugging Face repository {repo}"
    meta_file = Path(urlparse(config.url).path).name if config.url else None
    how_to = (
        f"no weights for {spec.name} / {spec.pretrained} in the local cache and the download source is "
        f"unreachable ({{reason}}). Fetch {meta_file or repo} ({source}) on a machine with internet and pass "
        f"--pretrained /path/to/{meta_file or 'model.safetensors'}, or run `musc fetch-weights --backbone "
        f"{spec.name} --pretrained {spec.pretrained}` there and copy the Hugging Face cache"
    )
    if not repo and not _hf_offline():  # offline is the reason given first, as for every backbone
        raise WeightsUnavailable(how_to.format(reason="timm has no Hugging Face copy of this tag"))
    require_download_source(hub_host(), how_to)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    logger.info("downloading %s / %s from %s", spec.name, spec.pretrained, repo)
    for name in _HUB_FILES:
        try:
            return Path(hf_hub_download(repo, name, cache_dir=cache_dir))
        except EntryNotFoundError:
            continue
    raise WeightsUnavailable(f"{repo} holds none of {', '.join(_HUB_FILES)}")


def _hub_cached_file(repo: str, cache_dir: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for name in _HUB_FILES:
        found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(found, str):
            return Path(found)
    return None
