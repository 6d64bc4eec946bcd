"""Execution providers and the self-contained-graph check."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from app import session
from app.settings import Settings
from tests.factories import tabular_classifier


def test_automatic_providers_prefer_tensorrt_then_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    assert session.resolve_providers([]) == available
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert session.resolve_providers([]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_requested_providers_this_build_lacks_are_skipped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="app.session"):
        chosen = session.resolve_providers(["CUDAExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"]  # this machine's build is CPU-only
    assert "skipped" in caplog.text


def test_the_session_reports_the_providers_really_in_use() -> None:
    """A CPU build asked for CUDA only warns (why `resolve_providers` filters first) and runs on CPU."""
    built = tabular_classifier()
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        created = session.create_session(
            built.proto.SerializeToString(), Settings(), ["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
    assert created.get_providers() == ["CPUExecutionProvider"]


def test_thread_defaults_leave_room_for_the_event_loop() -> None:
    assert Settings(intra_op_threads=3).resolved_intra_op_threads() == 3
    assert Settings(workers=64).resolved_intra_op_threads() == 1


def test_external_data_is_detected(tmp_path: Path) -> None:
    built = tabular_classifier()
    assert not session.uses_external_data(built.proto.SerializeToString())
    path = tmp_path / "model.onnx"
    onnx.save_model(built.proto, path, save_as_external_data=True, location="w.bin", size_threshold=0)
    assert session.uses_external_data(path.read_bytes())
