"""Rows of parsed input values → one column per model input (what a `Chunk` carries).

Only the layout is handled here: which value belongs to which input, and ragged sequences padded and
masked by the core's `pad_sequences`. Dtypes, shapes and values are the core validator's
(`app.validation`), which the runner applies to every chunk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from app.errors import InvalidInput
from app.evaluate.readers.common import Schema
from app.model_card import MASK_INPUT, SEQUENCE_INPUT
from app.repository import pad_sequences


class InputColumns:
    """Rows (one item per row) or columns (one list per input) → ``{input name: values of these rows}``."""

    def __init__(self, schema: Schema) -> None:
        """Prepare for the model's inputs."""
        self.schema = schema
        self.names = [spec.name for spec in schema.inputs]

    def takes_ragged(self, columns: Mapping[str, Any]) -> bool:
        """Whether ``{input name: rows}`` gives a sequence model only its sequences (the mask is built)."""
        return self.schema.pads_sequences and SEQUENCE_INPUT in columns and MASK_INPUT not in columns

    def from_rows(self, items: Sequence[Any], first_row: int) -> dict[str, Any]:
        """One item per row: the input's value (single-input model) or an object by input name.

        A sequence model takes one sequence per row (a list of steps, or ``{"sequence": steps}``), of any
        length: the rows are right-padded and the mask is built, exactly as `/predict` does.
        """
        if self.schema.pads_sequences:
            return self._sequences(
                [_sequence_of(item, first_row + i) for i, item in enumerate(items)], first_row
            )
        if len(self.names) == 1:
            return {self.names[0]: items}
        columns: dict[str, list[Any]] = {name: [] for name in self.names}
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise InvalidInput(
                    f"row {first_row + i}: the model has several inputs ({', '.join(self.names)}); "
                    "give each row's input as an object by input name"
                )
            for name in self.names:
                if name not in item:
                    raise InvalidInput(f"row {first_row + i}: input {name!r} is missing")
                columns[name].append(item[name])
            extra = set(item) - set(self.names)
            if extra:
                raise InvalidInput(f"row {first_row + i}: unknown input name(s) {sorted(extra)}")
        return dict(columns)

    def from_columns(self, columns: Mapping[str, Sequence[Any]], start: int, stop: int) -> dict[str, Any]:
        """Rows ``start:stop`` (0-based) of ``{input name: [one value per row]}``."""
        if self.takes_ragged(columns):
            return self._sequences(list(columns[SEQUENCE_INPUT][start:stop]), start + 1)
        return {name: columns[name][start:stop] for name in self.names}

    def _sequences(self, sequences: list[Any], first_row: int) -> dict[str, Any]:
        """Ragged sequences → padded `sequence` and `mask` (the core's padding)."""
        last = first_row + len(sequences) - 1
        sequence, mask = pad_sequences(
            sequences,
            self.schema.sequence_channels,
            where=f"rows {first_row}-{last}",
            row_name=lambda i: f"row {first_row + i}",
        )
        return sequence_inputs(sequence, mask)


def sequence_inputs(sequence: npt.NDArray[Any], mask: npt.NDArray[np.bool_]) -> dict[str, Any]:
    """Padded sequences and their mask → a sequence model's inputs: padding zeroed (numbers only: other
    values are left for the validator to refuse), trailing padding that no row uses trimmed."""
    real = mask.any(axis=0)
    steps = int(np.flatnonzero(real)[-1]) + 1 if real.any() else 0
    sequence, mask = sequence[:, :steps], mask[:, :steps]
    if sequence.dtype.kind in "iuf":
        sequence = np.where(mask[:, :, None], sequence, 0)
    return {SEQUENCE_INPUT: sequence, MASK_INPUT: mask}


def _sequence_of(item: Any, row: int) -> Any:
    """A sequence model's row: its list of steps, given bare or as ``{"sequence": steps}``."""
    if not isinstance(item, dict):
        return item
    if set(item) != {SEQUENCE_INPUT}:
        raise InvalidInput(
            f"row {row}: a sequence model takes each row as a list of steps (or "
            f"{{{SEQUENCE_INPUT!r}: steps}}); got the keys {sorted(item)} (the mask is built from the "
            "sequence's length)"
        )
    return item[SEQUENCE_INPUT]
