"""Open Inference Protocol datatypes ↔ numpy dtypes, from the one table of `app/dtypes.py` plus `BYTES`.

BYTES tensors are numpy object arrays whose elements are `bytes` (the protocol's strings are bytes on the
wire). Fixed-size datatypes are little-endian on the wire, as Triton's binary tensor extension fixes.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from app.dtypes import DATATYPE_BY_NUMPY, NUMPY_BY_DATATYPE
from app.errors import InvalidInput

BYTES: Final = "BYTES"

#: V2 datatype → numpy dtype (little-endian where the width is over one byte).
DATATYPE_TO_DTYPE: Final[dict[str, np.dtype[np.generic]]] = {
    datatype: np.dtype(name).newbyteorder("<") for datatype, name in NUMPY_BY_DATATYPE.items()
} | {BYTES: np.dtype(np.object_)}

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


#: Native-order numpy dtype → V2 datatype: `to_datatype` without computing a dtype's name (slow in numpy).
_DATATYPE_BY_DTYPE: Final = {np.dtype(name): datatype for name, datatype in DATATYPE_BY_NUMPY.items()}


def to_datatype(dtype: np.dtype[np.generic] | str | type) -> str:
    """V2 datatype of a numpy dtype (or dtype name such as ``"float32"``, ``"object"``, ``"str"``).

    Raises:
        ValueError: the dtype has no V2 datatype (complex, datetime, ...).
    """
    resolved = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)
    datatype = _DATATYPE_BY_DTYPE.get(resolved)
    if datatype is not None:
        return datatype
    if resolved.kind in "OSU":
        return BYTES
    datatype = DATATYPE_BY_NUMPY.get(resolved.name)  # the name leaves out the byte order
    if datatype is None:
        raise ValueError(f"numpy dtype {resolved} has no Open Inference Protocol datatype")
    return datatype
