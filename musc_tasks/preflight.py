"""Checks of the command line and the input that run before Prefect, Dask or torch start.

A mistake in an option or a path must cost the user one line and well under two seconds,
not a server start-up and a page of traceback. Everything here stays light: no torch,
open_clip, timm, Prefect or Dask import (the patch size of a CLIP backbone is read from
open_clip's JSON model config without importing open_clip). The flows check the same
things again with the real libraries; these checks only make the common mistakes fast.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from datetime import date
from pathlib import Path

from .catalog import IMAGE_SUFFIXES
from .config import (
    AUTHORS_TIMM_MODELS,
    TIMM_PREFIX,
    BackboneSpec,
    backbone_family,
    open_clip_config_dir,
    open_clip_model_config,
)
from .datasets import train_good_images

__all__ = [
    "UsageError",
    "parse_day",
    "existing_dir",
    "check_pool_size",
    "check_backbone",
    "check_backbone_name",
    "check_checkpoint",
    "light_patch_size",
    "holds_image",
    "require_images",
    "check_shots",
]


class UsageError(Exception):
    """A bad option or input, said in one line that names it and what to do; exit status 2."""


def parse_day(text: str, option: str = "--date") -> date:
    """A ``YYYY-MM-DD`` day, or a `UsageError` naming ``option``."""
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a date: give it as YYYY-MM-DD, e.g. 2026-11-22") from None


def existing_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a folder that exists, or a `UsageError` naming ``what``."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UsageError(f"{what} {folder} does not exist: check the path (and the date it holds, if any)")
    if not folder.is_dir():
        raise UsageError(f"{what} {folder} is not a folder")
    return folder


def check_pool_size(pool_size: int | None, option: str = "--pool-size") -> None:
    """Mutual scoring needs at least two images in a pool."""
    if pool_size is not None and pool_size < 2:
        raise UsageError(f"{option} {pool_size}: a pool needs at least 2 images (each is scored against the others)")


def light_patch_size(spec: BackboneSpec) -> int | None:
    """The patch side of ``spec``'s ViT from config files and names alone; None when unknown here.

    CLIP backbones: the ``--model-config`` JSON or open_clip's shipped JSON. DINO and timm
    backbones: the ``patchNN`` or ``vit...NN`` in the (timm) model name, as every timm ViT
    name spells it.
    """
    if spec.family == "clip":
        config = open_clip_model_config(spec.name, spec.model_config_path)
        patch = (config or {}).get("vision_cfg", {}).get("patch_size")
        return patch if isinstance(patch, int) else None
    name = spec.name
    if spec.model_config_path is not None and Path(spec.model_config_path).is_file():
        name = json.loads(Path(spec.model_config_path).read_text()).get("timm_model", name)
    match = re.search(r"patch(\d+)", name) or re.search(r"vit[a-z]*?(\d+)$", name)
    return int(match.group(1)) if match else None


# timm:<architecture>[.<pretrained tag>], as timm spells both.
_TIMM_NAME = re.compile(rf"{re.escape(TIMM_PREFIX)}[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")


def _model_config(path: Path | None) -> Path | None:
    if path is not None and not Path(path).is_file():
        raise UsageError(f"--model-config {path} does not exist")
    return None if path is None else Path(path)


def check_backbone_name(name: str, model_config_path: str | os.PathLike | None = None) -> None:
    """A `UsageError` unless the flows can build ``name``, judged from names and config files alone.

    Known: open_clip's shipped models (its ``model_configs/*.json``), the name a ``--model-config``
    JSON registers (its file stem), the authors' DINO names and ``timm:<model>[.<tag>]`` (whether
    timm has that model is left to the flows: asking timm costs the torch import).
    """
    config = _model_config(model_config_path)
    try:
        family = backbone_family(name, config)
    except (ValueError, OSError) as error:  # a config's bad family, or JSON that does not parse
        raise UsageError(f"--model-config {config}: {str(error).splitlines()[0]}") from None
    if config is not None and config.stem == name:
        return
    if family == "timm" and _TIMM_NAME.fullmatch(name):
        return
    if family in ("dinov2", "dino") and name in AUTHORS_TIMM_MODELS:
        return
    shipped = open_clip_config_dir()
    clip_names = sorted(p.stem for p in shipped.glob("*.json")) if shipped is not None else []
    if family == "clip" and name in clip_names:
        return
    if family == "timm":
        raise UsageError(f"--backbone {name!r}: give a timm model as timm:<model> or timm:<model>.<tag>")
    ours = Path(__file__).parent / "model_configs" / f"{name}.json"
    if ours.is_file():
        raise UsageError(f"--backbone {name}: add --model-config {ours} (it registers this model)")
    known = {known.lower(): known for known in [*clip_names, *AUTHORS_TIMM_MODELS]}
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
    hint = f" (did you mean {known[close[0]]}?)" if close else ""
    raise UsageError(
        f"--backbone {name!r} is unknown{hint}: give an open_clip model (e.g. ViT-L-14-336), "
        f"{', '.join(AUTHORS_TIMM_MODELS)}, timm:<model>, or a name a --model-config JSON registers"
    )


def check_checkpoint(pretrained: str | None) -> None:
    """A ``--pretrained`` value that looks like a file must be one."""
    if pretrained is None:
        return
    looks_like_file = Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors") or os.sep in pretrained
    if looks_like_file and not Path(pretrained).expanduser().is_file():
        raise UsageError(
            f"--pretrained {pretrained}: checkpoint file does not exist (give a file, a pretrained tag or 'none')"
        )


def check_backbone(spec: BackboneSpec) -> None:
    """Image size a multiple of the patch size; a model config and a checkpoint file that exist."""
    _model_config(spec.model_config_path)
    patch = light_patch_size(spec)
    if patch and spec.image_size % patch:
        lower, upper = spec.image_size // patch * patch, (spec.image_size // patch + 1) * patch
        sizes = f"{lower} or {upper}" if lower else f"{upper}"
        raise UsageError(
            f"--image-size {spec.image_size} is not a multiple of {spec.name}'s patch size {patch}: use e.g. {sizes}"
        )
    check_checkpoint(spec.pretrained)


def require_images(input_dir: str | os.PathLike, what: str = "input folder") -> None:
    """A `UsageError` unless at least one image-like file lies below ``input_dir``.

    Only names are looked at, up to the first image (the catalog decodes every file later);
    symlinked folders are not entered, as the catalog does not enter them either.
    """
    folder = existing_dir(input_dir, what)
    if holds_image(folder):
        return
    raise UsageError(
        f"{what} {folder} holds no image ({', '.join(IMAGE_SUFFIXES)}): "
        "is the upload missing or the date wrong? Expected INPUT/<product>/**/<image>"
    )


def holds_image(folder: str | os.PathLike) -> bool:
    """Whether an image-like file lies below ``folder``, looking only at names, up to the first one.

    Symlinked folders are not entered (nor by the catalog); a missing folder holds none.
    The nightly flow asks this before it starts its local Dask cluster ahead of the catalog.
    """
    for _, _, files in os.walk(folder):
        if any(Path(name).suffix.lower() in IMAGE_SUFFIXES for name in files):
            return True
    return False


def check_shots(
    root: str | os.PathLike, layout: str, categories: list[str], shots: int | None, references: bool, mode: str
) -> None:
    """``--references --shots K``: K train images per category exist, and the mode can use K.

    Parameters
    ----------
    root : path
        The dataset root.
    layout : str
        mvtec, visa or btad.
    categories : list of str
        The categories to be evaluated.
    shots : int or None
        K, the references drawn per category.
    references : bool
        Whether ``--references`` was given.
    mode : str
        The reference mode (combined needs K >= 2).
    """
    if shots is None and not references:
        return
    if not references:
        raise UsageError(f"--shots {shots} needs --references (references from each category's train/good folder)")
    if shots is None:
        raise UsageError("--references needs --shots K: how many train/good images per category, e.g. --shots 4")
    if shots < 1:
        raise UsageError(f"--shots {shots}: give at least 1 reference image per category")
    if mode == "combined" and shots < 2:
        raise UsageError(
            "--shots 1 with --reference-mode combined: combined needs at least 2 references; "
            "use --shots 2 or more, or --reference-mode few-shot or plus"
        )
    for category in categories:
        try:
            available = len(train_good_images(Path(root), layout, category))
        except FileNotFoundError as error:
            raise UsageError(f"--references: {error}; few-shot references come from the training images") from None
        if not available:
            raise UsageError(f"--references: category {category!r} has no train image under {root}")
        if shots > available:
            raise UsageError(
                f"--shots {shots}: category {category!r} has only {available} train image(s) under {root}; "
                f"use --shots {available} or less"
            )
