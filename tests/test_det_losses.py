"""The detector training objective against slow, obvious NumPy references: the task-aligned
assigner (chosen anchors, classes, boxes, normalized scores), VFL, GIoU, DFL and the weighted total."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfws_jax.train.anchors import FlatPreds, flatten_levels
from cfws_jax.train.assign import AssignConfig, assign, assign_batch
from cfws_jax.train.boxes import giou_elementwise, iou_pairwise
from cfws_jax.train.losses import LossConfig, bbox_to_ltrb, detection_loss, dfl_loss, giou_loss, varifocal_loss

# --------------------------------------------------------------------------- NumPy references


def np_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter + 1e-9)


def np_giou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter + 1e-9
    c = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1])) + 1e-9
    return inter / union - (c - union) / c


def np_assign(scores, pboxes, points, gboxes, glabels, gmask, topk=13, alpha=1.0, beta=6.0):
    """Loop-by-loop task-aligned assignment (TOOD): returns fg [N], gt [N], labels [N], boxes [N,4],
    target scores [N, nc] (float64)."""
    n, nc = scores.shape
    m = len(gboxes)
    metric = np.zeros((m, n))
    ious = np.zeros((m, n))
    cand = np.zeros((m, n), bool)
    for g in range(m):
        if not gmask[g]:
            continue
        x1, y1, x2, y2 = (float(v) for v in gboxes[g])
        for a in range(n):
            px, py = (float(v) for v in points[a])
            cand[g, a] = min(px - x1, py - y1, x2 - px, y2 - py) > 1e-9
            ious[g, a] = np_iou(gboxes[g].astype(np.float64), pboxes[a].astype(np.float64))
            metric[g, a] = float(scores[a, glabels[g]]) ** alpha * ious[g, a] ** beta
    pos = np.zeros((m, n), bool)
    for g in range(m):
        cands = sorted((a for a in range(n) if cand[g, a]), key=lambda a: (-metric[g, a], a))
        pos[g, cands[:topk]] = True
    owner = np.full(n, -1)
    for a in range(n):
        gts = [g for g in range(m) if pos[g, a]]
        if gts:
            owner[a] = max(gts, key=lambda g: (ious[g, a], -g))  # highest IoU, lower index on ties
    fg = owner >= 0
    target = np.zeros((n, nc))
    boxes = np.zeros((n, 4))
    labels = np.zeros(n, np.int64)
    for g in range(m):
        mine = [a for a in range(n) if owner[a] == g]
        if not mine:
            continue
        max_t = max(metric[g, a] for a in mine)
        max_u = max(ious[g, a] for a in mine)
        for a in mine:
            target[a, glabels[g]] = metric[g, a] / (max_t + 1e-9) * max_u
            boxes[a] = gboxes[g]
            labels[a] = glabels[g]
    return fg, np.where(fg, owner, 0), labels, boxes, target


def np_vfl(logits, q, alpha=0.75, gamma=2.0):
    logits = logits.astype(np.float64)
    p = 1 / (1 + np.exp(-logits))
    w = np.where(q > 0, q, alpha * p ** gamma)
    bce = -(q * np.log(p) + (1 - q) * np.log(1 - p))
    return float(np.sum(w * bce))


def np_dfl(reg, target, reg_max):
    """reg [K, 4*(reg_max+1)], target [K, 4] (bins) -> per-row loss [K] (sides averaged)."""
    out = np.zeros(len(reg))
    for k in range(len(reg)):
        total = 0.0
        for side in range(4):
            z = reg[k, side * (reg_max + 1):(side + 1) * (reg_max + 1)].astype(np.float64)
            logp = z - z.max() - math.log(np.exp(z - z.max()).sum())
            y = float(target[k, side])
            yl = int(math.floor(y))
            total += (yl + 1 - y) * -logp[yl] + (y - yl) * -logp[min(yl + 1, reg_max)]
        out[k] = total / 4
    return out


# --------------------------------------------------------------------------- hand-made case


def hand_case(seed=3):
    """One 64x64 image, an 8x8 grid of anchors at stride 8 (64 anchors), 3 real gts (one large,
    one overlapping it, one small with fewer than 13 candidates) and one padding row; predicted
    boxes jittered around the anchors, random class scores (3 classes)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    points = (np.stack([xs.ravel(), ys.ravel()], -1) + 0.5) * 8.0
    half = rng.uniform(6, 20, (64, 2))
    centre = points + rng.uniform(-4, 4, (64, 2))
    pboxes = np.concatenate([centre - half, centre + half], -1)
    scores = rng.uniform(0.05, 0.95, (64, 3))
    gboxes = np.array([[2, 3, 44, 50], [20, 14, 61, 58], [44, 2, 60, 17], [0, 0, 0, 0]], np.float64)
    glabels = np.array([0, 2, 1, 0])
    gmask = np.array([True, True, True, False])
    return (scores.astype(np.float32), pboxes.astype(np.float32), points.astype(np.float32),
            gboxes.astype(np.float32), glabels.astype(np.int32), gmask)


def test_assigner_matches_numpy_reference():
    scores, pboxes, points, gboxes, glabels, gmask = hand_case()
    fg, gt, labels, boxes, target = np_assign(scores, pboxes, points, gboxes, glabels, gmask)
    # the case exercises what it should: a conflict, a gt with < 13 candidates, > 13 for another
    ref_cands = [(np.min(np.concatenate([points - b[:2], b[2:] - points], -1), -1) > 1e-9).sum() for b in gboxes[:3]]
    assert min(ref_cands) < 13 < max(ref_cands)
    assert 13 < fg.sum() < 13 * 3
    a = jax.jit(assign)(scores, pboxes, points, gboxes, glabels, gmask)
    np.testing.assert_array_equal(np.asarray(a.fg), fg)
    np.testing.assert_array_equal(np.asarray(a.gt_index), gt)
    np.testing.assert_array_equal(np.asarray(a.labels), labels)
    np.testing.assert_allclose(np.asarray(a.boxes), boxes, atol=0)
    np.testing.assert_allclose(np.asarray(a.scores), target, atol=1e-6)


def test_assigner_conflicts_resolved_by_iou():
    scores, pboxes, points, gboxes, glabels, gmask = hand_case()
    cfg = AssignConfig()
    a = assign(scores, pboxes, points, gboxes, glabels, gmask, cfg)
    ious = np.asarray(iou_pairwise(jnp.asarray(gboxes), jnp.asarray(pboxes)))
    inside = lambda g, n: np.all(points[n] > gboxes[g, :2]) and np.all(points[n] < gboxes[g, 2:])  # noqa: E731
    claimed = 0
    for n in np.flatnonzero(np.asarray(a.fg)):
        both = [g for g in (0, 1) if inside(g, n)]
        if len(both) == 2:
            claimed += 1
            assert ious[int(a.gt_index[n]), n] == ious[both, n].max()
    assert claimed > 0


def test_assigner_batched_padding_and_no_gt():
    scores, pboxes, points, gboxes, glabels, gmask = hand_case()
    empty = np.zeros_like(gmask)
    a = assign_batch(np.stack([scores, scores]), np.stack([pboxes, pboxes]), points,
                     np.stack([gboxes, gboxes]), np.stack([glabels, glabels]), np.stack([gmask, empty]))
    one = assign(scores, pboxes, points, gboxes, glabels, gmask)
    np.testing.assert_array_equal(np.asarray(a.fg[0]), np.asarray(one.fg))
    assert not np.asarray(a.fg[1]).any() and float(jnp.abs(a.scores[1]).sum()) == 0.0


@pytest.mark.parametrize("topk", [1, 4])
def test_assigner_topk(topk):
    scores, pboxes, points, gboxes, glabels, gmask = hand_case(seed=5)
    fg, gt, labels, boxes, target = np_assign(scores, pboxes, points, gboxes, glabels, gmask, topk=topk)
    a = assign(scores, pboxes, points, gboxes, glabels, gmask, AssignConfig(topk=topk))
    np.testing.assert_array_equal(np.asarray(a.fg), fg)
    np.testing.assert_array_equal(np.asarray(a.gt_index), gt)
    np.testing.assert_allclose(np.asarray(a.scores), target, atol=1e-6)


# --------------------------------------------------------------------------- losses


def test_varifocal_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 7, 4)).astype(np.float32)
    q = np.where(rng.random((2, 7, 4)) < 0.3, rng.uniform(0.05, 1, (2, 7, 4)), 0.0).astype(np.float32)
    got = float(varifocal_loss(jnp.asarray(logits), jnp.asarray(q), 0.75, 2.0))
    np.testing.assert_allclose(got, np_vfl(logits, q), rtol=2e-5)
    # negatives only: alpha * p^gamma * -log(1 - p)
    got0 = float(varifocal_loss(jnp.asarray(logits[:1, :1, :1]), jnp.zeros((1, 1, 1))))
    p = 1 / (1 + math.exp(-float(logits[0, 0, 0])))
    np.testing.assert_allclose(got0, 0.75 * p * p * -math.log(1 - p), rtol=1e-5)


def test_varifocal_weight_has_no_gradient():
    logits = jnp.array([[1.5, -0.5]])
    q = jnp.array([[0.0, 0.7]])
    g = jax.grad(lambda z: varifocal_loss(z, q))(logits)
    p = jax.nn.sigmoid(logits)
    w = jnp.where(q > 0, q, 0.75 * p ** 2)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w * (p - q)), rtol=1e-5)


def test_giou_matches_numpy():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 50, (40, 2))
    a = np.concatenate([a, a + rng.uniform(1, 30, (40, 2))], -1)
    b = rng.uniform(0, 50, (40, 2))
    b = np.concatenate([b, b + rng.uniform(1, 30, (40, 2))], -1)
    b[:5] = a[:5]  # identical boxes: GIoU 1
    b[5] = a[5] + 100  # disjoint and far: GIoU close to -1
    got = np.asarray(giou_elementwise(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
    ref = np.array([np_giou(x, y) for x, y in zip(a, b)])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(got[:5], 1.0, atol=1e-6)
    w = rng.uniform(0, 1, 40).astype(np.float32)
    fg = rng.random(40) < 0.5
    loss = float(giou_loss(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), jnp.asarray(w), jnp.asarray(fg)))
    np.testing.assert_allclose(loss, np.sum(((1 - ref) * w)[fg]), rtol=1e-5)


def test_dfl_matches_numpy():
    reg_max = 6
    rng = np.random.default_rng(2)
    reg = rng.normal(0, 2, (9, 4 * (reg_max + 1))).astype(np.float32)
    target = rng.uniform(0, reg_max - 0.01, (9, 4)).astype(np.float32)
    target[0] = [0.0, 1.0, 2.5, reg_max - 0.01]  # bin edges and the clip limit
    w = rng.uniform(0, 1, 9).astype(np.float32)
    fg = np.array([True] * 6 + [False] * 3)
    got = float(dfl_loss(jnp.asarray(reg), jnp.asarray(target), jnp.asarray(w), jnp.asarray(fg), reg_max))
    np.testing.assert_allclose(got, np.sum((np_dfl(reg, target, reg_max) * w)[fg]), rtol=1e-5)


def test_bbox_to_ltrb_clips_to_bins():
    pts = jnp.array([[12.0, 12.0]])
    box = jnp.array([[4.0, 0.0, 200.0, 13.0]])
    got = np.asarray(bbox_to_ltrb(pts, box, jnp.array([8.0]), 16))
    np.testing.assert_allclose(got, [[1.0, 1.5, 15.99, 0.125]], rtol=1e-6)


def test_detection_loss_total_matches_numpy():
    """The weighted total on a 2-image batch with a DFL head (reg_max 4): NumPy assignment, then
    the NumPy VFL / GIoU / DFL, normalized by the summed target scores."""
    reg_max, nc = 4, 3
    rng = np.random.default_rng(4)
    levels = [(jnp.asarray(rng.normal(0, 1, (2, 4, 4, nc)), jnp.float32),
               jnp.asarray(rng.normal(0, 1, (2, 4, 4, 4 * (reg_max + 1))), jnp.float32), None),
              (jnp.asarray(rng.normal(0, 1, (2, 2, 2, nc)), jnp.float32),
               jnp.asarray(rng.normal(0, 1, (2, 2, 2, 4 * (reg_max + 1))), jnp.float32), None)]
    preds = flatten_levels(levels, (32, 32), reg_max)
    assert isinstance(preds, FlatPreds) and preds.boxes.shape == (2, 20, 4)
    gboxes = np.array([[[2, 2, 20, 25], [12, 8, 31, 30]], [[5, 5, 28, 18], [0, 0, 0, 0]]], np.float32)
    glabels = np.array([[1, 2], [0, 0]], np.int32)
    gmask = np.array([[True, True], [True, False]])
    cfg = LossConfig()
    loss, pieces = detection_loss(preds, gboxes, glabels, gmask, reg_max, cfg)

    cls, reg = np.asarray(preds.cls), np.asarray(preds.reg)
    pb, pts, st = np.asarray(preds.boxes), np.asarray(preds.points), np.asarray(preds.strides)
    vfl = iou = dfl = norm = 0.0
    for i in range(2):
        fg, _, _, boxes, target = np_assign(1 / (1 + np.exp(-cls[i])), pb[i], pts, gboxes[i], glabels[i], gmask[i])
        norm += target.sum()
        vfl += np_vfl(cls[i], target)
        w = target.sum(-1)
        for n in np.flatnonzero(fg):
            iou += (1 - np_giou(pb[i, n].astype(np.float64), boxes[n])) * w[n]
            t = np.clip(np.concatenate([pts[n] - boxes[n, :2], boxes[n, 2:] - pts[n]]) / st[n], 0, reg_max - 0.01)
            dfl += np_dfl(reg[i, n:n + 1], t[None], reg_max)[0] * w[n]
    norm = max(norm, 1.0)
    ref = {"cls": vfl / norm, "iou": 2.5 * iou / norm, "dfl": 0.5 * dfl / norm}
    for k, v in ref.items():
        np.testing.assert_allclose(float(pieces[k]), v, rtol=1e-4, err_msg=k)
    np.testing.assert_allclose(float(loss), sum(ref.values()), rtol=1e-4)
    assert float(pieces["fg"]) > 0
