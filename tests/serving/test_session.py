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

CPU_ONLY = ["CPUExecutionProvider"]
WITH_CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
WITH_TENSORRT = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def build_with(monkeypatch: pytest.MonkeyPatch, available: list[str]) -> None:
    """Make `resolve_providers` see an onnxruntime build with exactly `available`."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(available))


@pytest.mark.parametrize("available", [CPU_ONLY, WITH_CUDA, WITH_TENSORRT], ids=["cpu", "cuda", "tensorrt"])
def test_automatic_providers_prefer_tensorrt_then_cuda(
    monkeypatch: pytest.MonkeyPatch, available: list[str]
) -> None:
    build_with(monkeypatch, [*available, "AzureExecutionProvider"])  # present, never picked automatically
    assert session.resolve_providers([]) == available


def test_requested_providers_this_build_lacks_are_skipped_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    build_with(monkeypatch, CPU_ONLY)
    with caplog.at_level(logging.WARNING, logger="app.session"):
        chosen = session.resolve_providers(["CUDAExecutionProvider"])
    assert chosen == CPU_ONLY
    assert "skipped" in caplog.text


def test_requested_providers_this_build_has_are_kept_in_order_with_the_cpu_fallback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    build_with(monkeypatch, WITH_TENSORRT)
    with caplog.at_level(logging.WARNING, logger="app.session"):
        assert session.resolve_providers(["CUDAExecutionProvider"]) == WITH_CUDA
        assert session.resolve_providers(["CPUExecutionProvider", "CUDAExecutionProvider"]) == [
            "CPUExecutionProvider",
            "CUDAExecutionProvider",
        ]
    assert not caplog.records


def absent_provider() -> str:
    """A provider onnxruntime knows but this build lacks (CUDA on a CPU build)."""
    available = ort.get_available_providers()
    known = ("CUDAExecutionProvider", "MIGraphXExecutionProvider", "CoreMLExecutionProvider")
    return next(name for name in known if name not in available)


def test_the_session_reports_the_providers_really_in_use() -> None:
    """A build asked for a provider it lacks only warns (why `resolve_providers` filters first) and runs on
    the next one."""
    missing = absent_provider()
    built = tabular_classifier()
    with pytest.warns(UserWarning, match=missing):
        created = session.create_session(
            built.proto.SerializeToString(), Settings(), [missing, "CPUExecutionProvider"]
        )
    assert created.get_providers() == ["CPUExecutionProvider"]


def test_thread_defaults_leave_room_for_the_event_loop() -> None:
    assert Settings(intra_op_threads=3).resolved_intra_op_threads() == 3
    assert Settings(workers=64).resolved_intra_op_threads() == 1


def test_external_data_is_detected(tmp_path: Path) -> None:
    built = tabular_classifier()
    assert not session.inspect_graph_file(built.proto.SerializeToString()).external_data
    path = tmp_path / "model.onnx"
    onnx.save_model(built.proto, path, save_as_external_data=True, location="w.bin", size_threshold=0)
    assert session.inspect_graph_file(path.read_bytes()).external_data
