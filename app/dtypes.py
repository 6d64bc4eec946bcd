"""The one table of tensor element types the server feeds and answers: numpy dtype name (the model card's
spelling) ↔ onnxruntime type string ↔ Open Inference Protocol (V2) datatype, and its reverses.

Text tensors are not in it: onnxruntime's `tensor(string)` is not a type the server feeds, and the V2
`BYTES` datatype (numpy object arrays of `bytes`) is the protocol's own (`app/v2/datatypes.py`).
"""

from __future__ import annotations

from typing import Final, NamedTuple


class TensorType(NamedTuple):
    """One element type under its three names."""

    numpy: str
    onnxruntime: str
    datatype: str


#: Every fixed-size element type, in the order the V2 protocol lists its datatypes.
TENSOR_TYPES: Final = (
    TensorType("bool", "tensor(bool)", "BOOL"),
    TensorType("int8", "tensor(int8)", "INT8"),
    TensorType("int16", "tensor(int16)", "INT16"),
    TensorType("int32", "tensor(int32)", "INT32"),
    TensorType("int64", "tensor(int64)", "INT64"),
    TensorType("uint8", "tensor(uint8)", "UINT8"),
    TensorType("uint16", "tensor(uint16)", "UINT16"),
    TensorType("uint32", "tensor(uint32)", "UINT32"),
    TensorType("uint64", "tensor(uint64)", "UINT64"),
    TensorType("float16", "tensor(float16)", "FP16"),
    TensorType("float32", "tensor(float)", "FP32"),
    TensorType("float64", "tensor(double)", "FP64"),
)

NUMPY_BY_ONNXRUNTIME: Final = {row.onnxruntime: row.numpy for row in TENSOR_TYPES}
DATATYPE_BY_NUMPY: Final = {row.numpy: row.datatype for row in TENSOR_TYPES}
NUMPY_BY_DATATYPE: Final = {row.datatype: row.numpy for row in TENSOR_TYPES}
