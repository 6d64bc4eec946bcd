"""Evaluation metrics from counts, in numpy: the same numbers as scikit-learn, computed in chunks.

Every metric is split the torchmetrics way: ``validate`` the chunk, ``update`` mergeable counts, and
``compute`` the scores from the counts at the end. Scoring a stream chunk by chunk is then a sum of
counts, which is how ``/evaluate`` scores a million rows in bounded memory, and ``a.merge(b)`` of
two accumulators scores the union of their rows.

Semantics follow scikit-learn (the test oracle; never imported here):

* Classification counts live in one confusion matrix over the model's *full* label list (rows are
  true classes, columns predictions, in label order), as ``confusion_matrix(..., labels=labels)``. A
  class absent from both labels and predictions therefore still enters the macro mean
  (``precision_recall_fscore_support(..., labels=labels)``).
* ``zero_division`` is 0, 1 or ``"nan"``; a NaN class is dropped from the macro/weighted mean, and a
  weighted mean whose supports are all zero falls back to the plain mean (``_nanaverage``).
* F1 per class is ``2 tp / (2 tp + fp + fn)``; macro F1 is the mean of per-class F1 (not the harmonic
  mean of macro precision and recall).
* Top-k accuracy ranks classes as ``top_k_accuracy_score``: by score, ties broken towards the higher
  class index; a two-class model with ``k == 1`` thresholds the second column at 0.5.
* Log loss clips probabilities to ``[eps, 1 - eps]`` with ``eps`` the machine epsilon of the
  probabilities' dtype (scikit-learn ≥ 1.5), then sums ``-log p[true class]`` in float64.
* Binary ROC AUC is exact: the accumulator keeps, per *distinct* score, how many positive and negative
  rows had it (ties count half, as the trapezoid of ``roc_curve`` does), compacted LSM-style (pending
  chunks are merged once they outgrow the merged part, so the sorting cost stays O(n log n) overall).
  Memory is O(distinct scores), not O(rows): 20 bytes per distinct float32 score, at most one per row
  (20 MB for a million rows, briefly about three times that while compacting). A histogram would be
  bounded but not exact; float32 probabilities cap the distinct values at about 2**30. Only two-class
  models keep this state.
* Regression keeps running sums (squared and absolute error, max error) and the target's count, mean
  and centred sum of squares, merged with Chan's parallel formula. R² uses ``force_finite``: a constant
  target scores 1.0 for perfect predictions and 0.0 otherwise; fewer than two rows give NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from app.errors import InvalidInput

ZeroDivision: TypeAlias = Literal[0, 1, "nan"]
Average: TypeAlias = Literal["micro", "macro", "weighted"]
AVERAGES: tuple[Average, ...] = ("micro", "macro", "weighted")

FloatArray: TypeAlias = npt.NDArray[np.float64]
IntArray: TypeAlias = npt.NDArray[np.int64]


def parse_zero_division(value: object) -> ZeroDivision:
    """Read a request's ``zero_division`` (0, 1, "nan"; default 0) or raise `InvalidInput`."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise InvalidInput('zero_division must be 0, 1 or "nan"')
    if isinstance(value, int | float) and value in (0, 1):
        return 0 if value == 0 else 1
    if isinstance(value, str) and value.strip().lower() in {"0", "1", "nan"}:
        text = value.strip().lower()
        return "nan" if text == "nan" else (0 if text == "0" else 1)
    raise InvalidInput(f'zero_division must be 0, 1 or "nan", got {value!r}')


def _zero_division_value(zero_division: ZeroDivision) -> float:
    return math.nan if zero_division == "nan" else float(zero_division)


# --------------------------------------------------------------------------------------------------
# validate


def validate_class_indices(y: npt.ArrayLike, n_classes: int, what: str = "labels") -> IntArray:
    """Return ``y`` as int64 class indices, or raise `InvalidInput` naming the first bad row (0-based)."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise InvalidInput(f"{what} must be one-dimensional, got shape {list(arr.shape)}")
    if arr.dtype.kind == "b" or arr.dtype.kind not in "iu":
        raise InvalidInput(f"{what} must be integer class indices, got dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= n_classes))
    if bad.size:
        row = int(bad[0])
        raise InvalidInput(
            f"{what}: row {row}: class index {int(arr[row])} is not among the model's "
            f"{n_classes} classes (0..{n_classes - 1})"
        )
    return arr.astype(np.int64, copy=False)


def _validate_probabilities(probabilities: npt.ArrayLike, n_rows: int, n_classes: int) -> npt.NDArray[Any]:
    p = np.asarray(probabilities)
    if p.dtype.kind != "f":
        p = p.astype(np.float64)
    if p.shape != (n_rows, n_classes):
        raise InvalidInput(f"probabilities must have shape [{n_rows}, {n_classes}], got {list(p.shape)}")
    return p


def _same_length(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any], what: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise InvalidInput(f"{what}: {a.shape[0]} labels but {b.shape[0]} predictions")


# --------------------------------------------------------------------------------------------------
# classification: counts


def confusion_counts(y_true: IntArray, y_pred: IntArray, n_classes: int) -> IntArray:
    """Confusion matrix ``[n_classes, n_classes]`` (rows true, columns predicted) by one bincount."""
    flat = y_true * n_classes + y_pred
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes).astype(np.int64)


def top_k_hits(y_true: IntArray, probabilities: npt.NDArray[Any], k: int) -> int:
    """How many rows have their true class among the ``k`` best scores (scikit-learn's tie rule)."""
    n_classes = probabilities.shape[1]
    if k >= n_classes:
        return int(y_true.shape[0])
    if n_classes == 2 and k == 1:
        return int(np.count_nonzero((probabilities[:, 1] > 0.5).astype(np.int64) == y_true))
    rows = np.arange(y_true.shape[0])
    true_score = probabilities[rows, y_true][:, None]
    # sklearn sorts by score with a stable sort and reverses it: among equal scores the higher
    # class index ranks first. So a class j outranks the true class t when s_j > s_t, or s_j == s_t
    # and j > t.
    higher_index = np.arange(n_classes)[None, :] > y_true[:, None]
    ahead = (probabilities > true_score) | ((probabilities == true_score) & higher_index)
    return int(np.count_nonzero(ahead.sum(axis=1) < k))


def log_loss_sum(y_true: IntArray, probabilities: npt.NDArray[Any]) -> float:
    """Sum over rows of ``-log(clip(p[true class], eps, 1 - eps))``, eps of the probabilities' dtype."""
    dtype = probabilities.dtype if probabilities.dtype.kind == "f" else np.dtype(np.float64)
    eps = np.finfo(dtype).eps
    p_true = probabilities[np.arange(y_true.shape[0]), y_true]
    clipped = np.clip(p_true, eps, 1 - eps).astype(np.float64)
    return float(-np.sum(np.log(clipped)))


@dataclass
class BinaryRocCounts:
    """Exact, mergeable state for binary ROC AUC: positives and negatives per distinct score."""

    scores: npt.NDArray[Any] = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    positives: IntArray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    negatives: IntArray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    _pending: list[tuple[npt.NDArray[Any], IntArray, IntArray]] = field(default_factory=list)
    _pending_rows: int = 0

    def update(self, is_positive: npt.NDArray[np.bool_], scores: npt.NDArray[Any]) -> None:
        """Add rows; the compaction into sorted distinct scores is amortised (LSM-style)."""
        if scores.shape[0] == 0:
            return
        uniq, inverse = np.unique(scores, return_inverse=True)
        pos = np.bincount(inverse, weights=is_positive, minlength=uniq.shape[0]).astype(np.int64)
        total = np.bincount(inverse, minlength=uniq.shape[0]).astype(np.int64)
        self._pending.append((uniq, pos, total - pos))
        self._pending_rows += uniq.shape[0]
        if self._pending_rows > max(65536, self.scores.shape[0]):
            self._compact()

    def merge(self, other: BinaryRocCounts) -> None:
        """Add another accumulator's rows."""
        other._compact()
        self._pending.append((other.scores, other.positives, other.negatives))
        self._pending_rows += other.scores.shape[0]
        self._compact()

    def _compact(self) -> None:
        if not self._pending:
            return
        parts = [(self.scores, self.positives, self.negatives), *self._pending]
        dtypes = [s.dtype for s, _, _ in parts if s.shape[0]] or [np.dtype(np.float64)]
        dtype = np.result_type(*dtypes)
        all_scores = np.concatenate([s.astype(dtype, copy=False) for s, _, _ in parts])
        uniq, inverse = np.unique(all_scores, return_inverse=True)
        self.scores = uniq
        self.positives = np.bincount(
            inverse, weights=np.concatenate([p for _, p, _ in parts]), minlength=uniq.shape[0]
        ).astype(np.int64)
        self.negatives = np.bincount(
            inverse, weights=np.concatenate([n for _, _, n in parts]), minlength=uniq.shape[0]
        ).astype(np.int64)
        self._pending = []
        self._pending_rows = 0

    def auc(self) -> float:
        """Area under the ROC curve; NaN when only one class is present (as scikit-learn warns)."""
        self._compact()
        n_pos = int(self.positives.sum())
        n_neg = int(self.negatives.sum())
        if n_pos == 0 or n_neg == 0:
            return math.nan
        # Mann-Whitney U with ties counted half: for each score, its negatives are beaten by every
        # positive with a higher score, and tie with its own positives. Integer-valued float64 sums
        # are exact below 2**53, so only the final division rounds.
        pos = self.positives.astype(np.float64)
        neg = self.negatives.astype(np.float64)
        pos_above = np.cumsum(pos[::-1])[::-1] - pos  # positives with a strictly higher score
        twice_u = 2.0 * float(np.dot(neg, pos_above)) + float(np.dot(neg, pos))
        return twice_u / (2.0 * n_pos * n_neg)

    @property
    def n_distinct(self) -> int:
        """Distinct scores held (the memory this state needs, in entries)."""
        self._compact()
        return int(self.scores.shape[0])


# --------------------------------------------------------------------------------------------------
# classification: compute


@dataclass(frozen=True)
class PrecisionRecallF1:
    """Per-class precision, recall, F1 and support, plus their micro/macro/weighted averages."""

    precision: FloatArray
    recall: FloatArray
    f1: FloatArray
    support: IntArray
    averages: dict[Average, dict[str, float]]


def _divide(numerator: FloatArray, denominator: FloatArray, zero_division: ZeroDivision) -> FloatArray:
    mask = denominator == 0
    safe = np.where(mask, 1.0, denominator)
    result = numerator / safe
    result[mask] = _zero_division_value(zero_division)
    return result


def _nanaverage(values: FloatArray, weights: FloatArray | None = None) -> float:
    """scikit-learn's ``_nanaverage``: drop NaN entries; all-zero weights fall back to a plain mean."""
    if values.shape[0] == 0:
        return math.nan
    keep = ~np.isnan(values)
    if not keep.any():
        return math.nan
    kept = values[keep]
    if weights is None:
        return float(np.mean(kept))
    w = weights[keep]
    total = float(np.sum(w))
    if total == 0:
        return float(np.mean(kept))
    return float(np.sum(kept * w) / total)


def precision_recall_f1(confusion: IntArray, zero_division: ZeroDivision = 0) -> PrecisionRecallF1:
    """Precision, recall and F1 per class and averaged, from a confusion matrix (sklearn semantics)."""
    tp = np.diag(confusion).astype(np.float64)
    pred_sum = confusion.sum(axis=0).astype(np.float64)
    true_sum = confusion.sum(axis=1).astype(np.float64)

    def scores(tp_: FloatArray, pred_: FloatArray, true_: FloatArray) -> tuple[FloatArray, ...]:
        precision = _divide(tp_, pred_, zero_division)
        recall = _divide(tp_, true_, zero_division)
        f1 = _divide(2.0 * tp_, true_ + pred_, zero_division)
        return precision, recall, f1

    precision, recall, f1 = scores(tp, pred_sum, true_sum)
    averages: dict[Average, dict[str, float]] = {}
    micro = scores(np.array([tp.sum()]), np.array([pred_sum.sum()]), np.array([true_sum.sum()]))
    averages["micro"] = {
        name: float(v[0]) for name, v in zip(("precision", "recall", "f1"), micro, strict=True)
    }
    averages["macro"] = {
        name: _nanaverage(v)
        for name, v in zip(("precision", "recall", "f1"), (precision, recall, f1), strict=True)
    }
    averages["weighted"] = {
        name: _nanaverage(v, true_sum)
        for name, v in zip(("precision", "recall", "f1"), (precision, recall, f1), strict=True)
    }
    return PrecisionRecallF1(precision, recall, f1, confusion.sum(axis=1).astype(np.int64), averages)


def accuracy_from_confusion(confusion: IntArray) -> float:
    """Fraction of rows on the diagonal (NaN for no rows)."""
    total = int(confusion.sum())
    return float(np.trace(confusion) / total) if total else math.nan


def default_top_k(n_classes: int) -> int:
    """The k reported when a request names none: 5, or fewer for small label sets (at least 1)."""
    return max(1, min(5, n_classes - 1))


@dataclass
class ClassificationAccumulator:
    """Mergeable counts for every classification metric: update per chunk, compute once.

    Args:
        n_classes: size of the model's label list.
        top_k: the k of top-k accuracy.
        pos_label: class index treated as positive for ROC AUC (two-class models only; default 1,
            the second class, whose probability is the model's score).
    """

    n_classes: int
    top_k: int = 1
    pos_label: int | None = None
    confusion: IntArray = field(init=False)
    top_k_hits: int = 0
    _log_loss_parts: list[float] = field(default_factory=list)
    probability_rows: int = 0
    roc: BinaryRocCounts | None = field(init=False)

    def __post_init__(self) -> None:
        if self.n_classes < 1:
            raise InvalidInput("a classifier needs at least one class")
        if self.top_k < 1:
            raise InvalidInput(f"top_k must be a positive integer, got {self.top_k}")
        if self.n_classes == 2:
            self.pos_label = 1 if self.pos_label is None else self.pos_label
            if self.pos_label not in (0, 1):
                raise InvalidInput(f"pos_label index {self.pos_label} is not among the model's classes")
            self.roc = BinaryRocCounts()
        else:
            self.roc = None
        self.confusion = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)

    @property
    def n(self) -> int:
        """Rows counted so far."""
        return int(self.confusion.sum())

    def update(
        self,
        y_true: npt.ArrayLike,
        y_pred: npt.ArrayLike,
        probabilities: npt.ArrayLike | None = None,
    ) -> None:
        """Validate one chunk (true and predicted class indices, optional ``[N, C]`` scores) and count it."""
        t = validate_class_indices(y_true, self.n_classes, "labels")
        p = validate_class_indices(y_pred, self.n_classes, "predictions")
        _same_length(t, p, "update")
        if probabilities is not None:
            proba = _validate_probabilities(probabilities, t.shape[0], self.n_classes)
            self.top_k_hits += top_k_hits(t, proba, self.top_k)
            self._log_loss_parts.append(log_loss_sum(t, proba))
            if len(self._log_loss_parts) > 1024:
                self._log_loss_parts = [math.fsum(self._log_loss_parts)]
            self.probability_rows += t.shape[0]
            if self.roc is not None and self.pos_label is not None:
                self.roc.update(t == self.pos_label, proba[:, self.pos_label])
        self.confusion += confusion_counts(t, p, self.n_classes)

    def merge(self, other: ClassificationAccumulator) -> ClassificationAccumulator:
        """Add another accumulator's counts (same classes, k and positive label) into this one."""
        if (other.n_classes, other.top_k, other.pos_label) != (self.n_classes, self.top_k, self.pos_label):
            raise ValueError("cannot merge accumulators of different classes, k or positive label")
        self.confusion += other.confusion
        self.top_k_hits += other.top_k_hits
        self._log_loss_parts.extend(other._log_loss_parts)
        self.probability_rows += other.probability_rows
        if self.roc is not None and other.roc is not None:
            self.roc.merge(other.roc)
        return self

    def compute(self, labels: Sequence[str], zero_division: ZeroDivision = 0) -> dict[str, Any]:
        """The report: every score, JSON-ready (NaN becomes None)."""
        if len(labels) != self.n_classes:
            raise ValueError("labels must name every class")
        if self.n == 0:
            raise InvalidInput("no rows to evaluate: the evaluation set is empty")
        prf = precision_recall_f1(self.confusion, zero_division)
        report: dict[str, Any] = {
            "n": self.n,
            "accuracy": accuracy_from_confusion(self.confusion),
        }
        per_class = [
            {
                "label": label,
                "precision": float(prf.precision[i]),
                "recall": float(prf.recall[i]),
                "f1": float(prf.f1[i]),
                "support": int(prf.support[i]),
            }
            for i, label in enumerate(labels)
        ]
        # The public contract (docs/DESIGN.md): precision/recall/f1 each carry micro, macro, weighted
        # and per_class; the same rows also stand at the top level, one table for all three scores.
        for metric in ("precision", "recall", "f1"):
            report[metric] = {avg: prf.averages[avg][metric] for avg in AVERAGES}
            report[metric]["per_class"] = per_class
        report["per_class"] = per_class
        report["confusion_matrix"] = {"labels": list(labels), "matrix": self.confusion.tolist()}
        if self.probability_rows:
            report["top_k_accuracy"] = {"k": self.top_k, "value": self.top_k_hits / self.probability_rows}
            report["log_loss"] = (
                math.fsum(self._log_loss_parts) / self.probability_rows if self.n_classes >= 2 else math.nan
            )
            if self.roc is not None and self.pos_label is not None:
                report["roc_auc"] = {"pos_label": labels[self.pos_label], "value": self.roc.auc()}
        return _finite_dict(report)


# --------------------------------------------------------------------------------------------------
# regression


@dataclass
class RegressionAccumulator:
    """Mergeable running sums for MSE, RMSE, MAE, R² and max error."""

    n: int = 0
    squared_error: float = 0.0
    absolute_error: float = 0.0
    max_error: float = 0.0
    target_mean: float = 0.0
    target_m2: float = 0.0
    target_min: float = math.inf
    target_max: float = -math.inf

    def update(self, y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> None:
        """Validate one chunk (finite 1-D targets and predictions of equal length) and add it."""
        t = _validate_target(y_true, "labels")
        p = _validate_target(y_pred, "predictions")
        _same_length(t, p, "update")
        if t.shape[0] == 0:
            return
        residual = t - p
        self.squared_error += float(np.sum(residual**2))
        self.absolute_error += float(np.sum(np.abs(residual)))
        self.max_error = max(self.max_error, float(np.max(np.abs(residual))))
        mean = float(np.mean(t))
        m2 = float(np.sum((t - mean) ** 2))
        self._merge_moments(t.shape[0], mean, m2)
        self.target_min = min(self.target_min, float(t.min()))
        self.target_max = max(self.target_max, float(t.max()))

    def _merge_moments(self, n_b: int, mean_b: float, m2_b: float) -> None:
        n_a = self.n
        n = n_a + n_b
        delta = mean_b - self.target_mean
        self.target_mean += delta * n_b / n
        self.target_m2 += m2_b + delta * delta * n_a * n_b / n
        self.n = n

    def merge(self, other: RegressionAccumulator) -> RegressionAccumulator:
        """Add another accumulator's sums into this one."""
        if other.n == 0:
            return self
        self.squared_error += other.squared_error
        self.absolute_error += other.absolute_error
        self.max_error = max(self.max_error, other.max_error)
        self._merge_moments(other.n, other.target_mean, other.target_m2)
        self.target_min = min(self.target_min, other.target_min)
        self.target_max = max(self.target_max, other.target_max)
        return self

    def compute(self) -> dict[str, Any]:
        """The report: mse, rmse, mae, r2 (force_finite), max_error; JSON-ready (NaN becomes None)."""
        if self.n == 0:
            raise InvalidInput("no rows to evaluate: the evaluation set is empty")
        mse = self.squared_error / self.n
        numerator = self.squared_error
        # A constant target has exactly zero spread; the running M2 may carry rounding instead.
        denominator = 0.0 if self.target_min == self.target_max else self.target_m2
        if self.n < 2:
            r2 = math.nan
        elif numerator == 0:
            r2 = 1.0
        elif denominator == 0:
            r2 = 0.0
        else:
            r2 = 1.0 - numerator / denominator
        report = {
            "n": self.n,
            "mse": mse,
            "rmse": math.sqrt(mse),
            "mae": self.absolute_error / self.n,
            "r2": r2,
            "max_error": self.max_error,
        }
        return _finite_dict(report)


def _validate_target(y: npt.ArrayLike, what: str) -> FloatArray:
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise InvalidInput(f"{what} must be one number per row, got shape {list(arr.shape)}")
    if arr.dtype.kind not in "iuf" or arr.dtype.kind == "b":
        raise InvalidInput(f"{what} must be numbers, got dtype {arr.dtype}")
    out = arr.astype(np.float64, copy=False)
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        raise InvalidInput(f"{what}: row {int(bad[0])}: value is not finite")
    return out


def _finite_dict(report: dict[str, Any]) -> dict[str, Any]:
    return {k: _finite_or_none(v) for k, v in report.items()}


def _finite_or_none(value: Any) -> Any:
    """Replace NaN floats by None, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value
