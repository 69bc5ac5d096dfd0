"""Plain references and fixtures-by-hand shared by several test modules."""

import contextlib
import errno
import os

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from musc_tasks import identity, imageio
from musc_tasks.manifests import ImageRecord


def sklearn_metrics(scores, labels):
    """AUROC, AP and F1-max as scikit-learn computes them."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return {
        "auroc": roc_auc_score(labels, scores),
        "ap": average_precision_score(labels, scores),
        "f1_max": np.max(f1[np.isfinite(f1)]),
    }


@contextlib.contextmanager
def unreadable(path):
    """``path`` cannot be opened for reading inside the block, for root too."""
    path.chmod(0)
    try:
        with pytest.MonkeyPatch.context() as patch:
            if os.access(path, os.R_OK):
                # Running as root: the OS will not refuse, so make the open refuse the way it would.
                def _refuse(name, *args, **kwargs):
                    raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(name))

                for module in (imageio, identity):  # decoding and content hashing
                    patch.setattr(module, "open", _refuse, raising=False)
            yield path
    finally:
        path.chmod(0o644)


def catalogued(path, relpath, size):
    """The catalog's record of a readable image at ``path`` of upright ``size`` (width, height)."""
    return ImageRecord(
        image_id=f"id-{relpath}",
        path=str(path),
        relpath=relpath,
        width=size[0],
        height=size[1],
        status="ok",
        reason=None,
        notes=(),
        duplicate_of=None,
    )
