"""The repeated-defect signals of tables/days, per seed, on bad and ordinary nights.

Usage: .venv/bin/python benchmarks/bad_night_signals.py [--seeds 0,1,...,9] [--repeated 5,4] [--verbose]

For each seed it writes `make_bad_night` nights (bad: ``--repeated`` of 12 parts carry the same
stain at the same place; ordinary: 3 parts with a defect each of their own; clean: none),
extracts tokens with the tests' tiny random ViT (112 px, layers 1,3, float16 as the token store
keeps them), scores them with the golden set in memory (`reference_score_maps`, the plain path
the bad-night e2e test checks the pipeline's stores against) and prints, per night, the
tables/days columns `days.product_signals` derives: images with a patch flagged by the
references only, the most such images at one patch location, the night's MuSc+ rank statistic
against the references' leave-one-out scores, and whether `systematic_defect_suspected` fires.
The rule was chosen on this table (README: "Known-good references and bad nights").

A second table compares combined rules by the pixel AUROC of the planted defects (maps
upsampled as the bad-night test does): the shipped `max` rule, ``max(zero_shot, plus * s_z /
s_p)``, against ``sum``, ``zero_shot / s_z + plus / s_p`` (both in the references' units).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from musc_tasks.backbone import load_backbone
from musc_tasks.config import BackboneSpec
from musc_tasks.core import combined_scores, pixel_metrics, reference_scale, reference_score_maps, upsample_maps
from musc_tasks.days import pool_evidence, product_signals
from musc_tasks.demo import make_bad_night
from musc_tasks.imageio import read_rgb

TINY_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "musc-tiny-vit.json"


def tokens_of(backbone, paths: list[Path]) -> list[torch.Tensor]:
    """(N, L, C) float32 tokens per layer, rounded through float16 like the token store."""
    pixels = torch.stack([backbone.preprocess(read_rgb(p)[0]) for p in paths])
    layer_tokens, _ = backbone.extract(pixels)
    return [t.half().float() for t in layer_tokens]


def night_row(backbone, root: Path, seed: int, repeated: int, scattered: int, verbose: bool) -> dict:
    night = make_bad_night(root, seed=seed, repeated=repeated, scattered=scattered)
    golden = sorted((night.golden_dir / night.product).glob("*.png"))
    maps = reference_score_maps(
        tokens_of(backbone, [i.path for i in night.images]), tokens_of(backbone, golden), backbone.grid
    )
    zero_shot_scale, plus_scale = reference_scale(maps["reference_zero_shot"]), reference_scale(maps["reference_plus"])
    evidence = pool_evidence(
        maps["zero_shot"],
        maps["plus"],
        maps["reference_zero_shot"],
        maps["reference_plus"],
        zero_shot_scale,
        plus_scale,
        backbone.grid,
    )
    rules = {
        "zero-shot": maps["zero_shot"],
        "few-shot": maps["few_shot"],
        "plus": maps["plus"],
        "combined max": combined_scores(maps["zero_shot"], maps["plus"], zero_shot_scale, plus_scale),
        "combined sum": maps["zero_shot"] / zero_shot_scale + maps["plus"] / plus_scale,
    }
    if verbose:
        print(f"  seed {seed}, {repeated} repeated, {scattered} scattered: images flagged at each patch location")
        print("  " + str(evidence.location_counts.reshape(backbone.grid)).replace("\n", "\n  "))
    return {"seed": seed, "n": len(night.images), "aurocs": pixel_aurocs(night, rules), **product_signals([evidence])}


def pixel_aurocs(night, rules: dict[str, torch.Tensor]) -> dict[str, float]:
    """Pixel AUROC of the planted defects per rule; empty for a night without defects."""
    size = np.asarray(Image.open(night.images[0].path)).shape[:2]
    truth = np.stack(
        [
            np.asarray(Image.open(i.mask_path)) > 127 if i.mask_path is not None else np.zeros(size, bool)
            for i in night.images
        ]
    )
    if not truth.any():
        return {}
    side = int(len(rules["plus"][0]) ** 0.5)
    return {
        name: pixel_metrics(upsample_maps(scores, (side, side), size).numpy(), truth, pro=False)["auroc"]
        for name, scores in rules.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default=",".join(map(str, range(10))))
    parser.add_argument("--repeated", default="5,4", help="bad nights: parts of 12 with the repeated defect")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*RANDOM weights")
    spec = BackboneSpec(
        name="musc-tiny-vit", pretrained=None, image_size=112, layers=(1, 3), model_config_path=TINY_CONFIG
    )
    backbone = load_backbone(spec, device="cpu")
    nights = {f"bad ({r} of 12 repeated)": (r, 0) for r in map(int, args.repeated.split(","))}
    nights.update({"ordinary (3 of 12, each its own)": (0, 3), "clean (no defect)": (0, 0)})
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"seeds {args.seeds}; per night: min-max over seeds, and the nights where the flag fired")
    print("| night | reference-only images | most at one location | night_plus_auc | suspected |")
    print("|---|---|---|---|---|")
    started = time.perf_counter()
    aurocs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for label, (repeated, scattered) in nights.items():
            folder = Path(scratch, f"{repeated}-{scattered}")
            rows = [night_row(backbone, folder / str(s), s, repeated, scattered, args.verbose) for s in seeds]
            only = [round(r["reference_only_fraction"] * r["n"]) for r in rows]
            at_one = [r["repeated_defect_images"] for r in rows]
            auc = [r["night_plus_auc"] for r in rows]
            fired = sum(r["systematic_defect_suspected"] for r in rows)
            if rows[0]["aurocs"]:
                aurocs[label] = [r["aurocs"] for r in rows]
            print(
                f"| {label} | {min(only)}-{max(only)} | {min(at_one)}-{max(at_one)} "
                f"({', '.join(map(str, at_one))}) | {min(auc):.2f}-{max(auc):.2f} | {fired} of {len(rows)} |"
            )
    print("\npixel AUROC of the planted defects: mean over seeds [worst seed's margin over zero-shot]")
    names = list(next(iter(aurocs.values()))[0])
    print("| night | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, per_seed in aurocs.items():
        cells = [f"{np.mean([a[n] for a in per_seed]):.3f}" for n in names[:1]]
        for n in names[1:]:
            worst = min(a[n] - a[names[0]] for a in per_seed)
            cells.append(f"{np.mean([a[n] for a in per_seed]):.3f} [{worst:+.3f}]")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
