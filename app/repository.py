"""The model repository: find `<name>/<version>/` folders, check each card and its sha256, load the graph.

`LoadedModel` is what the rest of the service sees of one model version: its card, the input and output
schema read from the graph (not trusted from the card), the providers really in use, its input validator
(`app.validation`) and the way requests of this model are stacked into one batch.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError

from app.dtypes import NUMPY_BY_ONNXRUNTIME
from app.errors import InvalidInput
from app.model_card import (
    CARD_FILENAME,
    MASK_INPUT,
    ONNX_FILENAME,
    PROBABILITIES_OUTPUT,
    REGRESSION_OUTPUT,
    SEQUENCE_INPUT,
    ModelCard,
    TensorSpec,
)
from app.session import create_session, uses_external_data
from app.settings import Settings
from app.validation import InputValidator, Places

logger = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """A model version that cannot be served; `reason` is shown in `GET /models` and the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ModelSource:
    """Where one model version lives in the repository."""

    name: str
    version: int
    directory: Path


def scan_repository(root: Path) -> list[ModelSource]:
    """Every `<name>/<version>/` folder under `root`, sorted by name then version.

    Folders whose name is not a positive integer are not versions and are skipped (with a debug line);
    a missing root is logged and yields nothing, so the server still starts and reports no models.
    """
    if not root.is_dir():
        logger.warning("model repository not found", extra={"repository": str(root)})
        return []
    sources = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
            if not version_dir.name.isdigit() or int(version_dir.name) < 1:
                logger.debug("skipping a folder that is not a version", extra={"folder": str(version_dir)})
                continue
            sources.append(ModelSource(model_dir.name, int(version_dir.name), version_dir))
    return sorted(sources, key=lambda s: (s.name, s.version))


def _ort_spec(node: Any) -> TensorSpec:
    shape = [dim if isinstance(dim, int) and dim >= 0 else -1 for dim in node.shape]
    return TensorSpec(name=node.name, dtype=NUMPY_BY_ONNXRUNTIME.get(node.type, node.type), shape=shape)


class LoadedModel:
    """One model version ready to run.

    Attributes:
        name: model name (the repository folder, equal to the card's).
        version: model version.
        card: the validated model card.
        inputs: graph inputs, batch axis first, `-1` for variable axes.
        outputs: graph outputs.
        providers: execution providers the session actually uses.
        load_seconds: time to load and warm up.
    """

    def __init__(self, card: ModelCard, session: ort.InferenceSession) -> None:
        """Wrap a session; raises `ModelLoadError` when the graph breaks the card's conventions."""
        self.card = card
        self.name = card.name
        self.version = card.version
        self.session = session
        self.inputs = [_ort_spec(node) for node in session.get_inputs()]
        self.outputs = [_ort_spec(node) for node in session.get_outputs()]
        self.providers: list[str] = list(session.get_providers())
        self.load_seconds = 0.0
        self.input_names = [spec.name for spec in self.inputs]
        self.output_names = [spec.name for spec in self.outputs]
        self._specs = {spec.name: spec for spec in self.inputs}
        self._check_conventions()  # before anything below relies on the dtypes being numpy ones
        self.validator = InputValidator(
            self.inputs,
            model_name=self.name,
            # symbolic axis names (e.g. "batch", "T"): inputs that share one must agree on its length
            axis_names={
                node.name: [d if isinstance(d, str) else None for d in node.shape]
                for node in session.get_inputs()
            },
        )
        self.pads_sequences = self.validator.pads_sequences
        self.batchable = all(spec.shape and spec.shape[0] == -1 for spec in self.inputs)

    @property
    def task(self) -> str:
        """`classification` or `regression` (from the card)."""
        return self.card.task

    @property
    def labels(self) -> list[str] | None:
        """Class names, index i naming class i (classification only)."""
        return self.card.labels

    def _check_conventions(self) -> None:
        card_inputs = sorted(spec.name for spec in self.card.inputs)
        if card_inputs != sorted(self.input_names):
            raise ModelLoadError(
                f"the card lists inputs {card_inputs} but the graph has {sorted(self.input_names)}"
            )
        for spec in self.inputs:
            if spec.dtype not in NUMPY_BY_ONNXRUNTIME.values():
                raise ModelLoadError(f"input {spec.name!r} has unsupported type {spec.dtype}")
        outputs = {spec.name: spec for spec in self.outputs}
        if self.task == "classification":
            probabilities = outputs.get(PROBABILITIES_OUTPUT)
            if probabilities is None:
                raise ModelLoadError(
                    f"a classifier must output {PROBABILITIES_OUTPUT!r}; it has {sorted(outputs)}"
                )
            n_classes = probabilities.shape[-1] if len(probabilities.shape) == 2 else None
            if n_classes is None or (n_classes != -1 and n_classes != len(self.labels or [])):
                raise ModelLoadError(
                    f"{PROBABILITIES_OUTPUT!r} has shape {probabilities.shape}, "
                    f"expected [N, {len(self.labels or [])}] for the card's labels"
                )
        elif REGRESSION_OUTPUT not in outputs:
            raise ModelLoadError(f"a regressor must output {REGRESSION_OUTPUT!r}; it has {sorted(outputs)}")

    # ------------------------------------------------------------------------------------------ validation
    def validate_inputs(
        self, inputs: Mapping[str, Any], places: Places | None = None
    ) -> dict[str, np.ndarray]:
        """Check and convert input values to exactly what the graph takes (see `InputValidator.validate`).

        Args:
            inputs: one entry per graph input: nested lists or numpy arrays, batch axis first. An image input
                also takes flattened pixels `[N, C*H*W]`.
            places: how error messages name inputs and values (default: as in a request, `inputs[3][1]`).

        Raises:
            InvalidInput: a missing or unknown input name, a value that is not valid for the input's dtype,
                a wrong shape, no rows, rows that disagree between inputs; the message says where.
        """
        return self.validator.validate(inputs, places)

    @property
    def sequence_channels(self) -> int:
        """Values per step of the `sequence` input (-1: any); only for models that pad sequences."""
        return self._specs[SEQUENCE_INPUT].shape[2]

    def pad_sequences(self, sequences: Any, where: str = "inputs") -> dict[str, np.ndarray]:
        """Ragged sequences → this model's `sequence` and `mask` inputs (see `pad_sequences`)."""
        sequence, mask = pad_sequences(sequences, self.sequence_channels, where=where)
        return {SEQUENCE_INPUT: sequence, MASK_INPUT: mask}

    # ------------------------------------------------------------------------------------------ batching
    def batch_signature(self, inputs: Mapping[str, np.ndarray]) -> Hashable:
        """Requests with equal signatures can share one onnxruntime call."""
        if self.pads_sequences:
            return None
        return tuple(inputs[name].shape[1:] for name in self.input_names)

    def collate(self, parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Stack requests along the batch axis (sequence models: right-pad to the longest, mask false)."""
        if len(parts) == 1:
            return dict(parts[0])
        if self.pads_sequences:
            longest = max(part[SEQUENCE_INPUT].shape[1] for part in parts)
            parts = [_pad_steps(part, longest) for part in parts]
        return {name: np.concatenate([part[name] for part in parts]) for name in self.input_names}

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One onnxruntime call (blocking; releases the GIL): every graph output by name."""
        results = self.session.run(self.output_names, dict(inputs))
        return dict(zip(self.output_names, results, strict=True))

    def warm_up(self, rows: Sequence[int]) -> None:
        """Run zero-filled batches of these sizes so the first real request pays no one-time costs."""
        for n in rows:
            sample = {}
            for spec in self.inputs:
                shape = [n, *(1 if d == -1 else d for d in spec.shape[1:])]
                dtype = np.dtype(spec.dtype)
                sample[spec.name] = np.ones(shape, dtype) if dtype.kind == "b" else np.zeros(shape, dtype)
            self.run(sample)


def pad_sequences(
    sequences: Any,
    channels: int,
    *,
    where: str = "inputs",
    row_name: Callable[[int], str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad sequences of different lengths with zeros and build the mask (true on real steps).

    The one implementation behind every route that takes ragged sequences (`/predict`, `/evaluate`).

    Args:
        sequences: one sequence per row; a sequence is a non-empty list of steps, a step a list of
            ``channels`` numbers (or a number when the model has one channel).
        channels: values per step the model takes (-1: any, the same for every row).
        where: how an error names the whole list (``inputs``).
        row_name: how an error names row ``i`` (default ``inputs[i]``).

    Returns:
        ``(sequence [N, T, C] float64, mask [N, T] bool)``, T the longest sequence.

    Raises:
        InvalidInput: an empty list, an empty or non-numeric sequence, or steps of the wrong width.
    """
    name = row_name or (lambda i: f"{where}[{i}]")
    if not isinstance(sequences, list) or not sequences:
        raise InvalidInput(f"{where}: expected a non-empty list of sequences (each a list of steps)")
    arrays = []
    for i, sequence in enumerate(sequences):
        if not isinstance(sequence, list) or not sequence:
            raise InvalidInput(f"{name(i)}: expected a non-empty list of steps")
        try:
            steps = np.asarray(sequence)
        except (ValueError, TypeError) as err:
            raise InvalidInput(f"{name(i)}: every step needs the same number of values") from err
        if steps.dtype.kind not in "iuf":
            raise InvalidInput(f"{name(i)}: steps must be numbers")
        if steps.ndim == 1 and channels in (1, -1):
            steps = steps[:, None]
        if steps.ndim != 2 or (channels != -1 and steps.shape[1] != channels):
            raise InvalidInput(
                f"{name(i)}: expected steps of {channels} value(s), got shape {list(steps.shape)}"
            )
        arrays.append(steps)
    width = arrays[0].shape[1]
    if any(a.shape[1] != width for a in arrays):
        raise InvalidInput(f"{where}: every step of every sequence needs the same number of values")
    longest = max(len(a) for a in arrays)
    padded = np.zeros((len(arrays), longest, width), dtype=np.float64)
    mask = np.zeros((len(arrays), longest), dtype=bool)
    for i, steps in enumerate(arrays):
        padded[i, : len(steps)] = steps
        mask[i, : len(steps)] = True
    return padded, mask


def _pad_steps(part: Mapping[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    sequence, mask = part[SEQUENCE_INPUT], part[MASK_INPUT]
    extra = length - sequence.shape[1]
    if extra == 0:
        return dict(part)
    return {
        SEQUENCE_INPUT: np.pad(sequence, ((0, 0), (0, extra), (0, 0))),
        MASK_INPUT: np.pad(mask, ((0, 0), (0, extra)), constant_values=False),
    }


def load_model(source: ModelSource, settings: Settings, providers: Sequence[str]) -> LoadedModel:
    """Read, verify and load one model version, then warm it up (blocking).

    Raises:
        ModelLoadError: a missing or invalid card, a card that names another model or version, a sha256
            mismatch, external data, a graph onnxruntime rejects, or one that breaks the tensor conventions.
    """
    started = time.perf_counter()
    card_path, onnx_path = source.directory / CARD_FILENAME, source.directory / ONNX_FILENAME
    if not onnx_path.is_file():
        raise ModelLoadError(f"no {ONNX_FILENAME} in {source.name}/{source.version}")
    try:
        card = ModelCard.read(card_path)
    except FileNotFoundError as err:
        raise ModelLoadError(f"no {CARD_FILENAME} beside the graph") from err
    except OSError as err:
        raise ModelLoadError(f"cannot read {CARD_FILENAME}: {err.strerror}") from err
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'card'}: {e['msg']}" for e in err.errors()[:5]
        )
        raise ModelLoadError(f"invalid model card: {problems}") from err
    if card.name != source.name or card.version != source.version:
        raise ModelLoadError(
            f"the card describes {card.name}/{card.version} but sits in {source.name}/{source.version}"
        )
    try:
        model_bytes = onnx_path.read_bytes()
    except OSError as err:
        raise ModelLoadError(f"cannot read {ONNX_FILENAME}: {err.strerror}") from err
    digest = hashlib.sha256(model_bytes).hexdigest()
    if digest != card.onnx.sha256:
        raise ModelLoadError(f"sha256 of {ONNX_FILENAME} is {digest}, the card says {card.onnx.sha256}")
    try:
        external = uses_external_data(model_bytes)
    except (ValueError, IndexError) as err:
        raise ModelLoadError(f"{ONNX_FILENAME} is not an ONNX protobuf") from err
    if external:
        raise ModelLoadError(
            "the graph keeps weights in an external data file; export one self-contained file"
        )
    try:
        session = create_session(model_bytes, settings, providers)
    except Exception as err:  # onnxruntime raises several unrelated types
        raise ModelLoadError(f"onnxruntime cannot load the graph: {err}") from err
    model = LoadedModel(card, session)
    try:
        model.warm_up(sorted({1, settings.max_batch_rows}))
    except Exception as err:
        raise ModelLoadError(f"warm-up run failed: {err}") from err
    model.load_seconds = time.perf_counter() - started
    return model
