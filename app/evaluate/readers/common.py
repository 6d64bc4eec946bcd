"""What every reader shares: the `Chunk` it yields, the `Schema` it reads for, options, lines and rows."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy.typing as npt

from app.errors import InvalidInput, PayloadTooLarge
from app.model_card import SEQUENCE_INPUT, TensorSpec
from app.scoring import ZeroDivision, parse_zero_division

DEFAULT_CHUNK_ROWS = 4096
"""Rows per chunk: what one chunk of an upload costs in memory, and the unit sent to the model."""
MAX_LINE_BYTES = 16 * 1024 * 1024
"""Longest NDJSON / CSV line accepted (413 beyond it)."""

ByteStream = AsyncIterator[bytes]


@dataclass(frozen=True)
class Chunk:
    """Consecutive rows: inputs by model input name, targets (class indices or float64 values).

    The inputs are as parsed (lists or arrays, not yet checked against the model's dtypes and shapes):
    the runner passes them through the model's input validator, naming rows from ``first_row``.
    """

    inputs: dict[str, Any]
    targets: npt.NDArray[Any]
    first_row: int
    """1-based number of the chunk's first row in the whole set."""

    @property
    def rows(self) -> int:
        """Rows in the chunk."""
        return int(self.targets.shape[0])

    def where(self) -> str:
        """``rows a-b``: where in the set this chunk is, for error messages."""
        return f"rows {self.first_row}-{self.first_row + self.rows - 1}"


class SchemaSource(Protocol):
    """What `Schema.of` reads of a model (a `LoadedModel` has it)."""

    @property
    def task(self) -> str:
        """`classification` or `regression`."""
        ...

    @property
    def labels(self) -> list[str] | None:
        """Class names (classifiers)."""
        ...

    @property
    def inputs(self) -> list[TensorSpec]:
        """The graph's inputs."""
        ...

    @property
    def pads_sequences(self) -> bool:
        """Whether the model takes ragged sequences (`sequence` + `mask` inputs)."""
        ...


@dataclass(frozen=True)
class Schema:
    """What the readers need to know about the model: its task, class labels and inputs."""

    task: str
    labels: tuple[str, ...] | None
    inputs: tuple[TensorSpec, ...]
    pads_sequences: bool = False
    """A sequence model (`sequence` + `mask` inputs): rows are ragged sequences, padded by the core."""

    @classmethod
    def of(cls, model: SchemaSource) -> Schema:
        """From a `LoadedModel`."""
        return cls(
            task=str(model.task),
            labels=tuple(model.labels) if model.labels else None,
            inputs=tuple(model.inputs),
            pads_sequences=model.pads_sequences,
        )

    @property
    def sequence_channels(self) -> int:
        """Values per step of a sequence model's `sequence` input (-1: any)."""
        spec = next(spec for spec in self.inputs if spec.name == SEQUENCE_INPUT)
        return spec.shape[2]

    @property
    def classification(self) -> bool:
        """True for a classifier."""
        return self.task == "classification"


@dataclass(frozen=True)
class EvaluationOptions:
    """Request options: ``zero_division`` (0, 1, "nan"), ``top_k``, ``pos_label`` (binary ROC AUC)."""

    zero_division: ZeroDivision = 0
    top_k: int | None = None
    pos_label: str | int | None = None

    @classmethod
    def parse(
        cls, zero_division: object = None, top_k: object = None, pos_label: object = None
    ) -> EvaluationOptions:
        """Validate raw values from a JSON body or the query string."""
        k: int | None = None
        if top_k is not None:
            if isinstance(top_k, str) and top_k.strip().isdigit():
                top_k = int(top_k)
            if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
                raise InvalidInput(f"top_k must be a positive integer, got {top_k!r}")
            k = top_k
        if pos_label is not None and (isinstance(pos_label, bool) or not isinstance(pos_label, str | int)):
            raise InvalidInput(f"pos_label must be a class name or a class index, got {pos_label!r}")
        return cls(zero_division=parse_zero_division(zero_division), top_k=k, pos_label=pos_label)


def check_lengths(n_inputs: int, n_labels: int, what: str) -> None:
    """As many inputs as labels, and at least one row."""
    if n_inputs == 0 and n_labels == 0:
        raise InvalidInput("the evaluation set is empty: no rows")
    if n_inputs != n_labels:
        missing = "label" if n_labels < n_inputs else "input"
        raise InvalidInput(
            f"{what} and labels have different lengths ({n_inputs} vs {n_labels}): "
            f"row {min(n_inputs, n_labels) + 1} has no {missing}"
        )


async def line_batches(
    stream: ByteStream, max_line_bytes: int = MAX_LINE_BYTES
) -> AsyncIterator[list[bytes]]:
    """Complete lines (without the newline) in the batches the network delivered them."""
    tail: list[bytes] = []
    tail_bytes = 0
    async for piece in stream:
        if not piece:
            continue
        cut = piece.rfind(b"\n")
        if cut < 0:
            tail.append(piece)
            tail_bytes += len(piece)
            if tail_bytes > max_line_bytes:
                raise PayloadTooLarge(f"a line is longer than {max_line_bytes} bytes")
            continue
        head = piece[:cut]
        if tail:
            head = b"".join([*tail, head])
        tail = [piece[cut + 1 :]] if cut + 1 < len(piece) else []
        tail_bytes = len(tail[0]) if tail else 0
        yield head.split(b"\n")
    if tail:
        yield [b"".join(tail)]


def text_of(value: object) -> str:
    """A cell or array item as text (bytes decoded as UTF-8)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def is_int(text: str) -> bool:
    """Whether ``text`` is an integer (optional sign, digits)."""
    body = text[1:] if text[:1] in "+-" else text
    return body.isdigit()
