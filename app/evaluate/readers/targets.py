"""Labels → targets: class indices (int64) for a classifier, float64 values for a regressor.

Labels are class names or class indices. JSON says which by type (string or integer). In CSV and NPZ
string labels a value that names a class is a class name, else an integer is a class index; a set must
use one kind throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from app.errors import InvalidInput
from app.evaluate.readers.common import Schema, is_int, text_of
from app.validation import first_non_whole, reads_as_number

LabelKind = Literal["class name", "class index"]


class TargetEncoder:
    """Labels → int64 class indices (classification) or float64 values (regression), with row numbers.

    Keeps state across chunks: the kind of label (class names or class indices) the set started with.
    """

    def __init__(self, schema: Schema) -> None:
        """Prepare for the model's task and labels."""
        self.classification = schema.classification
        self.labels: tuple[str, ...] = schema.labels or ()
        self._index = {name: i for i, name in enumerate(self.labels)}
        self._kind: LabelKind | None = None
        self._kind_row = 0

    # -- shared

    def _classes_preview(self) -> str:
        shown = ", ".join(repr(label) for label in self.labels[:10])
        return shown + (", ..." if len(self.labels) > 10 else "")

    def _not_a_class(self, row: int, value: object) -> InvalidInput:
        return InvalidInput(
            f"row {row}: label {value!r} is not among the model's classes "
            f"({self._classes_preview()}; or a class index 0..{len(self.labels) - 1})"
        )

    def _claim(self, kind: LabelKind, row: int, value: object) -> None:
        if self._kind is None:
            self._kind, self._kind_row = kind, row
        elif self._kind != kind:
            raise InvalidInput(
                f"row {row}: label {value!r} is a {kind} but row {self._kind_row} gave a {self._kind}: "
                "mixed label types; use class names or class indices throughout"
            )

    def _index_range(self, values: npt.NDArray[np.int64], first_row: int, raw: Sequence[Any]) -> None:
        bad = np.flatnonzero((values < 0) | (values >= len(self.labels)))
        if bad.size:
            i = int(bad[0])
            raise self._not_a_class(first_row + i, raw[i])

    # -- JSON values (type says the kind)

    def encode_values(self, values: Sequence[Any], first_row: int) -> npt.NDArray[Any]:
        """Labels from JSON: strings are class names, integers class indices; numbers for regression."""
        if not self.classification:
            return self._numbers(values, first_row)
        n = len(values)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        types = {type(v) for v in values}
        if types == {str}:
            self._claim("class name", first_row, values[0])
            found = [self._index.get(v, -1) for v in values]
            out = np.asarray(found, dtype=np.int64)
            bad = np.flatnonzero(out < 0)
            if bad.size:
                raise self._not_a_class(first_row + int(bad[0]), values[int(bad[0])])
            return out
        if types == {int}:
            self._claim("class index", first_row, values[0])
            n_classes = len(self.labels)
            for i, value in enumerate(values):
                if not 0 <= value < n_classes:
                    raise self._not_a_class(first_row + i, value)
            return np.asarray(values, dtype=np.int64)
        # mixed or unsupported types: report the first offending row
        for i, value in enumerate(values):
            row = first_row + i
            if isinstance(value, str):
                self._claim("class name", row, value)
            elif isinstance(value, int) and not isinstance(value, bool):
                self._claim("class index", row, value)
            else:
                raise InvalidInput(
                    f"row {row}: label {value!r} must be a class name (string) or a class index (integer)"
                )
        raise AssertionError("unreachable")  # pragma: no cover

    # -- text (CSV cells, NPZ string arrays): a class name wins, else an integer is an index

    def encode_text(self, values: Sequence[str] | npt.NDArray[Any], first_row: int) -> npt.NDArray[Any]:
        """Labels given as text (CSV, NPZ string arrays)."""
        if not self.classification:
            return self._numbers_from_text(values, first_row)
        arr = np.asarray(values)
        if arr.shape[0] == 0:
            return np.empty(0, dtype=np.int64)
        uniques, inverse = np.unique(arr, return_inverse=True)
        index = np.empty(uniques.shape[0], dtype=np.int64)
        kinds = np.empty(uniques.shape[0], dtype=np.int8)  # 0 name, 1 index, 2 invalid
        for u, raw in enumerate(uniques.tolist()):
            text = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)).strip()
            if text in self._index:
                index[u], kinds[u] = self._index[text], 0
            elif is_int(text) and 0 <= int(text) < len(self.labels):
                index[u], kinds[u] = int(text), 1
            else:
                index[u], kinds[u] = -1, 2
        row_kinds = kinds[inverse]
        bad = np.flatnonzero(row_kinds == 2)
        if bad.size:
            i = int(bad[0])
            raise self._not_a_class(first_row + i, text_of(arr[i]))
        names: tuple[LabelKind, LabelKind] = ("class name", "class index")
        self._claim(names[int(row_kinds[0])], first_row, text_of(arr[0]))
        other = np.flatnonzero(row_kinds != row_kinds[0])
        if other.size:
            i = int(other[0])
            self._claim(names[int(row_kinds[i])], first_row + i, text_of(arr[i]))
        return index[inverse]

    # -- typed arrays (NPZ)

    def encode_array(self, values: npt.NDArray[Any], first_row: int) -> npt.NDArray[Any]:
        """Labels from an NPZ array: integers are indices, strings are names (or index text)."""
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1:
            raise InvalidInput(f"'labels' must have one label per row, got shape {list(values.shape)}")
        if values.dtype.kind in "US":
            return self.encode_text(values, first_row)
        if not self.classification:
            return self._numbers(values, first_row)
        if values.dtype.kind == "f":
            i = first_non_whole(values)
            if i is not None:
                raise InvalidInput(
                    f"row {first_row + i}: label {values[i].item()!r} is not a class index (an integer)"
                )
            values = values.astype(np.int64)
        if values.dtype.kind not in "iu":
            raise InvalidInput(f"'labels' must hold class names or class indices, got dtype {values.dtype}")
        out = values.astype(np.int64)
        self._claim("class index", first_row, int(out[0]) if out.size else 0)
        self._index_range(out, first_row, out.tolist())
        return out

    # -- regression

    def _numbers(self, values: Sequence[Any] | npt.NDArray[Any], first_row: int) -> npt.NDArray[np.float64]:
        if isinstance(values, np.ndarray) and values.dtype.kind in "iuf":
            out = values.astype(np.float64)
        else:
            out = np.empty(len(values), dtype=np.float64)
            for i, value in enumerate(values):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise InvalidInput(f"row {first_row + i}: label {value!r} is not a number")
                out[i] = value
        return _finite_targets(out, first_row)

    def _numbers_from_text(
        self, values: Sequence[str] | npt.NDArray[Any], first_row: int
    ) -> npt.NDArray[np.float64]:
        try:
            out = np.asarray(values).astype(np.float64)
        except ValueError:
            for i, value in enumerate(values):
                if not reads_as_number(text_of(value)):
                    raise InvalidInput(
                        f"row {first_row + i}: label {text_of(value)!r} is not a number"
                    ) from None
            raise
        return _finite_targets(out, first_row)


def _finite_targets(out: npt.NDArray[np.float64], first_row: int) -> npt.NDArray[np.float64]:
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        raise InvalidInput(f"row {first_row + int(bad[0])}: label is not a finite number")
    return out
