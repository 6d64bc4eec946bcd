"""The one table between Open Inference Protocol datatypes and numpy dtypes, and its reverse.

BYTES tensors are numpy object arrays whose elements are `bytes` (the protocol's strings are bytes on the
wire). Fixed-size datatypes are little-endian on the wire, as Triton's binary tensor extension fixes.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from app.errors import InvalidInput

BYTES: Final = "BYTES"

#: V2 datatype → numpy dtype (little-endian where the width is over one byte).
DATATYPE_TO_DTYPE: Final[dict[str, np.dtype[np.generic]]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    BYTES: np.dtype(np.object_),
}

#: numpy dtype (native byte order, by `dtype.str` without the order mark) → V2 datatype.
_KIND_SIZE_TO_DATATYPE: Final[dict[tuple[str, int], str]] = {
    (dtype.kind, dtype.itemsize): datatype
    for datatype, dtype in DATATYPE_TO_DTYPE.items()
    if datatype != BYTES
}

#: Fast path for the dtypes arrays usually have (native byte order).
_DTYPE_TO_DATATYPE: Final[dict[np.dtype[np.generic], str]] = {
    dtype.newbyteorder("="): datatype for datatype, dtype in DATATYPE_TO_DTYPE.items() if datatype != BYTES
}

#: V2 datatype → Triton model-config `data_type` (BYTES is TYPE_STRING there).
DATATYPE_TO_CONFIG_TYPE: Final[dict[str, str]] = {
    datatype: "TYPE_STRING" if datatype == BYTES else f"TYPE_{datatype}" for datatype in DATATYPE_TO_DTYPE
}


def to_dtype(datatype: str) -> np.dtype[np.generic]:
    """numpy dtype of a V2 datatype; raises `InvalidInput` for a datatype not in the table."""
    try:
        return DATATYPE_TO_DTYPE[datatype]
    except (KeyError, TypeError):
        known = ", ".join(DATATYPE_TO_DTYPE)
        raise InvalidInput(f"unknown datatype {datatype!r}; expected one of {known}") from None


def to_datatype(dtype: np.dtype[np.generic] | str | type) -> str:
    """V2 datatype of a numpy dtype (or dtype name such as ``"float32"``, ``"object"``, ``"str"``).

    Raises:
        ValueError: the dtype has no V2 datatype (complex, datetime, ...).
    """
    if isinstance(dtype, np.dtype):
        known = _DTYPE_TO_DATATYPE.get(dtype)
        if known is not None:
            return known
    resolved = np.dtype(dtype)
    if resolved.kind in "OSU":
        return BYTES
    try:
        return _KIND_SIZE_TO_DATATYPE[(resolved.kind, resolved.itemsize)]
    except KeyError:
        raise ValueError(f"numpy dtype {resolved} has no Open Inference Protocol datatype") from None
