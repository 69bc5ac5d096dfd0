"""Benchmark dataset layouts: MVTec AD, VisA and BTAD test sets with labels and masks."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

from .catalog import IMAGE_SUFFIXES

__all__ = [
    "LAYOUTS",
    "LAYOUT_HINT",
    "DEFAULT_RSCIN_K",
    "LabelledImage",
    "list_categories",
    "dataset_images",
    "train_good_images",
    "choose_shots",
]

LAYOUTS = ("mvtec", "visa", "btad")
# The paper's RsCIN windows per dataset (MUSC_SPEC, defaults)
DEFAULT_RSCIN_K = {"mvtec": (1, 2, 3), "btad": (1, 2, 3), "visa": (1, 8, 9)}
_NORMAL_FOLDER = {"mvtec": "good", "btad": "ok"}
# What a layout expects, for the message when a root holds none of it.
LAYOUT_HINT = {
    "mvtec": "expected ROOT/<category>/test/<type>/*.png (is --layout right?)",
    "btad": "expected ROOT/<category>/test/{ok,ko}/* (is --layout right?)",
    "visa": "expected ROOT/split_csv/1cls.csv or ROOT/<category>/Data/Images (is --layout right?)",
}


@dataclass(frozen=True)
class LabelledImage:
    category: str
    path: Path
    relpath: str  # inside the category's test set, e.g. "crack/000.png"
    defect_type: str
    is_anomalous: bool
    mask_path: Path | None


def list_categories(root: Path, layout: str) -> list[str]:
    """Categories present under ``root`` for the layout, sorted."""
    _check_layout(layout)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    if layout == "visa" and (root / "split_csv" / "1cls.csv").is_file():
        return sorted({row["object"] for row in _visa_rows(root)})
    marker = "Data" if layout == "visa" else "test"
    return sorted(p.name for p in root.iterdir() if (p / marker).is_dir())


def dataset_images(root: Path, layout: str, category: str) -> list[LabelledImage]:
    """The category's test images, sorted by (defect type, file name).

    MVTec AD: ``cat/test/<type>/*.png``, masks ``cat/ground_truth/<type>/<stem>_mask.png``,
    ``good`` is normal. BTAD: ``cat/test/{ok,ko}/*``, masks ``cat/ground_truth/ko/<stem>.*``.
    VisA: the rows of ``split_csv/1cls.csv`` with split ``test``, or else
    ``cat/Data/Images/{Normal,Anomaly}`` with masks ``cat/Data/Masks/Anomaly/<stem>.png``.
    """
    _check_layout(layout)
    root = Path(root)
    if layout == "visa":
        images = _visa_images(root, category)
    else:
        images = _folder_images(root, layout, category)
    if not images:
        raise FileNotFoundError(f"no {layout} test images for category {category!r} under {root}")
    return sorted(images, key=lambda i: (i.defect_type, i.path.name))


def train_good_images(root: Path, layout: str, category: str) -> list[Path]:
    """The category's normal training images, sorted: where few-shot references come from.

    MVTec AD: ``cat/train/good``; BTAD: ``cat/train/ok``; VisA: the rows of
    ``split_csv/1cls.csv`` with split ``train`` and label ``normal``, or else ``cat/train/good``
    (VisA converted to the MVTec layout). Raises FileNotFoundError, naming what was looked
    for, when the category has no such folder or rows.
    """
    _check_layout(layout)
    root = Path(root)
    if layout == "visa" and (root / "split_csv" / "1cls.csv").is_file():
        rows = _visa_rows(root)
        images = [
            root / row["image"]
            for row in rows
            if row["object"] == category and row["split"] == "train" and row["label"] == "normal"
        ]
        if not images:
            raise FileNotFoundError(f"{root / 'split_csv' / '1cls.csv'} has no normal train row for {category!r}")
        return sorted(images)
    folder = root / category / "train" / ("ok" if layout == "btad" else "good")
    if not folder.is_dir():
        raise FileNotFoundError(f"no train folder {folder} for category {category!r}")
    return sorted(p for p in folder.iterdir() if _is_image(p))


def choose_shots(files: list[Path], shots: int, seed: int) -> list[Path]:
    """``shots`` of ``files``, the same ones for the same seed: ``random.Random(seed).sample(sorted(files), shots)``.

    Sorting first makes the choice depend on the folder's content only, not on the order the
    file system lists it; a different seed draws another subset, as the paper's few-shot tables
    average over draws.
    """
    if not 1 <= shots <= len(files):
        raise ValueError(f"cannot choose {shots} of {len(files)} reference images")
    return random.Random(seed).sample(sorted(files), shots)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _folder_images(root: Path, layout: str, category: str) -> list[LabelledImage]:
    test_dir = root / category / "test"
    normal = _NORMAL_FOLDER[layout]
    images = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        for path in sorted(p for p in type_dir.iterdir() if _is_image(p)):
            anomalous = type_dir.name != normal
            mask = _mask_for(root / category / "ground_truth" / type_dir.name, path.stem, layout) if anomalous else None
            images.append(LabelledImage(category, path, f"{type_dir.name}/{path.name}", type_dir.name, anomalous, mask))
    return images


def _mask_for(mask_dir: Path, stem: str, layout: str) -> Path:
    names = [f"{stem}_mask.png"] if layout == "mvtec" else [f"{stem}{s}" for s in (".png", ".bmp", ".tif", ".tiff")]
    for name in names:
        if (mask_dir / name).is_file():
            return mask_dir / name
    raise FileNotFoundError(f"no ground-truth mask for {stem} in {mask_dir} (looked for {', '.join(names)})")


def _visa_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "split_csv" / "1cls.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _visa_images(root: Path, category: str) -> list[LabelledImage]:
    if (root / "split_csv" / "1cls.csv").is_file():
        images = []
        for row in _visa_rows(root):
            if row["object"] != category or row["split"] != "test":
                continue
            anomalous = row["label"] == "anomaly"
            path = root / row["image"]
            mask = root / row["mask"] if anomalous and row.get("mask") else None
            kind = "Anomaly" if anomalous else "Normal"
            images.append(LabelledImage(category, path, f"{kind}/{path.name}", kind, anomalous, mask))
        return images
    data = root / category / "Data"
    images = []
    for kind in ("Anomaly", "Normal"):
        folder = data / "Images" / kind
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.iterdir() if _is_image(p)):
            anomalous = kind == "Anomaly"
            mask = data / "Masks" / "Anomaly" / f"{path.stem}.png" if anomalous else None
            if mask is not None and not mask.is_file():
                raise FileNotFoundError(f"no ground-truth mask {mask} for {path}")
            images.append(LabelledImage(category, path, f"{kind}/{path.name}", kind, anomalous, mask))
    return images
