"""NonMaxSuppression: greedy box selection (value-dependent output: eager only)."""

from __future__ import annotations

import numpy as np

from kiln.onnx.ops import onnx_op
from kiln.onnx.ops._common import T


def _corners(boxes: np.ndarray, center: bool) -> np.ndarray:
    """(n, 4) boxes as (x_min, y_min, x_max, y_max)."""
    if center:  # [x_center, y_center, width, height]
        half = boxes[:, 2:] / 2
        return np.concatenate([boxes[:, :2] - half, boxes[:, :2] + half], 1)
    y1, x1, y2, x2 = boxes.T  # [y1, x1, y2, x2], corners in either order
    return np.stack([np.minimum(x1, x2), np.minimum(y1, y2), np.maximum(x1, x2),
                     np.maximum(y1, y2)], 1)


def _iou_over(box: np.ndarray, others: np.ndarray, threshold: float) -> np.ndarray:
    """Which of ``others`` overlap ``box`` with IoU above ``threshold`` (as ONNX's reference:
    no overlap, or an empty box, never suppresses)."""
    w = np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0])
    h = np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1])
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + areas - inter
    ok = (inter > 0) & (area > 0) & (areas > 0) & (union > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return ok & (inter / np.where(union > 0, union, 1) > threshold)


@onnx_op("NonMaxSuppression")
def non_max_suppression(ctx, boxes, scores, max_out=None, iou=None, score_min=None):
    boxes = np.asarray(T(boxes).detach().numpy(), np.float64)
    scores = np.asarray(T(scores).detach().numpy(), np.float64)

    def scalar(i, default):
        v = ctx.static(i)
        return default if v is None or np.asarray(v).size == 0 else np.asarray(v).reshape(-1)[0]

    limit = max(int(scalar(2, 0)), 0)
    iou_threshold = float(scalar(3, 0.0))
    threshold = scalar(4, None)
    center = bool(ctx.attr("center_point_box", 0))
    selected = []
    for b in range(boxes.shape[0]):
        corners = _corners(boxes[b], center)
        for c in range(scores.shape[1]):
            s = scores[b, c]
            candidates = np.arange(s.size) if threshold is None else np.flatnonzero(s > threshold)
            order = candidates[np.lexsort((candidates, -s[candidates]))]  # score desc, index asc
            kept: list = []
            for i in order:
                if len(kept) >= limit:
                    break
                if not kept or not _iou_over(corners[i], corners[kept], iou_threshold).any():
                    kept.append(i)
                    selected.append((b, c, i))
    return np.array(selected, np.int64).reshape(-1, 3)
