"""The leaves of kiln's IR, which know nothing of graphs: dims and shapes, constant tensors, typed
attributes, and uses.

Shapes are tuples of dims. A dim is an ``int`` (static), or a ``str`` naming a symbol; unknown
dims are symbols too, each with a distinct name that starts with ``?`` (see :func:`is_unknown_dim`).
:mod:`kiln.ir.core` builds values, nodes and graphs on these; the printer, the verifier and the op
schemas need only these, so they never import core.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np

from kiln.ir.dtypes import DType

if TYPE_CHECKING:
    from kiln.ir.core import Graph, Node

Dim = int | str
Shape = tuple[Dim, ...]

DEFAULT_DOMAIN = ""
KILN_DOMAIN = "kiln"


def is_unknown_dim(dim: Dim) -> bool:
    """True for a dim that is an anonymous unknown symbol (``?0``, ``?1``, ...)."""
    return isinstance(dim, str) and dim.startswith("?")


def shape_example(shape: Shape | None, fill: str = "1") -> str:
    """``shape`` as ``--input-shape`` text: ints as themselves, each symbolic dim as ``fill`` (``1x3x?x?``)."""
    return "x".join(str(d) if isinstance(d, int) else fill for d in shape or ())


def is_static(shape: Shape | None) -> bool:
    """True if the rank and every dim are known integers."""
    return shape is not None and all(isinstance(d, int) for d in shape)


def normalize_axis(axis: int, rank: int) -> int:
    """An ONNX axis (negative counts from the end) as an index in ``range(rank)``."""
    return axis + rank if axis < 0 else axis


def normalize_axes(axes: Iterable[int], rank: int) -> list[int]:
    """ONNX axes (negative count from the end) as sorted indices in ``range(rank)``."""
    return sorted(normalize_axis(int(a), rank) for a in axes)


def normalize_domain(domain: str) -> str:
    """Map ONNX's two spellings of the default domain to ``""``."""
    return DEFAULT_DOMAIN if domain in ("", "ai.onnx") else domain


# --------------------------------------------------------------------------- tensors


class Tensor:
    """A constant payload: a numpy array, or a loader that reads one lazily.

    External data is loaded on first access to :meth:`numpy`; ``dtype`` and
    ``shape`` are known without loading.
    """

    __slots__ = ("name", "dtype", "shape", "_array", "_loader")

    def __init__(
        self,
        array: np.ndarray | None = None,
        *,
        name: str = "",
        dtype: DType | None = None,
        shape: Sequence[int] | None = None,
        loader: Callable[[], np.ndarray] | None = None,
    ):
        if array is None and loader is None:
            raise ValueError("Tensor needs an array or a loader")
        if array is not None:
            array = np.asarray(array)
            dtype = dtype or DType.from_numpy(array.dtype)
            shape = array.shape
        assert dtype is not None and shape is not None, "a lazy Tensor needs dtype and shape"
        self.name = name
        self.dtype: DType = dtype
        self.shape: tuple[int, ...] = tuple(int(d) for d in shape)
        self._array = array
        self._loader = loader

    def numpy(self) -> np.ndarray:
        """The payload as a numpy array, loading external data on first use."""
        if self._array is None:
            assert self._loader is not None
            arr = np.asarray(self._loader())
            if arr.shape != self.shape:
                arr = arr.reshape(self.shape)
            self._array = arr.astype(self.dtype.numpy, copy=False)
            self._loader = None
        return self._array

    def copy(self) -> Tensor:
        """A new Tensor over the same payload (loaded or lazy)."""
        t = Tensor.__new__(Tensor)
        t.name, t.dtype, t.shape, t._array, t._loader = self.name, self.dtype, self.shape, self._array, self._loader
        return t

    @property
    def is_loaded(self) -> bool:
        """True once the payload is in memory."""
        return self._array is not None

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes of the payload."""
        return self.size * self.dtype.itemsize

    def __repr__(self) -> str:
        dims = ",".join(str(d) for d in self.shape)
        return f"Tensor({self.name!r}, {self.dtype}[{dims}])"


# --------------------------------------------------------------------------- attributes


class AttrType(enum.Enum):
    """The attribute kinds of ONNX, with the same numbering as ``AttributeProto``."""

    FLOAT = 1
    INT = 2
    STRING = 3
    TENSOR = 4
    GRAPH = 5
    FLOATS = 6
    INTS = 7
    STRINGS = 8
    TENSORS = 9
    GRAPHS = 10
    TYPE_PROTO = 13


@dataclass(frozen=True, slots=True)
class TypeValue:
    """A TYPE_PROTO attribute's value (Optional's ``type``): the serialized ``TypeProto`` and its text."""

    proto: bytes
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Attr:
    """A typed attribute value. Use the constructors (``Attr.ints([1, 1])``) or :meth:`infer`."""

    type: AttrType
    value: Any

    @staticmethod
    def float(v: float) -> Attr:
        return Attr(AttrType.FLOAT, float(v))

    @staticmethod
    def int(v: int) -> Attr:
        return Attr(AttrType.INT, int(v))

    @staticmethod
    def string(v: str) -> Attr:
        return Attr(AttrType.STRING, str(v))

    @staticmethod
    def tensor(v: Tensor | np.ndarray) -> Attr:
        return Attr(AttrType.TENSOR, v if isinstance(v, Tensor) else Tensor(np.asarray(v)))

    @staticmethod
    def graph(v: Graph) -> Attr:
        return Attr(AttrType.GRAPH, v)

    @staticmethod
    def floats(v: Iterable[float]) -> Attr:
        return Attr(AttrType.FLOATS, tuple(float(x) for x in v))

    @staticmethod
    def ints(v: Iterable[int]) -> Attr:
        return Attr(AttrType.INTS, tuple(int(x) for x in v))

    @staticmethod
    def strings(v: Iterable[str]) -> Attr:
        return Attr(AttrType.STRINGS, tuple(str(x) for x in v))

    @staticmethod
    def infer(v: Any) -> Attr:
        """Build an Attr from a plain Python value, guessing its type."""
        if isinstance(v, Attr):
            return v
        if isinstance(v, bool | int | np.integer):
            return Attr.int(int(v))
        if isinstance(v, float | np.floating):
            return Attr.float(float(v))
        if isinstance(v, str):
            return Attr.string(v)
        if isinstance(v, Tensor | np.ndarray):
            return Attr.tensor(v)
        if isinstance(v, list | tuple):
            items = list(v)
            if items and all(isinstance(x, Tensor | np.ndarray) for x in items):
                return Attr(AttrType.TENSORS, tuple(Attr.tensor(x).value for x in items))
            if items and all(isinstance(x, str) for x in items):
                return Attr.strings(items)
            if all(isinstance(x, bool | int | np.integer) for x in items):
                return Attr.ints(items)
            if all(isinstance(x, int | float | np.number) for x in items):
                return Attr.floats(items)
        raise TypeError(f"cannot infer an attribute type for {v!r}")

    def graphs(self) -> tuple[Graph, ...]:
        """The subgraphs this attribute holds (empty unless GRAPH or GRAPHS)."""
        if self.type is AttrType.GRAPH:
            return (self.value,)
        if self.type is AttrType.GRAPHS:
            return tuple(self.value)
        return ()


class Use(NamedTuple):
    """One use of a value: ``node.inputs[index] is value``."""

    node: Node
    index: int
