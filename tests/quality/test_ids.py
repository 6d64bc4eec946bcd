"""Prediction ids: what an id says comes back exactly; a forged, tampered or malformed one is refused."""

from __future__ import annotations

import numpy as np
import pytest

from app.quality.ids import MAX_ID_CHARS, InvalidId, PredictionIds, predictions_of


def test_an_id_tells_model_version_prediction_and_time() -> None:
    ids = PredictionIds(b"secret", clock=lambda: 1_700_000_000.7)
    classes = ids.issue("digits", 3, np.array([7, 0, 7], dtype=np.int64))
    values = ids.issue("diabetes", 2**40, np.array([151.25, -1e-300, 3.5]))
    assert len(set(classes)) == 3, "equal predictions get distinct ids"
    read = [ids.read(token) for token in classes]
    assert [(r.model, r.version, r.prediction, r.issued) for r in read] == [
        ("digits", 3, 7, 1_700_000_000),
        ("digits", 3, 0, 1_700_000_000),
        ("digits", 3, 7, 1_700_000_000),
    ]
    assert all(r.is_class_index for r in read)
    assert [ids.read(token).prediction for token in values] == [151.25, -1e-300, 3.5]
    assert not ids.read(values[0]).is_class_index
    assert len({r.mac for r in read}) == 3


@pytest.mark.parametrize("name", ["a", "ab", "abc", "wine-int8", "m" * 64])
def test_every_name_length_gives_url_safe_ids_without_padding(name: str) -> None:
    ids = PredictionIds(b"secret")
    tokens = ids.issue(name, 1, np.arange(5, dtype=np.int64))
    for token in tokens:
        assert len(token) <= MAX_ID_CHARS
        assert not {"=", "+", "/"} & set(token)
        assert ids.read(token).model == name


def test_another_secret_or_a_changed_character_is_forged() -> None:
    ids = PredictionIds(b"secret")
    token = ids.issue("digits", 1, np.array([4], dtype=np.int64))[0]
    with pytest.raises(InvalidId, match="forged"):
        PredictionIds(b"other secret").read(token)
    for position in (0, 10, len(token) // 2, len(token) - 1):
        changed = token[:position] + ("A" if token[position] != "A" else "B") + token[position + 1 :]
        with pytest.raises(InvalidId, match=r"forged|malformed"):
            ids.read(changed)


@pytest.mark.parametrize(
    "token", ["", "abc", "not an id at all", "x" * 400, "AAAA", "____" * 16, 42, None, ["a"]]
)
def test_malformed_ids_are_refused(token: object) -> None:
    with pytest.raises(InvalidId, match=r"malformed|expected a prediction id"):
        PredictionIds(b"secret").read(token)


def test_predictions_of_takes_label_index_else_the_argmax() -> None:
    probabilities = np.array([[0.1, 0.9], [0.8, 0.2]], dtype=np.float32)
    assert predictions_of("classification", {"probabilities": probabilities}).tolist() == [1, 0]
    labelled = {"probabilities": probabilities, "label_index": np.array([0, 0])}
    assert predictions_of("classification", labelled).tolist() == [0, 0]
    values = predictions_of("regression", {"value": np.array([[1.5], [2.5]], dtype=np.float32)})
    assert values.dtype == np.float64
    assert values.tolist() == [1.5, 2.5]
