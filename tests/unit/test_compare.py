"""`musc compare` pairs images by content, not by path."""

import pandas as pd

from musc_tasks.compare import compare_backbones


def test_images_pair_by_content_hash_even_when_renamed():
    rows = [
        # backbone a saw bolt/1.png, backbone b the same bytes renamed to bolt/1-renamed.png
        ("a", "h0", "bolt/0.png", 0.1, False),
        ("a", "h1", "bolt/1.png", 0.9, True),
        ("a", "h2", "bolt/2.png", 0.5, False),
        ("a", "h2", "bolt/2-copy.png", 0.5, False),  # duplicate content: counted once
        ("b", "h0", "bolt/0.png", 0.2, False),
        ("b", "h1", "bolt/1-renamed.png", 0.3, False),
        ("b", "h2", "bolt/2.png", 0.8, True),
    ]
    scores = pd.DataFrame(rows, columns=["backbone_key", "image_id", "path", "score", "flagged"])
    summary, changed = compare_backbones(scores.assign(product="bolt", status="scored"), "a", "b")
    assert summary.to_dict("records")[0] | {"spearman": None} == {
        "product": "bolt",
        "images": 3,
        "spearman": None,
        "flagged_a": 1,
        "flagged_b": 1,
        "changed": 2,
    }
    # same content under two names: reported under the first path in sorted order, as the catalog does
    assert list(changed["path"]) == ["bolt/1.png", "bolt/2-copy.png"]
    assert list(changed.columns) == ["product", "path", "score_a", "flagged_a", "score_b", "flagged_b"]
