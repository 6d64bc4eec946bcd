"""The model repository: find `<name>/<version>/` folders, check each card and its sha256, load the graph.

Whoever can write a folder of the repository chooses every byte the loader reads, so a version is refused
before onnxruntime sees it when a file it uses resolves outside the repository (symlinks followed), is not a
regular file or is too large, when its graph keeps data in external files, or declares absurd shapes.

`LoadedModel` is what the rest of the service sees of one model version: its card, the input and output
schema read from the graph (not trusted from the card), the providers really in use, its input validator
(`app.validation`) and the way requests of this model are stacked into one batch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import stat
import time
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
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
from app.session import create_session, inspect_graph_file
from app.settings import Settings
from app.validation import InputValidator, Places

logger = logging.getLogger(__name__)

MAX_CARD_BYTES = 1 << 20  # a card takes a few KiB; a larger file is refused before it is parsed
MAX_AXES = 8  # most axes an input or output may declare
# Most values the inputs (or the outputs) of a graph may declare for one row, variable axes counted as 1
# (64 MiB of float32); also the most a warm-up batch holds, so loading never allocates gigabytes for it.
MAX_DECLARED_VALUES = 1 << 24
_MAX_REASON_CHARS = 500
# An absolute path in a message (not a relative one, which comes from the model file itself).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/[^\s\"'(),]+")


class ModelLoadError(Exception):
    """A model version that cannot be served; `reason` is shown in `GET /models` and the log.

    A reason names files relative to the version folder and never holds an absolute path or a traceback.
    """

    def __init__(self, reason: str) -> None:
        if len(reason) > _MAX_REASON_CHARS:  # names in the graph file may be of any length
            reason = reason[: _MAX_REASON_CHARS - 3] + "..."
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ModelSource:
    """Where one model version lives in the repository."""

    name: str
    version: int
    directory: Path
    repository: Path
    """The repository root it was found under: every file the version uses must resolve inside it."""


def scan_repository(root: Path) -> list[ModelSource]:
    """Every `<name>/<version>/` folder under `root`, sorted by name then version.

    Folders whose name is not a positive integer are not versions and are skipped (with a debug line);
    a missing root is logged and yields nothing, so the server still starts and reports no models.
    Names come from the folder listing (never `.` or `..`; those starting with `.` are skipped); a folder
    that is a symlink is listed here and refused by `load_model` if it leads out of the repository.
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
            sources.append(ModelSource(model_dir.name, int(version_dir.name), version_dir, root))
    return sorted(sources, key=lambda s: (s.name, s.version))


def _declared_values(shape: Sequence[int]) -> int:
    """Values a tensor of this shape holds with every variable axis (-1) of length 1."""
    return math.prod(dim for dim in shape if dim > 0)


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
        self._check_declared_shapes()  # before the warm-up allocates inputs of these shapes
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

    def _check_declared_shapes(self) -> None:
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            for spec in specs:
                if len(spec.shape) > MAX_AXES:
                    raise ModelLoadError(
                        f"{kind} {spec.name!r} declares {len(spec.shape)} axes, more than {MAX_AXES}"
                    )
                if 0 in spec.shape:
                    raise ModelLoadError(f"{kind} {spec.name!r} declares an axis of length 0: {spec.shape}")
            values = sum(_declared_values(spec.shape) for spec in specs)
            if values > MAX_DECLARED_VALUES:
                raise ModelLoadError(
                    f"the {kind}s declare {values} values per row (variable axes counted as 1), "
                    f"more than {MAX_DECLARED_VALUES}"
                )

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
        self,
        inputs: Mapping[str, Any],
        places: Places | None = None,
        *,
        values_checked: Collection[str] = (),
    ) -> dict[str, np.ndarray]:
        """Check and convert input values to exactly what the graph takes (see `InputValidator.validate`).

        Args:
            inputs: one entry per graph input: nested lists or numpy arrays, batch axis first. An image input
                also takes flattened pixels `[N, C*H*W]`.
            places: how error messages name inputs and values (default: as in a request, `inputs[3][1]`).
            values_checked: inputs whose values were already checked where they were decoded (see
                `InputValidator.validate`).

        Raises:
            InvalidInput: a missing or unknown input name, a value that is not valid for the input's dtype,
                a wrong shape, no rows, rows that disagree between inputs; the message says where.
        """
        return self.validator.validate(inputs, places, values_checked=values_checked)

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

    def warm_up(self, max_rows: int) -> None:
        """Run zero-filled batches so the first real request pays no one-time costs (variable axes: length 1).

        A batch of one row, then one of `max_rows` rows, fewer when it would hold more than
        `MAX_DECLARED_VALUES` values; a graph with a fixed batch axis runs one batch of that size.
        """
        row_values = sum(_declared_values(spec.shape[1:]) for spec in self.inputs) or 1
        largest = min(max_rows, max(1, MAX_DECLARED_VALUES // row_values))
        for rows in sorted({1, largest}) if self.batchable else [1]:
            sample = {}
            for spec in self.inputs:
                batch = [rows if d == -1 else d for d in spec.shape[:1]]
                shape = [*batch, *(1 if d == -1 else d for d in spec.shape[1:])]
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
        ModelLoadError: the version folder, `model.onnx` or `model.json` resolves outside the repository,
            is missing, unreadable, not a regular file or too large; an invalid card, or one that names
            another model or version; a sha256 mismatch; bytes that are not an ONNX protobuf; external data;
            a negative axis length; a graph onnxruntime rejects; absurd declared shapes; a graph that breaks
            the tensor conventions; a failed warm-up run.
    """
    started = time.perf_counter()
    root = source.repository.resolve()
    folder = f"{source.name}/{source.version}"
    directory = _inside(root, source.directory, f"the folder {folder}")
    onnx_path = _inside(root, directory / ONNX_FILENAME, ONNX_FILENAME)
    if not onnx_path.exists():
        raise ModelLoadError(f"no {ONNX_FILENAME} in {folder}")
    card = read_card(source)
    model_bytes = _read_file(
        onnx_path, ONNX_FILENAME, folder, settings.max_model_bytes, "MODELSERVE_MAX_MODEL_BYTES"
    )
    digest = hashlib.sha256(model_bytes).hexdigest()
    if digest != card.onnx.sha256:
        raise ModelLoadError(f"sha256 of {ONNX_FILENAME} is {digest}, the card says {card.onnx.sha256}")
    try:
        facts = inspect_graph_file(model_bytes)
    except ValueError as err:
        raise ModelLoadError(f"{ONNX_FILENAME} is not an ONNX protobuf (truncated or corrupt)") from err
    if facts.external_data:
        raise ModelLoadError(
            "the graph keeps weights in an external data file; export one self-contained file"
        )
    if facts.negative_dimension:
        raise ModelLoadError("an input or output of the graph declares a negative axis length other than -1")
    try:
        session = create_session(model_bytes, settings, providers)
    except Exception as err:  # onnxruntime raises several unrelated types
        raise ModelLoadError(f"onnxruntime cannot load the graph: {_onnxruntime_message(err)}") from err
    model = LoadedModel(card, session)
    try:
        model.warm_up(settings.max_batch_rows)
    except Exception as err:
        raise ModelLoadError(f"warm-up run failed: {_onnxruntime_message(err)}") from err
    model.load_seconds = time.perf_counter() - started
    return model


def read_card(source: ModelSource) -> ModelCard:
    """The validated card of a version folder (blocking).

    Raises:
        ModelLoadError: the folder or `model.json` resolves outside the repository, is missing, unreadable,
            not a regular file or too large; an invalid card, or one that names another model or version.
    """
    root = source.repository.resolve()
    folder = f"{source.name}/{source.version}"
    directory = _inside(root, source.directory, f"the folder {folder}")
    card_path = _inside(root, directory / CARD_FILENAME, CARD_FILENAME)
    card_bytes = _read_file(card_path, CARD_FILENAME, folder, MAX_CARD_BYTES, "a card takes a few KiB")
    try:
        card = ModelCard.model_validate_json(card_bytes)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'card'}: {e['msg']}" for e in err.errors()[:5]
        )
        raise ModelLoadError(f"invalid model card: {problems}") from err
    if card.name != source.name or card.version != source.version:
        raise ModelLoadError(f"the card describes {card.name}/{card.version} but sits in {folder}")
    return card


def _inside(root: Path, path: Path, shown: str) -> Path:
    """`path` with every symlink followed; refused unless it stays inside `root` (itself resolved)."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop, on Python 3.11 and 3.12
        raise ModelLoadError(f"cannot resolve {shown}: a symlink loop or an unreadable folder") from err
    if not resolved.is_relative_to(root):
        raise ModelLoadError(f"{shown} resolves outside the model repository")
    return resolved


def _read_file(path: Path, shown: str, folder: str, limit: int, limit_note: str) -> bytes:
    """The bytes of `path` (resolved): a regular file of at most `limit` bytes, else `ModelLoadError`."""
    too_large = ModelLoadError(f"{shown} is larger than {limit} bytes ({limit_note})")
    try:
        # O_NOFOLLOW: `path` is resolved, so a symlink there is a swap since; O_NONBLOCK: a FIFO never waits.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ModelLoadError(f"{shown} is not a regular file")
            if info.st_size > limit:
                raise too_large
            with open(fd, "rb", closefd=False) as handle:
                data = handle.read(limit + 1)  # the file may have grown since the fstat
        finally:
            os.close(fd)
    except FileNotFoundError as err:
        raise ModelLoadError(f"no {shown} in {folder}") from err
    except OSError as err:
        raise ModelLoadError(f"cannot read {shown}: {err.strerror}") from err
    if len(data) > limit:
        raise too_large
    return data


def _onnxruntime_message(err: Exception) -> str:
    """An onnxruntime error for `GET /models`: one line, absolute paths (of its sources, of files it
    looked for) replaced by `<path>`."""
    if isinstance(err, UnicodeDecodeError):  # the message itself quotes undecodable bytes of the graph
        return "its error message is not valid text (a corrupt name in the graph?)"
    return _ABSOLUTE_PATH.sub("<path>", " ".join(str(err).split()))
