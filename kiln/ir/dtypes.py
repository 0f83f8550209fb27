"""Element types of kiln tensors.

Each :class:`DType` knows its ONNX ``TensorProto`` code, its numpy dtype and a
short name used by the text printer (``f32``, ``i64``, ...). The ONNX codes are
the numbers fixed by the ONNX spec, so this module needs no onnx import.
"""

from __future__ import annotations

import enum

import ml_dtypes
import numpy as np


class DType(enum.Enum):
    """A tensor element type: ``(onnx code, short name, numpy dtype)``."""

    FLOAT32 = (1, "f32", np.dtype(np.float32))
    UINT8 = (2, "u8", np.dtype(np.uint8))
    INT8 = (3, "i8", np.dtype(np.int8))
    UINT16 = (4, "u16", np.dtype(np.uint16))
    INT16 = (5, "i16", np.dtype(np.int16))
    INT32 = (6, "i32", np.dtype(np.int32))
    INT64 = (7, "i64", np.dtype(np.int64))
    BOOL = (9, "bool", np.dtype(np.bool_))
    FLOAT16 = (10, "f16", np.dtype(np.float16))
    FLOAT64 = (11, "f64", np.dtype(np.float64))
    UINT32 = (12, "u32", np.dtype(np.uint32))
    UINT64 = (13, "u64", np.dtype(np.uint64))
    BFLOAT16 = (16, "bf16", np.dtype(ml_dtypes.bfloat16))

    @property
    def onnx_code(self) -> int:
        """The ``TensorProto.DataType`` number."""
        return self.value[0]

    @property
    def short(self) -> str:
        """The printer's short name, e.g. ``f32``."""
        return self.value[1]

    @property
    def numpy(self) -> np.dtype:
        """The numpy dtype that holds this type."""
        return self.value[2]

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return self.numpy.itemsize

    @property
    def is_float(self) -> bool:
        """True for the floating-point types."""
        return self in _FLOATS

    @property
    def is_integer(self) -> bool:
        """True for signed and unsigned integer types (not bool)."""
        return self in _INTS

    def __str__(self) -> str:
        return self.short

    def __repr__(self) -> str:
        return f"DType.{self.name}"

    @classmethod
    def from_onnx(cls, code: int) -> DType:
        """Map an ONNX ``TensorProto.DataType`` number to a DType.

        Raises ``KeyError`` for types kiln does not support (strings, float8, ...).
        """
        return _BY_CODE[code]

    @classmethod
    def from_numpy(cls, dtype: np.dtype | type) -> DType:
        """Map a numpy dtype to a DType; raises ``KeyError`` if kiln lacks it."""
        return _BY_NUMPY[np.dtype(dtype)]

    @classmethod
    def from_short(cls, name: str) -> DType:
        """Map a printer short name (``f32``) or enum name (``float32``) to a DType."""
        key = name.lower()
        if key in _BY_SHORT:
            return _BY_SHORT[key]
        return cls[name.upper()]


_FLOATS = frozenset({DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16, DType.FLOAT64})
_INTS = frozenset(
    {DType.INT8, DType.INT16, DType.INT32, DType.INT64, DType.UINT8, DType.UINT16, DType.UINT32, DType.UINT64}
)
_BY_CODE = {d.onnx_code: d for d in DType}
_BY_NUMPY = {d.numpy: d for d in DType}
_BY_SHORT = {d.short: d for d in DType}

# Names of the ONNX element types kiln does not support, for error messages.
ONNX_TYPE_NAMES = {
    0: "undefined", 8: "string", 14: "complex64", 15: "complex128", 17: "float8e4m3fn",
    18: "float8e4m3fnuz", 19: "float8e5m2", 20: "float8e5m2fnuz", 21: "uint4", 22: "int4",
    23: "float4e2m1", 24: "float8e8m0", 25: "uint2", 26: "int2",
}


def onnx_type_name(code: int) -> str:
    """A readable name for any ONNX element type code, supported or not."""
    if code in _BY_CODE:
        return _BY_CODE[code].name.lower()
    return ONNX_TYPE_NAMES.get(code, f"type#{code}")
