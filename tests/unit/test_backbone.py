"""Real open_clip on the tiny config: tokens, embeddings, weight loading, exact resize."""

import time

import pytest
import torch
import torch.nn.functional as F

from musc_tasks.backbone import WeightsUnavailable, build_vit, load_backbone, resize_pos_embed_exact
from musc_tasks.config import PRESETS, BackboneSpec

from ..conftest import TINY_CONFIG


def tokens_by_hand(visual, images, layers):
    """Run the blocks one by one and keep the residual stream after the chosen ones."""
    x = visual._embeds(images)  # (B, 1 + L, C) after ln_pre
    kept = []
    for index, block in enumerate(visual.transformer.resblocks):
        x = block(x)
        if index in layers:
            kept.append(x[:, 1:])
    embedding = visual.ln_post(x[:, 0]) @ visual.proj
    return kept, F.normalize(embedding, dim=-1)


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_tokens_and_embeddings_match_the_blocks(tiny_spec):
    backbone = load_backbone(tiny_spec, device="cpu")
    images = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    layer_tokens, embeddings = backbone.extract(images)
    assert backbone.grid == (8, 8)
    assert [t.shape for t in layer_tokens] == [(3, 64, 64), (3, 64, 64)]
    assert embeddings.shape == (3, 32)
    with torch.no_grad():
        expected_tokens, expected_embeddings = tokens_by_hand(backbone.visual, images, tiny_spec.layers)
    for got, want in zip(layer_tokens, expected_tokens):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(embeddings, expected_embeddings)
    again, _ = load_backbone(tiny_spec, device="cpu").extract(images)
    assert all(torch.equal(a, b) for a, b in zip(layer_tokens, again)), "seeded init must be deterministic"


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_checkpoint_at_224_runs_at_280_with_exact_resize(tmp_path):
    native = BackboneSpec(
        name="musc-tiny-vit", pretrained=None, image_size=224, layers=(3,), model_config_path=TINY_CONFIG, seed=7
    )
    visual = build_vit(native)
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"state_dict": {f"visual.{k}": v for k, v in visual.state_dict().items()}}, checkpoint)

    resized = load_backbone(native.model_copy(update={"pretrained": str(checkpoint), "image_size": 280}), device="cpu")
    old = visual.positional_embedding.detach()
    grid = old[1:].reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(20, 20), mode="bicubic", align_corners=False, antialias=False)
    expected = torch.cat([old[:1], expected.permute(0, 2, 3, 1).reshape(400, -1)])
    torch.testing.assert_close(resized.visual.positional_embedding.detach(), expected)
    assert resized.grid == (20, 20)
    tokens, _ = resized.extract(torch.randn(1, 3, 280, 280))
    assert tokens[0].shape == (1, 400, 64)

    # open_clip's own resize (antialias=True) would give other numbers: the reason we resize ourselves
    antialiased = F.interpolate(grid, size=(20, 20), mode="bicubic", align_corners=False, antialias=True)
    assert not torch.allclose(antialiased.permute(0, 2, 3, 1).reshape(400, -1), expected[1:], atol=1e-4)

    same_size = load_backbone(native.model_copy(update={"pretrained": str(checkpoint)}), device="cpu")
    torch.testing.assert_close(same_size.visual.positional_embedding, visual.positional_embedding)


def test_resize_keeps_class_token_and_identity_at_same_grid():
    pos = torch.randn(1 + 9, 4)
    assert resize_pos_embed_exact(pos, (3, 3)) is pos
    out = resize_pos_embed_exact(pos, (5, 5))
    assert out.shape == (26, 4) and torch.equal(out[0], pos[0])


def test_missing_weights_offline_fail_fast_and_say_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as caught:
        load_backbone(PRESETS["paper"], device="cpu")
    assert time.perf_counter() - started < 5
    message = str(caught.value)
    assert "ViT-L-14-336" in message and "openai" in message and "--pretrained /path" in message


def test_bad_specs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of"):
        build_vit(
            BackboneSpec(
                name="musc-tiny-vit", pretrained=None, image_size=100, layers=(1,), model_config_path=TINY_CONFIG
            )
        )
    with pytest.raises(ValueError, match="out of range"):
        build_vit(
            BackboneSpec(
                name="musc-tiny-vit", pretrained=None, image_size=112, layers=(9,), model_config_path=TINY_CONFIG
            )
        )
    with pytest.raises(ValueError, match="unknown open_clip model"):
        build_vit(BackboneSpec(name="no-such-vit", pretrained=None, layers=(1,)))
    with pytest.raises(WeightsUnavailable, match="known tags"):
        load_backbone(BackboneSpec(name="ViT-B-16-plus-240", pretrained="nope", image_size=240, layers=(1,)))
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        load_backbone(
            BackboneSpec(name="ViT-B-16-plus-240", pretrained=str(tmp_path / "x.pt"), image_size=240, layers=(1,))
        )


def test_model_configs_read_from_their_files_are_open_clips(tmp_path):
    """The patch size and geometry come from the JSON files without open_clip: the configs its registry holds."""
    import json

    import open_clip

    from musc_tasks.backbone import register_model_config
    from musc_tasks.config import clip_model_config, open_clip_config_dir, open_clip_model_config

    shipped = sorted(path.stem for path in open_clip_config_dir().glob("*.json"))
    assert "ViT-L-14-336" in shipped
    for name in shipped:
        assert open_clip_model_config(name) == open_clip.get_model_config(name), name
    register_model_config(TINY_CONFIG)
    assert open_clip_model_config("musc-tiny-vit", TINY_CONFIG) == open_clip.get_model_config("musc-tiny-vit")
    assert open_clip_model_config("musc-tiny-vit") is None  # only a --model-config registers it
    # a config file registers its own name, and only with the keys open_clip requires
    assert open_clip_model_config("ViT-B-16", TINY_CONFIG) == open_clip.get_model_config("ViT-B-16")
    partial = tmp_path / "musc-partial-vit.json"
    partial.write_text(json.dumps({"vision_cfg": {"patch_size": 16}}))
    assert open_clip_model_config("musc-partial-vit", partial) is None
    assert clip_model_config("musc-partial-vit", partial) is None
