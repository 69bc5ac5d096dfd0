"""Image- and pixel-level anomaly detection metrics (AUROC, AP, F1-max, AUPRO).

Everything comes from one ascending ``np.sort`` of all scores plus binary
searches for the positives' distinct values only, so pixel metrics on tens of
millions of pixels take about a second. Run-time deps: numpy and
``skimage.measure.label``.
"""

import numpy as np
from skimage.measure import label as _sk_label

__all__ = ["image_metrics", "pixel_metrics", "aupro", "pro_musc"]


def image_metrics(scores, labels):
    """Image-level AUROC, average precision and maximal F1.

    Parameters
    ----------
    scores : (N,) real array
        Anomaly score per image; higher means more anomalous. Must be finite.
    labels : (N,) bool or int array
        Ground truth, values in {0, 1}; 1 means anomalous.

    Returns
    -------
    dict
        ``auroc``, ``ap`` and ``f1_max`` as Python floats in [0, 1]. They
        follow scikit-learn's ``roc_auc_score``, ``average_precision_score``
        and the maximum of ``2PR/(P+R)`` over ``precision_recall_curve``.

    Raises
    ------
    ValueError
        On shape mismatch, non-finite scores, label values outside {0, 1}, or
        when ``labels`` holds a single class.
    """
    scores = _as_scores(scores, "scores", ndim=1)
    labels = _as_binary(labels, "labels", scores.shape)
    _require_both_classes(labels, "labels")
    curve = _positive_curve(np.sort(scores), np.sort(scores[labels]))
    return _curve_metrics(curve)


def pixel_metrics(maps, masks, *, pro=True, fpr_limit=0.3, steps=200):
    """Pixel-level AUROC, AP, F1-max and, optionally, AUPRO and MuSc's PRO.

    Parameters
    ----------
    maps : (N, H, W) real array
        Anomaly maps; higher means more anomalous. Must be finite.
    masks : (N, H, W) bool or int array
        Ground-truth masks, values in {0, 1}.
    pro : bool, default True
        Also compute ``aupro`` (see :func:`aupro`) and ``pro_musc`` (see
        :func:`pro_musc`).
    fpr_limit : float, default 0.3
        FPR integration limit for both PRO numbers.
    steps : int, default 200
        Threshold steps for ``pro_musc``.

    Returns
    -------
    dict
        ``auroc``, ``ap``, ``f1_max`` and, when ``pro`` is true, ``aupro`` and
        ``pro_musc``, as Python floats (``pro_musc`` may be nan, see
        :func:`pro_musc`).

    Raises
    ------
    ValueError
        On shape mismatch, non-finite maps, mask values outside {0, 1}, or
        when ``masks`` is all 0 or all 1.

    Notes
    -----
    All five numbers share one sort of the ``N*H*W`` scores. Extra memory is
    one sorted copy of ``maps`` (``N*H*W*itemsize`` bytes, 108 MB for
    100x518x518 float32), the boolean mask copy if ``masks`` is not bool,
    and roughly 150 bytes per anomalous pixel.
    """
    maps, masks = _as_maps_masks(maps, masks)
    _require_both_classes(masks, "masks")
    if pro:
        _check_fpr_limit(fpr_limit)
        _check_steps(steps)
    sorted_scores = np.sort(maps, axis=None)
    if not pro:
        curve = _positive_curve(sorted_scores, np.sort(maps[masks]))
        return _curve_metrics(curve)
    pos_scores, pos_region, n_regions = _regions(maps, masks)
    order = np.argsort(pos_scores)
    curve = _positive_curve(sorted_scores, pos_scores[order])
    weights = _region_weights(pos_region, n_regions)
    out = _curve_metrics(curve)
    out["aupro"] = _aupro_from_curve(curve, weights[order], fpr_limit=fpr_limit)
    out["pro_musc"] = _pro_musc_core(sorted_scores, pos_scores, weights, steps=steps, fpr_limit=fpr_limit)
    return out


def aupro(maps, masks, *, fpr_limit=0.3):
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD).

    Ground-truth regions are the 8-connected components of each mask. For
    every distinct score threshold ``t`` (a pixel is positive iff its score
    is ``>= t``), PRO is the mean over all regions of all images of the
    fraction of the region detected, and FPR is the fraction of all normal
    pixels detected. The curve gets (0, 0) prepended and (1, 1) appended,
    is clipped to <= 1, and is integrated over FPR in [0, ``fpr_limit``] with
    the trapezoid rule, linearly interpolating PRO at ``fpr_limit`` when it
    falls between two FPR values. The area is divided by ``fpr_limit``.

    Parameters
    ----------
    maps : (N, H, W) real array
        Anomaly maps. Must be finite.
    masks : (N, H, W) bool or int array
        Ground-truth masks, values in {0, 1}.
    fpr_limit : float, default 0.3
        Upper integration limit, in (0, 1].

    Returns
    -------
    float
        AUPRO in [0, 1]; 1.0 for a perfect detector.

    Raises
    ------
    ValueError
        On shape mismatch, non-finite maps, bad mask values, ``fpr_limit``
        outside (0, 1], no anomalous region, or no normal pixel.
    """
    _check_fpr_limit(fpr_limit)
    maps, masks = _as_maps_masks(maps, masks)
    _require_both_classes(masks, "masks")
    pos_scores, pos_region, n_regions = _regions(maps, masks)
    order = np.argsort(pos_scores)
    curve = _positive_curve(np.sort(maps, axis=None), pos_scores[order])
    weights = _region_weights(pos_region, n_regions)[order]
    return _aupro_from_curve(curve, weights, fpr_limit=fpr_limit)


def pro_musc(maps, masks, *, steps=200, fpr_limit=0.3):
    """PRO score as reported by MuSc (the VAND / APRIL-GAN evaluation).

    Thresholds are ``np.arange(lo, hi, (hi - lo) / steps)`` with ``lo, hi``
    the min and max of ``maps`` and the step computed in the maps' dtype, so
    there may be ``steps + 1`` of them. At threshold ``th`` a pixel is
    positive iff its score is ``> th``. PRO(th) is the mean over all
    8-connected ground-truth regions of all images of the detected fraction;
    FPR(th) is the detected fraction of all normal pixels. Only thresholds
    with FPR < ``fpr_limit`` are kept, their FPRs are min-max rescaled to
    [0, 1], and the result is the trapezoid area under PRO against the
    rescaled FPR (a positive number, as ``sklearn.metrics.auc`` gives).

    Parameters
    ----------
    maps : (N, H, W) real array
        Anomaly maps. Must be finite.
    masks : (N, H, W) bool or int array
        Ground-truth masks, values in {0, 1}.
    steps : int, default 200
        Number of threshold steps, >= 1.
    fpr_limit : float, default 0.3
        Strict upper bound on the kept FPRs, in (0, 1].

    Returns
    -------
    float
        The score, or nan when it is undefined: all map values equal, fewer
        than two thresholds kept, or all kept FPRs equal (the reference then
        raises or divides 0 by 0).

    Raises
    ------
    ValueError
        On shape mismatch, non-finite maps, bad mask values, bad ``steps`` or
        ``fpr_limit``, no anomalous region, or no normal pixel.
    """
    _check_steps(steps)
    _check_fpr_limit(fpr_limit)
    maps, masks = _as_maps_masks(maps, masks)
    _require_both_classes(masks, "masks")
    pos_scores, pos_region, n_regions = _regions(maps, masks)
    return _pro_musc_core(
        np.sort(maps, axis=None),
        pos_scores,
        _region_weights(pos_region, n_regions),
        steps=steps,
        fpr_limit=fpr_limit,
    )


# --------------------------------------------------------------------------
# validation


def _as_scores(x, name, *, ndim):
    x = np.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    if x.dtype == bool or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    if not np.isfinite(x).all():
        n_bad = np.count_nonzero(~np.isfinite(x))
        raise ValueError(f"{name} must be finite, got {n_bad} non-finite values")
    return x


def _as_binary(y, name, shape):
    y = np.asarray(y)
    if y.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {y.shape}")
    if y.dtype == bool:
        return y
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{name} must be bool or numeric, got dtype {y.dtype}")
    is_one = y == 1
    if not np.logical_or(is_one, y == 0).all():
        bad = np.unique(y[~np.logical_or(is_one, y == 0)])[:5]
        raise ValueError(f"{name} must only hold 0 and 1, got values such as {bad.tolist()}")
    return is_one


def _as_maps_masks(maps, masks):
    maps = _as_scores(maps, "maps", ndim=3)
    masks = _as_binary(masks, "masks", maps.shape)
    return maps, masks


def _require_both_classes(y, name):
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(f"{name} must contain both classes, got {n_pos} positives out of {y.size}")


def _check_fpr_limit(fpr_limit):
    is_real = isinstance(fpr_limit, (int, float, np.integer, np.floating))
    if isinstance(fpr_limit, (bool, np.bool_)) or not (is_real and 0.0 < float(fpr_limit) <= 1.0):
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")


def _check_steps(steps):
    if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


# --------------------------------------------------------------------------
# curves


def _positive_curve(sorted_scores, pos_sorted):
    """Counts at the distinct positive scores, from the highest down.

    Between two consecutive distinct positive scores only negatives are
    crossed, so TPR/PRO stay flat there; the ROC and PRO curves are thus fully
    described at these values, and no work is spent on the (many) distinct
    negative-only scores.

    Parameters
    ----------
    sorted_scores : (P,) float array, ascending
        All scores.
    pos_sorted : (Q,) float array, ascending
        Scores of the positives, a sub-multiset of ``sorted_scores``.

    Returns
    -------
    tuple
        ``(first, tp, fp_gt, fp_ge, n_pos, n_neg)``: for the k-th largest
        distinct positive value ``v_k`` (arrays of length M), ``first`` is the
        index in ``pos_sorted`` of its first occurrence, ``tp`` the number of
        positives ``>= v_k``, ``fp_gt`` / ``fp_ge`` the numbers of negatives
        ``> v_k`` / ``>= v_k``; then the class totals.
    """
    n, n_pos = sorted_scores.size, pos_sorted.size
    new_run = np.empty(n_pos, dtype=bool)
    new_run[0] = True
    np.not_equal(pos_sorted[1:], pos_sorted[:-1], out=new_run[1:])
    starts = np.flatnonzero(new_run)
    values = pos_sorted[starts]
    tp_ge = n_pos - starts
    tp_gt = n_pos - np.append(starts[1:], n_pos)
    all_ge = n - np.searchsorted(sorted_scores, values, side="left")
    all_gt = n - np.searchsorted(sorted_scores, values, side="right")
    rev = slice(None, None, -1)
    return (starts[rev], tp_ge[rev], (all_gt - tp_gt)[rev], (all_ge - tp_ge)[rev], n_pos, n - n_pos)


def _step_curve(fp_gt, fp_ge, y, n_neg):
    """Vertices of the piecewise-linear curve y(FPR) from (0, 0) to (1, y[-1]).

    Just above ``v_k`` the curve is at (fp_gt_k, y_{k-1}); at ``v_k``, where
    ties between negatives and positives make a sloped segment, it reaches
    (fp_ge_k, y_k).
    """
    m = y.size
    x_out = np.empty(2 * m + 2)
    y_out = np.empty(2 * m + 2)
    x_out[0], y_out[0] = 0.0, 0.0
    x_out[1:-1:2] = fp_gt / n_neg
    x_out[2:-1:2] = fp_ge / n_neg
    y_out[1] = 0.0
    y_out[3:-1:2] = y[:-1]
    y_out[2:-1:2] = y
    x_out[-1], y_out[-1] = 1.0, y[-1]
    return x_out, y_out


def _curve_metrics(curve):
    _, tp, fp_gt, fp_ge, n_pos, n_neg = curve
    tp = tp.astype(np.float64)
    x, y = _step_curve(fp_gt, fp_ge, tp / n_pos, n_neg)
    auroc = _trapezoid(y, x)
    # Recall only moves at positive-containing thresholds, so these are the
    # only non-zero terms of sum_n (R_n - R_{n-1}) P_n.
    precision = tp / (tp + fp_ge)
    ap = float(np.sum(np.diff(tp, prepend=0.0) / n_pos * precision))
    # 2PR/(P+R) = 2TP/(TP+FP+n_pos); below each positive value only FP grows,
    # so the maximum over all thresholds is reached at these values.
    f1 = 2.0 * tp / (tp + fp_ge + n_pos)
    return {"auroc": auroc, "ap": ap, "f1_max": float(f1.max())}


def _trapezoid(y, x):
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


# --------------------------------------------------------------------------
# regions and PRO


def _regions(maps, masks):
    """Anomalous pixels' scores with global 8-connected region ids.

    Returns
    -------
    pos_scores : (Q,) float array
        ``maps[masks]`` gathered image by image.
    pos_region : (Q,) int64 array
        Region id of each anomalous pixel, in [0, R).
    n_regions : int
        R, the total number of regions over all images.
    """
    scores, regions = [], []
    offset = 0
    for amap, mask in zip(maps, masks):
        if not mask.any():
            continue
        lab, n = _sk_label(mask, connectivity=2, return_num=True)
        scores.append(amap[mask])
        regions.append(lab[mask].astype(np.int64) + (offset - 1))
        offset += n
    if offset == 0:
        raise ValueError("masks must contain at least one anomalous region, got none")
    return np.concatenate(scores), np.concatenate(regions), offset


def _region_weights(pos_region, n_regions):
    # Each pixel of region r adds 1 / (|r| * R) to PRO, so PRO is a cumsum.
    area = np.bincount(pos_region, minlength=n_regions).astype(np.float64)
    return 1.0 / (area[pos_region] * n_regions)


def _aupro_from_curve(curve, weights, *, fpr_limit):
    """``weights`` must be aligned with the ascending ``pos_sorted`` of ``curve``."""
    first, _, fp_gt, fp_ge, n_pos, n_neg = curve
    # Sum from the highest score down, as the threshold sweep does.
    pro_desc = np.cumsum(weights[::-1])
    pro = pro_desc[n_pos - 1 - first]
    fpr, pro = _step_curve(fp_gt, fp_ge, pro, n_neg)
    fpr = np.minimum(np.append(fpr, 1.0), 1.0)
    pro = np.minimum(np.append(pro, 1.0), 1.0)
    return float(_partial_trapezoid(fpr, pro, float(fpr_limit)) / float(fpr_limit))


def _partial_trapezoid(x, y, x_max):
    """Trapezoid area under y(x) on [x[0], x_max]; x non-decreasing, x_max in (x[0], x[-1]]."""
    k = int(np.searchsorted(x, x_max, side="right"))
    area = _trapezoid(y[:k], x[:k])
    if x[k - 1] != x_max:
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y_at + y0) * (x_max - x0)
    return area


def _floor_to_dtype(th, dtype):
    """Largest values of ``dtype`` that are <= ``th``.

    For any ``s`` of ``dtype``, ``s > th`` iff ``s > floor``, so comparisons
    can stay in ``dtype``.
    """
    low = th.astype(dtype)
    too_high = low > th  # mixed-dtype float comparison promotes, hence exact
    low[too_high] = np.nextafter(low[too_high], np.asarray(-np.inf, dtype=dtype))
    return low


def _pro_musc_core(sorted_scores, pos_scores, weights, *, steps, fpr_limit):
    """``weights`` are the anomalous pixels' PRO weights, aligned with ``pos_scores``."""
    lo, hi = sorted_scores[0], sorted_scores[-1]
    # Numpy scalar arithmetic in the maps' dtype, exactly as the reference.
    delta = (hi - lo) / steps
    if not delta > 0:
        return float("nan")
    thresholds = np.arange(lo, hi, delta)
    k = thresholds.size
    # Compare in the scores' dtype without copying 27M scores to float64.
    th = _floor_to_dtype(thresholds, sorted_scores.dtype)
    # bins[i] = number of thresholds strictly below the pixel's score, i.e.
    # the pixel is positive at threshold j iff j < bins[i].
    bins = np.searchsorted(th, pos_scores, side="left")
    # The mean over regions of (detected / area) is a sum of per-pixel
    # weights, so no (regions x thresholds) table is needed.
    per_bin = np.bincount(bins, weights=weights, minlength=k + 1)
    pro = np.cumsum(per_bin[::-1])[::-1][1:]
    pos_per_bin = np.bincount(bins, minlength=k + 1)
    pos_above = np.cumsum(pos_per_bin[::-1])[::-1][1:]
    all_above = sorted_scores.size - np.searchsorted(sorted_scores, th, side="right")
    n_neg = sorted_scores.size - pos_scores.size
    fpr = (all_above - pos_above) / float(n_neg)
    keep = fpr < fpr_limit
    x, y = fpr[keep], pro[keep]
    if x.size < 2 or x.max() == x.min():
        return float("nan")
    x = (x - x.min()) / (x.max() - x.min())
    # FPR falls as the threshold rises; the reference's auc() flips the sign.
    return float(abs(_trapezoid(y, x)))
