"""Input validation: request values → exactly the arrays a model's graph takes.

One set of rules for every route (`/predict`, V2 infer, `/evaluate` in every format), so that a bad value
gets the same 400 and the same words wherever it arrives; only the place the message names differs
(`inputs[3][1]` in a request, `row 1234: input 'x'[1]` in an evaluation set, whose data rows count from 1).

Values (`cast_values`):

* a float input takes integers and floats; NaN, Inf and values beyond the dtype's range are refused;
* an integer input takes integers, and floats that are whole numbers (1.0 → 1; 1.7 is refused), within
  the dtype's range;
* a bool input takes true/false, or the numbers 0 and 1 (0.5 is refused);
* text, null, and true/false where a number belongs are refused. Nothing is truncated or wrapped.

Shapes: batch axis first. An input whose rows have a fixed shape of two or more axes (an image
[C, H, W]) also takes its rows flattened ([N, C*H*W]); an input of one value per row ([N, 1]) also takes
[N]. Inputs that share a symbolic axis name must agree on its length.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from app.errors import InvalidInput
from app.model_card import MASK_INPUT, SEQUENCE_INPUT, TensorSpec

Place = Callable[[tuple[int, ...]], str]
"""How a message names one value (or one row) of an input, given its index."""


class Places(Protocol):
    """How error messages name an input and a value in it."""

    def input(self, name: str) -> str:
        """The whole input."""
        ...

    def value(self, name: str, index: tuple[int, ...]) -> str:
        """One value, or one row (an index of one axis), of the input."""
        ...


def index_text(index: Sequence[int]) -> str:
    """`(3, 1)` → `[3][1]`."""
    return "".join(f"[{i}]" for i in index)


@dataclass(frozen=True)
class RequestPlaces:
    """Places in a request: `inputs` for a one-input model, `inputs.<name>` otherwise, then `[row][...]`."""

    input_names: Sequence[str]

    def input(self, name: str) -> str:
        """`inputs` or `inputs.<name>`."""
        return "inputs" if len(self.input_names) == 1 else f"inputs.{name}"

    def value(self, name: str, index: tuple[int, ...]) -> str:
        """`inputs[3][1]` or `inputs.<name>[3][1]`."""
        return self.input(name) + index_text(index)


@dataclass(frozen=True)
class RowPlaces:
    """Places in rows ``first_row .. first_row + rows - 1`` of an evaluation set (data rows count from 1)."""

    first_row: int
    rows: int

    def input(self, name: str) -> str:
        """`rows 1-4096: input 'x'`."""
        last = self.first_row + self.rows - 1
        span = f"row {self.first_row}" if last <= self.first_row else f"rows {self.first_row}-{last}"
        return f"{span}: input {name!r}"

    def value(self, name: str, index: tuple[int, ...]) -> str:
        """`row 1234: input 'x'[1]`: the row, then the index within it."""
        if not index:  # a single value where rows belong
            return self.input(name)
        return f"row {self.first_row + index[0]}: input {name!r}" + index_text(index[1:])


class InputValidator:
    """Checks and converts the inputs of one model (see the module docstring for the rules)."""

    def __init__(
        self,
        specs: Sequence[TensorSpec],
        model_name: str = "",
        axis_names: Mapping[str, Sequence[str | None]] | None = None,
    ) -> None:
        """Prepare for a model's inputs.

        Args:
            specs: the graph inputs, batch axis first, -1 for variable axes.
            model_name: named in the messages about missing or unknown inputs.
            axis_names: symbolic axis names by input (None for a fixed axis): inputs that share one must
                agree on its length.
        """
        self.specs = list(specs)
        self.model_name = model_name
        self.input_names = [spec.name for spec in self.specs]
        self._specs = {spec.name: spec for spec in self.specs}
        self._dtypes = {spec.name: np.dtype(spec.dtype) for spec in self.specs}
        self._axis_names = axis_names or {}
        self._name_set = frozenset(self.input_names)
        self.request_places = RequestPlaces(self.input_names)
        self.pads_sequences = {SEQUENCE_INPUT, MASK_INPUT} == set(self.input_names) and len(
            self._specs[SEQUENCE_INPUT].shape
        ) == 3
        shared = Counter(
            axis_name
            for names in self._axis_names.values()
            for axis, axis_name in enumerate(names)
            if axis and axis_name is not None
        )
        # Only inputs that share a symbolic axis (or pad sequences) need the cross-input check.
        self._checks_shared_axes = self.pads_sequences or any(count > 1 for count in shared.values())

    def validate(
        self,
        inputs: Mapping[str, Any],
        places: Places | None = None,
        *,
        values_checked: Collection[str] = (),
    ) -> dict[str, np.ndarray]:
        """Check and convert input values to exactly what the graph takes.

        Args:
            inputs: one entry per graph input: nested lists or numpy arrays, batch axis first.
            places: how messages name inputs and values (default: as in a request, `inputs[3][1]`).
            values_checked: inputs whose values already passed `cast_values` to the graph's dtype where
                they were decoded (V2 JSON tensors, whose messages name the tensor): only their shapes
                are checked here.

        Returns:
            Contiguous arrays of the graph's dtypes and shapes, all with the same number of rows; an
            array that already is one is returned as it is (no copy).

        Raises:
            InvalidInput: a missing or unknown input name, a value the rules refuse, a wrong shape, no
                rows, rows that disagree between inputs; the message says where.
        """
        places = places or self.request_places
        if inputs.keys() != self._name_set:
            self._check_names(inputs)
        arrays: dict[str, np.ndarray] = {}
        rows: int | None = None
        for spec in self.specs:
            name = spec.name
            value = inputs[name]
            dtype = self._dtypes[name]
            if name in values_checked and isinstance(value, np.ndarray) and value.dtype == dtype:
                array = value
            else:
                array = _as_array(value, name, places)
                array = cast_values(array, dtype, functools.partial(places.value, name), value)
            array = _fit_shape(array, spec, places.input(name))
            if array.shape[0] == 0:
                raise InvalidInput(f"{places.input(name)}: empty; send at least one row")
            if rows is not None and array.shape[0] != rows:
                raise InvalidInput(
                    f"{places.input(name)}: has {array.shape[0]} rows but "
                    f"{places.input(self.input_names[0])} has {rows}; every input needs one entry per row"
                )
            rows = array.shape[0]
            arrays[name] = np.ascontiguousarray(array)
        if self._checks_shared_axes:
            self._check_shared_axes(arrays, places)
        return arrays

    def _check_names(self, inputs: Mapping[str, Any]) -> None:
        unknown = sorted(set(inputs) - set(self._specs))
        if unknown:
            raise InvalidInput(
                f"inputs: unknown input name(s) {unknown}; model {self.model_name!r} takes {self.input_names}"
            )
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise InvalidInput(
                f"inputs: missing input(s) {missing}; model {self.model_name!r} takes {self.input_names}"
            )

    def _check_shared_axes(self, arrays: Mapping[str, np.ndarray], places: Places) -> None:
        seen: dict[str, tuple[str, int, int]] = {}
        for name, array in arrays.items():
            axis_names = self._axis_names.get(name, [])
            if len(axis_names) != array.ndim:
                continue  # unknown, or an unflattened image input: its axes are all fixed
            for axis, axis_name in enumerate(axis_names):
                if axis_name is None or axis == 0:
                    continue
                size = array.shape[axis]
                first = seen.setdefault(axis_name, (name, axis, size))
                if first[2] != size:
                    raise InvalidInput(
                        f"{places.input(name)}: axis {axis} has length {size} but axis {first[1]} of "
                        f"{places.input(first[0])} has {first[2]}; they must match"
                    )
        if self.pads_sequences:
            sequence, mask = arrays[SEQUENCE_INPUT], arrays[MASK_INPUT]
            if sequence.shape[:2] != mask.shape:
                raise InvalidInput(
                    f"{places.input(MASK_INPUT)}: shape {list(mask.shape)} does not match the first two "
                    f"axes of {places.input(SEQUENCE_INPUT)} {list(sequence.shape[:2])}"
                )


# ---------------------------------------------------------------------------------------------- values


def cast_values(array: np.ndarray, dtype: np.dtype[Any], place: Place, source: Any = None) -> np.ndarray:
    """Convert values to ``dtype`` by the rules of the module docstring, or say which value breaks them.

    Args:
        array: the values (any shape).
        dtype: the input's dtype.
        place: names the value at an index of ``array`` in a message.
        source: the nested lists ``array`` was made of, if any: a text value is looked up there (numpy
            turns a list that mixes numbers and text into text throughout).

    Returns:
        ``array`` itself when it already has ``dtype``, else a converted copy.

    Raises:
        InvalidInput: ``{place}: {the value} is not a number`` (or is not a whole number, not true/false,
            out of range, NaN or Inf).
    """
    kind, target = array.dtype.kind, dtype.kind
    if array.size == 0:
        return array.astype(dtype, copy=False)
    if kind == "O":
        found = _first_non_number(source if isinstance(source, list | tuple) else array)
        if found is not None:
            raise InvalidInput(f"{place(found[0])}: {_shown(found[1])} is {_not_a(target)}")
        array, kind = array.astype(np.float64), "f"  # numbers too large for int64
    if kind not in "biuf" or (kind == "b" and target != "b"):
        index, value = _first_non_number_text(array, source)
        raise InvalidInput(f"{place(index)}: {_shown(value)} is {_not_a(target)}")
    if target == "b":
        if kind != "b":
            _refuse_first(array, (array != 0) & (array != 1), place, "is not true/false (or 0/1)")
            array = array.astype(bool)
        return array
    if target in "iu":
        if kind == "f":
            _refuse_first(
                array, ~_whole(array), place, f"is not a whole number; the input takes {dtype.name} values"
            )
        if not np.can_cast(array.dtype, dtype):
            info = np.iinfo(dtype)
            high = array >= float(info.max) + 1 if kind == "f" else array > info.max
            _refuse_first(
                array,
                (array < info.min) | high,
                place,
                f"is out of range for {dtype.name} ({info.min}..{info.max})",
            )
        return array.astype(dtype, copy=False)
    if array.dtype == dtype:
        converted = array  # nothing to convert (a binary tensor, a second look): only NaN/Inf to refuse
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # beyond the dtype's range becomes inf: below
            converted = array.astype(dtype)
    finite = np.isfinite(converted)
    if not finite.all():
        index = _first(~finite)
        if np.isfinite(array[index]):
            limit = float(np.finfo(dtype).max)
            raise InvalidInput(
                f"{place(index)}: {_shown(array[index])} is out of range for {dtype.name} "
                f"(largest magnitude {limit:g})"
            )
        raise InvalidInput(f"{place(index)}: NaN or Inf is not a valid input")
    return converted


def first_non_whole(values: npt.NDArray[np.floating[Any]]) -> int | None:
    """Index of the first value (of a 1-D float array) that is not a finite whole number, or None."""
    bad = np.flatnonzero(~_whole(values))
    return int(bad[0]) if bad.size else None


def _whole(values: np.ndarray) -> npt.NDArray[np.bool_]:
    whole: npt.NDArray[np.bool_] = np.isfinite(values) & (values == np.trunc(values))
    return whole


def _not_a(target: str) -> str:
    return "not true/false (or 0/1)" if target == "b" else "not a number"


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _refuse_first(array: np.ndarray, bad: np.ndarray, place: Place, problem: str) -> None:
    if bad.any():
        index = _first(bad)
        raise InvalidInput(f"{place(index)}: {_shown(array[index])} {problem}")


def _shown(value: Any) -> str:
    """A value as a message shows it: `1.7`, `'abc'`, `None` (a float32 1.7 too shows as `1.7`)."""
    if isinstance(value, np.floating):
        return str(value)
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)


def _is_number(item: Any) -> bool:
    return isinstance(item, int | float | np.integer | np.floating) and not isinstance(item, bool | np.bool_)


def _first_non_number(value: Any) -> tuple[tuple[int, ...], Any] | None:
    """The index and value of the first item of nested lists (or an object array) that is not a number."""
    if isinstance(value, np.ndarray):
        for flat, item in enumerate(value.reshape(-1).tolist()):
            if not _is_number(item):
                return tuple(int(i) for i in np.unravel_index(flat, value.shape)), item
        return None
    stack: list[tuple[tuple[int, ...], Any]] = [((), value)]
    while stack:
        index, item = stack.pop()
        if isinstance(item, list | tuple):
            stack.extend((((*index, i), sub) for i, sub in reversed(list(enumerate(item)))))
        elif not _is_number(item):
            return index, item
    return None


def _first_non_number_text(array: np.ndarray, source: Any) -> tuple[tuple[int, ...], Any]:
    """Where an array of text (or true/false, ...) first holds something that is not a number."""
    found = _first_non_number(source) if isinstance(source, list | tuple) else None
    if found is not None:
        return found
    items = array.reshape(-1).tolist()
    if array.dtype.kind in "US":
        # text that does not read as a number, else the first item (text is never taken for a number)
        for flat, item in enumerate(items):
            if not reads_as_number(item):
                return tuple(int(i) for i in np.unravel_index(flat, array.shape)), item
    return tuple(0 for _ in array.shape), items[0]


def reads_as_number(text: str | bytes) -> bool:
    """Whether text reads as a number (as `float` reads it: `1`, `-2.5e3`, `nan`)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- shapes


def shape_text(shape: Sequence[int]) -> str:
    """`[-1, 4]` → `[N, 4]`; other variable axes show as `*`."""
    dims = ["N" if i == 0 and d == -1 else ("*" if d == -1 else str(d)) for i, d in enumerate(shape)]
    return "[" + ", ".join(dims) + "]"


def _as_array(value: Any, name: str, places: Places) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as err:
        raise _not_rectangular(value, name, places) from err


def _not_rectangular(value: Any, name: str, places: Places) -> InvalidInput:
    """Which row breaks the rectangle: the first whose shape differs from the rows before it."""
    if isinstance(value, list | tuple):
        shape: tuple[int, ...] | None = None
        for i, row in enumerate(value):
            try:
                row_shape = np.shape(row)
            except ValueError:
                return InvalidInput(f"{places.value(name, (i,))}: not a rectangular array")
            if shape is None:
                shape = row_shape
            elif row_shape != shape:
                return InvalidInput(
                    f"{places.value(name, (i,))}: not a rectangular array: this row has shape "
                    f"{list(row_shape)}, the rows before it {list(shape)}"
                )
    return InvalidInput(f"{places.input(name)}: not a rectangular array")


def _fit_shape(array: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    expected = spec.shape
    got = list(array.shape)
    if len(got) == len(expected) and all(e == -1 or e == g for e, g in zip(expected, got, strict=True)):
        return array
    fixed = expected[1:]
    if len(expected) >= 3 and -1 not in fixed and len(got) == 2 and got[1] == math.prod(fixed):
        return array.reshape([got[0], *fixed])  # flattened rows, e.g. an image's pixels
    if fixed == [1] and len(got) == 1:
        return array.reshape(-1, 1)  # one value per row
    hint = ""
    if len(got) == len(expected) - 1 and got and got[0] != 0:
        hint = "; one example still needs the batch axis: wrap it in a list"
    elif len(expected) == 2 and len(got) == 2:
        hint = f" (rows of {got[1]} values where the model takes {expected[1]})"
    wanted = shape_text(expected)
    if len(expected) >= 3 and -1 not in fixed:
        wanted += f" (or [N, {math.prod(fixed)}] flattened)"
    raise InvalidInput(f"{where}: expected shape {wanted}, got {got}{hint}")
