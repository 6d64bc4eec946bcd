"""An NPZ ``/evaluate`` upload (``numpy.savez``): arrays ``inputs`` (or one per input name) and ``labels``.

A zip archive needs random access: the upload is spooled to a temporary file that keeps only its first
few MB in memory, and each array is then read a chunk of rows at a time. A sequence model takes
``inputs`` right-padded [N, steps, channels] ([N, steps] for one channel) with ``lengths`` [N] or
``mask`` [N, steps]. Labels are class indices, class names, or numbers for a regressor.
"""

from __future__ import annotations

import functools
import math
import tempfile
import zipfile
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from app.errors import InvalidInput, PayloadTooLarge
from app.evaluate.readers.common import (
    DEFAULT_CHUNK_ROWS,
    ByteStream,
    Chunk,
    Schema,
    check_lengths,
)
from app.evaluate.readers.inputs import sequence_inputs
from app.evaluate.readers.targets import TargetEncoder
from app.model_card import MASK_INPUT, SEQUENCE_INPUT
from app.validation import RowPlaces, cast_values, first_non_whole

SPOOL_MEMORY_BYTES = 8 * 1024 * 1024
"""Bytes of an NPZ upload kept in memory before the spool moves to a temporary file."""


class _NpyRows:
    """One ``.npy`` member of an archive, read a block of rows at a time (C order), or whole (Fortran)."""

    def __init__(self, archive: zipfile.ZipFile, member: str, what: str) -> None:
        self.what = what
        self._fp: IO[bytes] = archive.open(member)
        fmt = np.lib.format
        try:
            version = fmt.read_magic(self._fp)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(self._fp)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(self._fp)
            else:
                self._fp.close()
                self._fp = archive.open(member)
                whole = fmt.read_array(self._fp, allow_pickle=False)
                shape, fortran, dtype = whole.shape, False, whole.dtype
                self._whole: npt.NDArray[Any] | None = whole
        except ValueError as err:
            raise InvalidInput(f"{what!r} in the NPZ archive is not a valid .npy array: {err}") from err
        if dtype.hasobject:
            raise InvalidInput(
                f"{what!r} in the NPZ archive is an object array; save numbers or fixed-width strings"
            )
        if len(shape) == 0:
            raise InvalidInput(f"{what!r} in the NPZ archive is a scalar; it needs one entry per row")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype: np.dtype[Any] = dtype
        self.rows = int(shape[0])
        self._row_items = math.prod(shape[1:])
        self._next = 0
        if version in ((1, 0), (2, 0)):
            self._whole = None
            if fortran and len(shape) > 1:
                data = self._read_exactly(self.rows * self._row_items * dtype.itemsize)
                self._whole = np.frombuffer(data, dtype=dtype).reshape(shape, order="F")

    def _read_exactly(self, size: int) -> bytearray:
        buffer = bytearray()
        while len(buffer) < size:
            block = self._fp.read(size - len(buffer))
            if not block:
                raise InvalidInput(f"{self.what!r} in the NPZ archive is truncated")
            buffer.extend(block)
        return buffer

    def read(self, count: int) -> npt.NDArray[Any]:
        """The next ``count`` rows."""
        start = self._next
        self._next += count
        if self._whole is not None:
            return np.ascontiguousarray(self._whole[start : start + count])
        data = self._read_exactly(count * self._row_items * self.dtype.itemsize)
        return np.frombuffer(data, dtype=self.dtype).reshape(count, *self.shape[1:])

    def close(self) -> None:
        """Close the member stream."""
        self._fp.close()


async def npz_chunks(
    stream: ByteStream,
    schema: Schema,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    max_bytes: int | None = None,
    spool_memory_bytes: int = SPOOL_MEMORY_BYTES,
) -> AsyncIterator[Chunk]:
    """Chunks of an NPZ upload: arrays ``inputs`` (or one per input name) and ``labels``."""
    with tempfile.SpooledTemporaryFile(max_size=spool_memory_bytes) as spool:
        size = 0
        async for piece in stream:
            size += len(piece)
            if max_bytes is not None and size > max_bytes:
                raise PayloadTooLarge(
                    f"the NPZ upload is larger than {max_bytes} bytes; stream CSV or NDJSON instead"
                )
            try:
                spool.write(piece)
            except OSError as err:  # a full or read-only temporary directory
                raise PayloadTooLarge(
                    f"the NPZ upload ({size} bytes so far) does not fit the server's temporary storage; "
                    "stream CSV or NDJSON instead (they are never stored)"
                ) from err
        if size == 0:
            raise InvalidInput("the evaluation set is empty: the body has no bytes (expected an NPZ archive)")
        spool.seek(0)
        try:
            archive = zipfile.ZipFile(spool)
        except zipfile.BadZipFile as err:
            raise InvalidInput(
                "the body is not an NPZ archive (a zip of .npy arrays, as numpy.savez writes)"
            ) from err
        with archive:
            for chunk in _npz_read(archive, schema, chunk_rows):
                yield chunk


def _npz_read(archive: zipfile.ZipFile, schema: Schema, chunk_rows: int) -> Iterator[Chunk]:
    members = {name.removesuffix(".npy"): name for name in archive.namelist()}
    arrays = ", ".join(sorted(members)) or "none"
    if "labels" not in members:
        raise InvalidInput(f"the NPZ archive has no 'labels' array (arrays: {arrays})")
    if schema.pads_sequences:
        yield from _npz_sequences(archive, members, schema, chunk_rows)
        return
    specs = schema.inputs
    keys: dict[str, str] = {}
    if len(specs) == 1 and "inputs" in members:
        keys[specs[0].name] = "inputs"
    else:
        for spec in specs:
            if spec.name not in members:
                wanted = "'inputs'" if len(specs) == 1 else ", ".join(repr(s.name) for s in specs)
                raise InvalidInput(f"the NPZ archive has no {wanted} array (arrays: {arrays})")
            keys[spec.name] = spec.name
    readers = {name: _NpyRows(archive, members[key], key) for name, key in keys.items()}
    labels = _NpyRows(archive, members["labels"], "labels")
    try:
        for name, reader in readers.items():
            check_lengths(reader.rows, labels.rows, repr(keys[name]))
        encoder = TargetEncoder(schema)
        start = 0
        while start < labels.rows:
            count = min(chunk_rows, labels.rows - start)
            inputs = {name: reader.read(count) for name, reader in readers.items()}
            yield Chunk(inputs, encoder.encode_array(labels.read(count), start + 1), start + 1)
            start += count
    finally:
        for reader in (*readers.values(), labels):
            reader.close()


def _npz_sequences(
    archive: zipfile.ZipFile, members: Mapping[str, str], schema: Schema, chunk_rows: int
) -> Iterator[Chunk]:
    """A sequence model's NPZ: ``inputs`` (or ``sequence``) [N, steps, channels] right-padded ([N, steps]
    for a one-channel model), with ``lengths`` [N] (real steps per row) or ``mask`` [N, steps] (true on
    real steps); with neither, every step is real."""
    arrays = ", ".join(sorted(members))
    key = next((k for k in ("inputs", SEQUENCE_INPUT) if k in members), None)
    if key is None:
        raise InvalidInput(
            "the NPZ archive has no 'inputs' array (right-padded sequences [N, steps, channels], with "
            f"'lengths' [N] or 'mask' [N, steps]) (arrays: {arrays})"
        )
    if "lengths" in members and MASK_INPUT in members:
        raise InvalidInput("the NPZ archive has both 'lengths' and 'mask'; give one of them")
    steps_key = next((k for k in ("lengths", MASK_INPUT) if k in members), None)
    sequences = _NpyRows(archive, members[key], key)
    steps = _NpyRows(archive, members[steps_key], steps_key) if steps_key else None
    labels = _NpyRows(archive, members["labels"], "labels")
    try:
        channels, shape = schema.sequence_channels, sequences.shape
        if not (
            (len(shape) == 2 and channels in (1, -1)) or (len(shape) == 3 and channels in (-1, shape[2]))
        ):
            flat = " (or [N, steps] for one channel)" if channels in (1, -1) else ""
            raise InvalidInput(
                f"{key!r} has shape {list(shape)}; the model takes right-padded sequences "
                f"[N, steps, {channels}]{flat}"
            )
        check_lengths(sequences.rows, labels.rows, repr(key))
        if steps is not None:
            expected = [shape[0]] if steps_key == "lengths" else list(shape[:2])
            if list(steps.shape) != expected:
                what = "one length per row" if steps_key == "lengths" else f"one flag per step of {key!r}"
                raise InvalidInput(
                    f"{steps_key!r} has shape {list(steps.shape)}, expected {expected} ({what})"
                )
        encoder = TargetEncoder(schema)
        start = 0
        while start < labels.rows:
            count = min(chunk_rows, labels.rows - start)
            first = start + 1
            sequence = sequences.read(count)
            if sequence.ndim == 2:
                sequence = sequence[:, :, None]
            if steps is None:
                mask = np.ones(sequence.shape[:2], dtype=bool)
            elif steps_key == "lengths":
                mask = _mask_from_lengths(steps.read(count), sequence.shape[1], first)
            else:
                mask = _mask_from_flags(steps.read(count), first)
            yield Chunk(
                sequence_inputs(sequence, mask), encoder.encode_array(labels.read(count), first), first
            )
            start += count
    finally:
        for reader in (sequences, steps, labels):
            if reader is not None:
                reader.close()


def _mask_from_lengths(lengths: npt.NDArray[Any], steps: int, first_row: int) -> npt.NDArray[np.bool_]:
    """Real steps per row → the mask (true on the first ``length`` steps)."""
    if lengths.dtype.kind == "f":
        i = first_non_whole(lengths)
        if i is not None:
            raise InvalidInput(
                f"row {first_row + i}: length {float(lengths[i])!r} is not a whole number of steps"
            )
    elif lengths.dtype.kind not in "iu":
        raise InvalidInput(f"'lengths' must hold whole numbers of steps, got dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64)
    bad = np.flatnonzero((lengths < 1) | (lengths > steps))
    if bad.size:
        i = int(bad[0])
        raise InvalidInput(
            f"row {first_row + i}: length {int(lengths[i])} is not between 1 and {steps} "
            "(the padded steps per row)"
        )
    mask: npt.NDArray[np.bool_] = np.arange(steps)[None, :] < lengths[:, None]
    return mask


def _mask_from_flags(flags: npt.NDArray[Any], first_row: int) -> npt.NDArray[np.bool_]:
    """A mask array taken as the model's `mask` input takes it (true/false, or 0 and 1); every row needs
    at least one real step."""
    places = RowPlaces(first_row, flags.shape[0])
    mask: npt.NDArray[np.bool_] = cast_values(
        flags, np.dtype(bool), functools.partial(places.value, MASK_INPUT)
    )
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise InvalidInput(f"row {first_row + int(empty[0])}: the mask marks no real step")
    return mask
