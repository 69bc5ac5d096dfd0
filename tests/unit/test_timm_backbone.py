"""DINOv2 and DINO built by timm, against a plain implementation of MUSC_SPEC §8 written here."""

import argparse
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from musc_tasks.backbone import WeightsUnavailable, load_backbone
from musc_tasks.cli import add_backbone_arguments, backbone_from_args
from musc_tasks.config import IMAGENET_MEAN, IMAGENET_STD, PRESETS, BackboneSpec, patch_size
from musc_tasks.timm_backbone import dino_pos_embed, timm_arch

from ..conftest import TINY_DINO_CONFIG, TINY_DINOV2_CONFIG

HEADS = 2  # both tiny configs
CONFIGS = {"dinov2": ("musc-tiny-dinov2", TINY_DINOV2_CONFIG, 14), "dino": ("musc-tiny-dino", TINY_DINO_CONFIG, 16)}


def meta_state_dict(family):
    """The tiny model's weights as Meta's torch.hub file stores them, made far from the init."""
    name, config, _ = CONFIGS[family]
    model = timm_arch(name, config).build(seed=11)
    generator = torch.Generator().manual_seed(5)
    state = {}
    for key, value in model.state_dict().items():
        noise = torch.randn(value.shape, generator=generator)
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight", ".gamma")):
            value = 1.0 + 0.5 * noise  # the init's ones (and DINOv2's layer scale) say too little
        elif key.endswith(".bias") or key in ("cls_token", "pos_embed"):
            value = 0.3 * noise
        state[key] = value.clone()
    if family == "dinov2":
        state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])  # in Meta's files, unused here
    return state


def layer_norm(x, state, prefix):
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps=1e-6)


def tokens_by_hand(state, images, layers, patch):
    """MUSC_SPEC §8 from Meta's parameters: the blocks one by one, each chosen block's output
    through the final norm without its class token, and the final-norm class token."""
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    n, channels, height, width = x.shape
    x = torch.cat([state["cls_token"].expand(n, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    pos = state["pos_embed"]
    side = math.isqrt(pos.shape[1] - 1)
    if (height, width) != (side, side):  # DINO's rule: scale factor (grid + 0.1) / side, bicubic, no antialias
        grid = pos[:, 1:].reshape(1, side, side, channels).permute(0, 3, 1, 2)
        grid = F.interpolate(
            grid, scale_factor=((height + 0.1) / side, (width + 0.1) / side), mode="bicubic", antialias=False
        )
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, height * width, channels)], dim=1)
    x = x + pos
    kept = []
    for index in range(1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))):
        block = f"blocks.{index}"
        h = layer_norm(x, state, f"{block}.norm1")
        qkv = h @ state[f"{block}.attn.qkv.weight"].T + state[f"{block}.attn.qkv.bias"]
        q, k, v = qkv.reshape(n, -1, 3, HEADS, channels // HEADS).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(channels // HEADS), dim=-1)
        h = (attention @ v).transpose(1, 2).reshape(n, -1, channels)
        h = h @ state[f"{block}.attn.proj.weight"].T + state[f"{block}.attn.proj.bias"]
        x = x + h * state.get(f"{block}.ls1.gamma", 1.0)
        h = layer_norm(x, state, f"{block}.norm2")
        h = F.gelu(h @ state[f"{block}.mlp.fc1.weight"].T + state[f"{block}.mlp.fc1.bias"])
        h = h @ state[f"{block}.mlp.fc2.weight"].T + state[f"{block}.mlp.fc2.bias"]
        x = x + h * state.get(f"{block}.ls2.gamma", 1.0)
        if index in layers:
            kept.append(layer_norm(x, state, "norm")[:, 1:])
    return kept, layer_norm(x, state, "norm")[:, 0]


@pytest.fixture(scope="module", params=["dinov2", "dino"])
def meta_checkpoint(request, tmp_path_factory):
    state = meta_state_dict(request.param)
    path = tmp_path_factory.mktemp("weights") / f"tiny_{request.param}_pretrain.pth"
    torch.save(state, path)
    return request.param, state, path


@pytest.mark.parametrize("size_in_patches", [8, 11, 5])  # native grid (the 518-equivalent), larger, smaller
def test_meta_checkpoint_tokens_equal_the_spec(meta_checkpoint, size_in_patches):
    family, state, path = meta_checkpoint
    name, config, patch = CONFIGS[family]
    size = size_in_patches * patch
    spec = BackboneSpec(name=name, pretrained=str(path), image_size=size, layers=(1, 2), model_config_path=config)
    assert spec.family == family
    backbone = load_backbone(spec, device="cpu")
    assert backbone.grid == (size_in_patches, size_in_patches) and patch_size(spec) == patch
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    layer_tokens, embeddings = backbone.extract(images)
    with torch.no_grad():
        expected_tokens, expected_embeddings = tokens_by_hand(state, images, (1, 2), patch)
    assert [t.shape for t in layer_tokens] == [(3, size_in_patches**2, 32)] * 2
    for got, want in zip(layer_tokens, expected_tokens):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(embeddings, expected_embeddings, atol=2e-5, rtol=1e-5)
    # the image-level token is the raw final-norm class token: far from unit length
    assert (embeddings.norm(dim=-1) - 1).abs().min() > 0.5


def test_positional_embedding_follows_dino_not_timm_away_from_native():
    pos = torch.randn(1, 1 + 8 * 8, 6, generator=torch.Generator().manual_seed(2))
    assert dino_pos_embed(pos, (8, 8)) is pos
    resized = dino_pos_embed(pos, (11, 11))
    assert resized.shape == (1, 1 + 121, 6) and torch.equal(resized[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 8, 8, 6).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(11, 11), mode="bicubic", antialias=False).permute(0, 2, 3, 1).reshape(1, 121, 6)
    timm_rule = (
        F.interpolate(grid, size=(11, 11), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 121, 6)
    )
    # a scale factor of (11 + 0.1) / 8 samples other points than a target size of 11: the rule matters
    assert not torch.allclose(resized[:, 1:], by_size, atol=1e-3)
    assert not torch.allclose(resized[:, 1:], timm_rule, atol=1e-3)


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_random_weights_at_other_sizes_are_the_native_weights_resampled():
    native = BackboneSpec(
        name="musc-tiny-dinov2", pretrained=None, image_size=112, layers=(3,), model_config_path=TINY_DINOV2_CONFIG
    )
    small = load_backbone(native, device="cpu")
    large = load_backbone(native.model_copy(update={"image_size": 154}), device="cpu")
    expected = dino_pos_embed(small.model.pos_embed.detach(), (11, 11))
    torch.testing.assert_close(large.model.pos_embed.detach(), expected)
    again, _ = load_backbone(native, device="cpu").extract(torch.ones(1, 3, 112, 112))
    first, _ = small.extract(torch.ones(1, 3, 112, 112))
    assert torch.equal(first[0], again[0]), "seeded init must be deterministic"


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_preprocessing_equals_torchvision_resize_and_normalise(mode):
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)).convert(mode)
    spec = BackboneSpec(
        name="musc-tiny-dinov2", pretrained=None, image_size=112, layers=(1,), model_config_path=TINY_DINOV2_CONFIG
    )
    backbone = load_backbone(spec, device="cpu")
    reference = T.Compose(
        [T.Resize((112, 112)), T.CenterCrop(112), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    torch.testing.assert_close(backbone.preprocess(image), reference(image.convert("RGB")), atol=1e-6, rtol=0)


def test_missing_weights_offline_fail_fast_and_name_the_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as caught:
        load_backbone(PRESETS["dinov2"], device="cpu")
    assert time.perf_counter() - started < 1
    message = str(caught.value)
    assert "dinov2_vitl14" in message and "dinov2_vitl14_pretrain.pth" in message and "--pretrained /path" in message


def test_bad_specs_are_clear_errors(tmp_path):
    def spec(**update):
        return BackboneSpec(
            **{
                "name": "musc-tiny-dinov2",
                "pretrained": None,
                "image_size": 112,
                "layers": (1,),
                "model_config_path": TINY_DINOV2_CONFIG,
                **update,
            }
        )

    with pytest.raises(ValueError, match="multiple of"):
        load_backbone(spec(image_size=100))
    with pytest.raises(ValueError, match="out of range"):
        load_backbone(spec(layers=(4,)))
    with pytest.raises(ValueError, match="unknown DINO backbone.*dinov2_vitl14"):
        load_backbone(BackboneSpec(name="dinov2_vitx99", pretrained=None, layers=(1,)))
    with pytest.raises(WeightsUnavailable, match="known tags: lvd142m"):
        load_backbone(BackboneSpec(name="dinov2_vits14", pretrained="nope", layers=(1,)))
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        load_backbone(BackboneSpec(name="dinov2_vits14", pretrained=str(tmp_path / "x.pth"), layers=(1,)))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights"):
        load_backbone(spec(pretrained=str(tmp_path / "junk.pth")))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--preset", "dinov2"], ("dinov2_vitl14", "lvd142m", 518, (5, 11, 17, 23), "dinov2")),
        (["--backbone", "dinov2_vitb14"], ("dinov2_vitb14", "lvd142m", 518, (2, 5, 8, 11), "dinov2")),
        (["--backbone", "dino_vitbase8", "--image-size", "512"], ("dino_vitbase8", "dino", 512, (2, 5, 8, 11), "dino")),
        (
            ["--backbone", "timm:vit_small_patch14_dinov2.lvd142m"],
            ("timm:vit_small_patch14_dinov2.lvd142m", "lvd142m", 518, (2, 5, 8, 11), "timm"),
        ),
        (
            ["--backbone", "timm:vit_base_patch16_224", "--pretrained", "none"],
            ("timm:vit_base_patch16_224", None, 224, (2, 5, 8, 11), "timm"),
        ),
    ],
)
def test_command_line_names(argv, expected):
    parser = argparse.ArgumentParser()
    add_backbone_arguments(parser)
    spec = backbone_from_args(parser.parse_args(argv))
    assert (spec.name, spec.pretrained, spec.image_size, spec.layers, spec.family) == expected
    assert spec.model_dump(mode="json")["family"] == expected[-1]  # recorded in the runs table's parameters


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_plain_timm_family_follows_timm_own_rules(tmp_path):
    """`timm:<model>` and family-less timm configs: timm's preprocessing config, resize and pooling."""
    config = tmp_path / "musc-tiny-timm.json"
    config.write_text(TINY_DINOV2_CONFIG.read_text().replace('"family": "dinov2",', ""))
    native = BackboneSpec(name="musc-tiny-timm", pretrained=None, image_size=112, layers=(2,), model_config_path=config)
    assert native.family == "timm"
    weights = tmp_path / "tiny.safetensors"
    from safetensors.torch import save_file

    save_file(load_backbone(native, device="cpu").model.state_dict(), str(weights))
    backbone = load_backbone(native.model_copy(update={"pretrained": str(weights), "image_size": 154}), device="cpu")
    saved = load_backbone(native, device="cpu").model.pos_embed.detach()
    grid = saved[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    antialiased = (
        F.interpolate(grid, size=(11, 11), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 121, -1)
    )
    torch.testing.assert_close(backbone.model.pos_embed.detach()[:, 1:], antialiased)
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    bicubic = T.Compose(
        [
            T.Resize((154, 154), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )  # timm's pretrained config for this model
    torch.testing.assert_close(backbone.preprocess(image), bicubic(image), atol=1e-6, rtol=0)
    images = torch.randn(2, 3, 154, 154, generator=torch.Generator().manual_seed(6))
    _, embeddings = backbone.extract(images)
    with torch.no_grad():
        features = backbone.model.forward_features(images)
    torch.testing.assert_close(embeddings, backbone.model.forward_head(features, pre_logits=True))
