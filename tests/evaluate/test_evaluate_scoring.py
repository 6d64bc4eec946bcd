"""app/scoring.py against scikit-learn (the oracle), with hypothesis."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from app.errors import InvalidInput
from app.scoring import (
    BinaryRocCounts,
    ClassificationAccumulator,
    RegressionAccumulator,
    parse_zero_division,
    precision_recall_f1,
)

TOL = 1e-12
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ZERO_DIVISIONS: list[Any] = [0, 1, "nan"]


def _sk_zero_division(zd: Any) -> Any:
    return np.nan if zd == "nan" else zd


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def assert_close(ours: Any, theirs: Any, tol: float = TOL) -> None:
    a, b = _num(ours), float(theirs)
    if math.isnan(b):
        assert math.isnan(a), (ours, theirs)
    else:
        assert abs(a - b) <= tol * max(1.0, abs(b)), (ours, theirs)


@st.composite
def classification_case(draw: st.DrawFn) -> dict[str, Any]:
    n_classes = draw(st.integers(2, 7))
    if draw(st.booleans()):
        labels: list[Any] = draw(
            st.lists(st.text(min_size=1, max_size=4), min_size=n_classes, max_size=n_classes, unique=True)
        )
    else:
        labels = draw(st.lists(st.integers(-50, 50), min_size=n_classes, max_size=n_classes, unique=True))
    n = draw(st.integers(1, 60))
    # restrict true labels and predictions to (possibly different) subsets: classes go missing
    true_pool = draw(st.lists(st.integers(0, n_classes - 1), min_size=1, max_size=n_classes, unique=True))
    pred_pool = draw(st.lists(st.integers(0, n_classes - 1), min_size=1, max_size=n_classes, unique=True))
    y_true = np.array(draw(st.lists(st.sampled_from(true_pool), min_size=n, max_size=n)), dtype=np.int64)
    y_pred = np.array(draw(st.lists(st.sampled_from(pred_pool), min_size=n, max_size=n)), dtype=np.int64)
    return {
        "labels": labels,
        "y_true": y_true,
        "y_pred": y_pred,
        "zero_division": draw(st.sampled_from(ZERO_DIVISIONS)),
    }


def _report(case: dict[str, Any]) -> dict[str, Any]:
    acc = ClassificationAccumulator(n_classes=len(case["labels"]))
    acc.update(case["y_true"], case["y_pred"])
    return acc.compute([str(label) for label in case["labels"]], case["zero_division"])


@SETTINGS
@given(classification_case())
def test_classification_matches_sklearn(case: dict[str, Any]) -> None:
    labels = case["labels"]
    lab = np.array(labels, dtype=object)
    y_true, y_pred = lab[case["y_true"]].tolist(), lab[case["y_pred"]].tolist()
    zd = _sk_zero_division(case["zero_division"])
    report = _report(case)

    assert report["n"] == len(y_true)
    assert_close(report["accuracy"], skm.accuracy_score(y_true, y_pred))
    cm = skm.confusion_matrix(y_true, y_pred, labels=labels)
    assert report["confusion_matrix"]["matrix"] == cm.tolist()
    for average in ("micro", "macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, zero_division=zd
        )
        assert_close(report["precision"][average], p)
        assert_close(report["recall"][average], r)
        assert_close(report["f1"][average], f)
        assert_close(
            report["f1"][average],
            skm.f1_score(y_true, y_pred, labels=labels, average=average, zero_division=zd),
        )
    p, r, f, s = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=zd
    )
    for i, row in enumerate(report["per_class"]):
        assert row["label"] == str(labels[i])
        assert_close(row["precision"], p[i])
        assert_close(row["recall"], r[i])
        assert_close(row["f1"], f[i])
        assert row["support"] == s[i]


@SETTINGS
@given(classification_case())
def test_classification_properties(case: dict[str, Any]) -> None:
    report = _report(case)
    # micro-F1 equals accuracy when every label and prediction is in the label list
    assert_close(report["f1"]["micro"], report["accuracy"])
    for metric in ("precision", "recall", "f1"):
        averages = [report[metric][average] for average in ("micro", "macro", "weighted")]
        for value in [*averages, *(row[metric] for row in report[metric]["per_class"])]:
            assert value is None or 0.0 <= value <= 1.0
        assert report[metric]["per_class"] == report["per_class"]
    # order invariance
    perm = np.random.default_rng(0).permutation(len(case["y_true"]))
    shuffled = _report({**case, "y_true": case["y_true"][perm], "y_pred": case["y_pred"][perm]})
    assert shuffled == report


@SETTINGS
@given(classification_case(), st.data())
def test_summed_chunk_counts_equal_the_whole(case: dict[str, Any], data: st.DataObject) -> None:
    n = len(case["y_true"])
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=4)))
    bounds = [0, *cuts, n]
    n_classes = len(case["labels"])
    sequential = ClassificationAccumulator(n_classes=n_classes)
    merged = ClassificationAccumulator(n_classes=n_classes)
    for lo, hi in itertools.pairwise(bounds):
        sequential.update(case["y_true"][lo:hi], case["y_pred"][lo:hi])
        part = ClassificationAccumulator(n_classes=n_classes)
        part.update(case["y_true"][lo:hi], case["y_pred"][lo:hi])
        merged.merge(part)
    labels = [str(label) for label in case["labels"]]
    whole = _report(case)
    assert sequential.compute(labels, case["zero_division"]) == whole
    assert merged.compute(labels, case["zero_division"]) == whole


@st.composite
def probability_case(draw: st.DrawFn) -> dict[str, Any]:
    n_classes = draw(st.integers(2, 6))
    n = draw(st.integers(1, 50))
    true_pool = draw(st.lists(st.integers(0, n_classes - 1), min_size=1, max_size=n_classes, unique=True))
    y_true = np.array(draw(st.lists(st.sampled_from(true_pool), min_size=n, max_size=n)), dtype=np.int64)
    # small integer weights make many exact ties (ranking rule) and exact zeros (log-loss clipping)
    weights = np.array(
        draw(
            st.lists(
                st.lists(st.integers(0, 4), min_size=n_classes, max_size=n_classes), min_size=n, max_size=n
            )
        ),
        dtype=np.float64,
    )
    weights[weights.sum(axis=1) == 0, 0] = 1.0
    proba = weights / weights.sum(axis=1, keepdims=True)
    return {
        "y_true": y_true,
        "proba": proba,
        "k": draw(st.integers(1, n_classes - 1)),
        "pos_label": draw(st.integers(0, 1)),
    }


@SETTINGS
@given(probability_case())
def test_probability_metrics_match_sklearn(case: dict[str, Any]) -> None:
    y_true, proba, k = case["y_true"], case["proba"], case["k"]
    n_classes = proba.shape[1]
    pos = case["pos_label"] if n_classes == 2 else 1
    acc = ClassificationAccumulator(n_classes=n_classes, top_k=k, pos_label=pos)
    acc.update(y_true, proba.argmax(axis=1), proba)
    report = acc.compute([f"c{i}" for i in range(n_classes)])

    labels = list(range(n_classes))
    score = proba[:, 1] if n_classes == 2 else proba
    assert report["top_k_accuracy"]["k"] == k
    assert_close(
        report["top_k_accuracy"]["value"], skm.top_k_accuracy_score(y_true, score, k=k, labels=labels)
    )
    assert_close(report["log_loss"], skm.log_loss(y_true, proba, labels=labels))
    if n_classes == 2:
        is_pos = y_true == pos
        if is_pos.all() or not is_pos.any():
            assert report["roc_auc"]["value"] is None
        else:
            assert_close(report["roc_auc"]["value"], skm.roc_auc_score(is_pos, proba[:, pos]))
        assert report["roc_auc"]["pos_label"] == f"c{pos}"
    else:
        assert "roc_auc" not in report


def test_top_k_at_least_n_classes_is_perfect() -> None:
    acc = ClassificationAccumulator(n_classes=3, top_k=3)
    proba = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    acc.update([0, 2], [2, 0], proba)
    assert acc.compute(["a", "b", "c"])["top_k_accuracy"]["value"] == 1.0


def test_log_loss_float32_clips_with_float32_eps() -> None:
    rng = np.random.default_rng(1)
    raw = rng.random((500, 4)).astype(np.float32)
    raw[:50, 0] = 0.0
    proba = (raw / raw.sum(axis=1, keepdims=True)).astype(np.float32)
    y = rng.integers(0, 4, 500)
    acc = ClassificationAccumulator(n_classes=4)
    acc.update(y, proba.argmax(axis=1), proba)
    ours = acc.compute(list("abcd"))["log_loss"]
    # sklearn computes in float32; we clip at float32's eps as it does, then take logs in float64
    theirs32 = skm.log_loss(y, proba, labels=[0, 1, 2, 3])
    assert abs(ours - theirs32) <= 1e-6 * theirs32
    eps = np.finfo(np.float32).eps
    exact = -np.mean(np.log(np.clip(proba[np.arange(500), y], eps, 1 - eps).astype(np.float64)))
    assert abs(ours - exact) <= 1e-12


def test_roc_auc_large_stream_is_exact() -> None:
    rng = np.random.default_rng(2)
    n = 200_000
    y = rng.integers(0, 2, n)
    scores = np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1).astype(np.float32)
    scores[::7] = np.round(scores[::7], 2)  # plenty of ties too
    proba = np.stack([1 - scores, scores], axis=1)
    acc = ClassificationAccumulator(n_classes=2)
    for lo in range(0, n, 8192):
        acc.update(y[lo : lo + 8192], (scores[lo : lo + 8192] > 0.5).astype(int), proba[lo : lo + 8192])
    ours = acc.compute(["neg", "pos"])["roc_auc"]["value"]
    assert_close(ours, skm.roc_auc_score(y, scores))
    assert acc.roc is not None
    assert acc.roc.n_distinct == np.unique(scores).size


def test_roc_merge() -> None:
    a, b, whole = BinaryRocCounts(), BinaryRocCounts(), BinaryRocCounts()
    s1, s2 = np.array([0.1, 0.4, 0.4, 0.9]), np.array([0.4, 0.2, 0.95])
    y1, y2 = np.array([0, 1, 0, 1], bool), np.array([1, 0, 0], bool)
    a.update(y1, s1)
    b.update(y2, s2)
    whole.update(np.concatenate([y1, y2]), np.concatenate([s1, s2]))
    a.merge(b)
    assert a.auc() == whole.auc()
    assert_close(a.auc(), skm.roc_auc_score(np.concatenate([y1, y2]), np.concatenate([s1, s2])))


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def regression_case(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(1, 60))
    if draw(st.integers(0, 4)) == 0:  # constant (exactly representable) target
        y = np.full(n, float(draw(st.integers(-100, 100))))
    else:
        y = np.array(draw(st.lists(finite, min_size=n, max_size=n)))
    if draw(st.integers(0, 4)) == 0:
        pred = y.copy()
    else:
        pred = np.array(draw(st.lists(finite, min_size=n, max_size=n)))
    return y, pred


@SETTINGS
@given(regression_case(), st.data())
def test_regression_matches_sklearn(case: tuple[np.ndarray, np.ndarray], data: st.DataObject) -> None:
    y, pred = case
    n = len(y)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=3)))
    bounds = [0, *cuts, n]
    acc, merged = RegressionAccumulator(), RegressionAccumulator()
    for lo, hi in itertools.pairwise(bounds):
        acc.update(y[lo:hi], pred[lo:hi])
        part = RegressionAccumulator()
        part.update(y[lo:hi], pred[lo:hi])
        merged.merge(part)
    for report in (acc.compute(), merged.compute()):
        assert report["n"] == n
        assert_close(report["mse"], skm.mean_squared_error(y, pred))
        assert_close(report["rmse"], skm.root_mean_squared_error(y, pred))
        assert_close(report["mae"], skm.mean_absolute_error(y, pred))
        assert_close(report["max_error"], skm.max_error(y, pred))
        if n < 2:
            assert report["r2"] is None
        else:
            # relative to the scale of the target's spread: sklearn uses two passes, we merge moments
            r2 = skm.r2_score(y, pred)
            assert_close(report["r2"], r2, tol=1e-9)


def test_r2_constant_target_force_finite() -> None:
    perfect, wrong = RegressionAccumulator(), RegressionAccumulator()
    # 0.1 is not exact in binary: the running spread is rounding, not data
    perfect.update(np.full(10, 0.1), np.full(10, 0.1))
    wrong.update(np.full(10, 0.1), np.full(10, 0.2))
    assert perfect.compute()["r2"] == 1.0
    assert wrong.compute()["r2"] == 0.0
    assert skm.r2_score(np.full(10, 3.0), np.full(10, 3.5)) == 0.0


def test_empty_and_bad_input_raise() -> None:
    acc = ClassificationAccumulator(n_classes=3)
    with pytest.raises(InvalidInput, match="empty"):
        acc.compute(["a", "b", "c"])
    with pytest.raises(InvalidInput, match="row 2"):
        acc.update([0, 1, 3], [0, 1, 2])
    with pytest.raises(InvalidInput, match="3 labels but 2 predictions"):
        acc.update([0, 1, 2], [0, 1])
    with pytest.raises(InvalidInput, match="empty"):
        RegressionAccumulator().compute()
    with pytest.raises(InvalidInput, match="row 1"):
        RegressionAccumulator().update([1.0, math.inf], [1.0, 2.0])


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, 0), (0, 0), (1, 1), (1.0, 1), ("nan", "nan"), ("NaN", "nan"), ("1", 1)]
)
def test_parse_zero_division(raw: Any, expected: Any) -> None:
    assert parse_zero_division(raw) == expected


@pytest.mark.parametrize("raw", [2, "warn", True, -1])
def test_parse_zero_division_rejects(raw: Any) -> None:
    with pytest.raises(InvalidInput):
        parse_zero_division(raw)


def test_weighted_all_zero_support_falls_back_to_mean() -> None:
    # every class with support is NaN-dropped except ones with zero weight
    cm = np.array([[0, 2], [0, 0]])
    prf = precision_recall_f1(cm, "nan")
    sk = skm.precision_recall_fscore_support(
        [0, 0], [1, 1], labels=[0, 1], average="weighted", zero_division=np.nan
    )
    assert_close(prf.averages["weighted"]["precision"], sk[0])
    assert_close(prf.averages["weighted"]["f1"], sk[2])
