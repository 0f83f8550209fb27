"""Channel groups: which tensors share a channel index, and how to remove channels from all of them.

Removing output channel ``c`` of a conv is only sound if everything that depends on that
channel loses it too: the BatchNorm and activations after it, a residual add that ties it to
another conv's channel ``c``, the squeeze-excite scale it is multiplied by, a concat that
places it in a wider tensor, and the input channel ``c`` of every conv or dense layer that
reads it. DepGraph (Fang et al., 2023) calls such a set a *group*; here it is a
:class:`Space`, built with a union-find over values:

- **producers** make a space's channels from others: a conv (group 1) by its weight's rows, a
  Gemm or MatMul by constant weights by its columns;
- **members** keep the channel index (elementwise ops, BatchNorm, pools, depthwise convs,
  Flatten or Reshape of ``[N, C, 1, 1]`` to ``[N, C]``); a binary op ties both operands' spaces
  together;
- **readers** consume the channels as input channels: a conv (group 1), a Gemm or a MatMul;
- a **Concat** on the channel axis places its inputs' channels at offsets of its output's:
  channel ``j`` of the output *is* channel ``j - offset`` of one input (one *atom*).

Anything else that reads a space (a Reshape into heads, a graph output, a Softmax over the
channels, a grouped conv) *pins* it: its channels stay, and the reason is kept.

For each channel the analysis knows whether nobody reads it (every reader's weights are zero
there) and whether it is a constant (its producers' weights are zero, so it holds the bias,
carried through the members by evaluating them on a one-element-per-channel probe; NaN marks
"not constant"). :func:`remove_channels` then drops chosen atoms everywhere at once, and folds a
removed constant channel into its readers' biases: exactly for dense layers and unpadded convs,
and also for a zero constant; padded convs see a constant channel differently at the borders,
so only pruning, which is lossy anyway, folds those.

Used by the exact ``dead-channels`` pass and by ``prune-channels``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np

from networkx.utils import UnionFind

from kiln.ir import Graph, Node, Value, evaluate_node

#: Elementwise ops of one input that keep the channel index (output 0 only).
UNARY = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "Erf", "Gelu", "Mish", "Neg", "Abs", "Exp", "Sqrt", "Reciprocal", "Identity", "Dropout", "Clip",
    "Cast", "Floor", "Ceil", "Round", "Sin", "Cos", "ThresholdedRelu", "Shrink", "Swish",
})
#: Elementwise ops of two inputs (with numpy broadcasting).
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "Mean"})
#: Pools that keep the channel index and carry a constant channel through unchanged.
POOLS = frozenset({"MaxPool", "GlobalAveragePool", "GlobalMaxPool", "AveragePool"})


# --------------------------------------------------------------------------- spaces


@dataclass
class Space:
    """One channel group: the values that share a channel index, and who makes and reads them."""

    size: int
    values: list[Value] = field(default_factory=list)
    axes: dict[int, int] = field(default_factory=dict)  # id(value) -> its channel axis
    producers: list[Node] = field(default_factory=list)
    members: list[Node] = field(default_factory=list)
    readers: list[tuple[Node, int]] = field(default_factory=list)  # (node, input index)
    pinned: str | None = None

    def pin(self, why: str) -> None:
        """Keep every channel, for this reason (the first one given)."""
        self.pinned = self.pinned or why


def _const(v: Value | None) -> np.ndarray | None:
    return v.numpy() if v is not None and v.is_constant else None


def _channels(v: Value | None, axis: int) -> int | None:
    if v is None or v.shape is None or not (-len(v.shape) <= axis < len(v.shape)):
        return None
    d = v.shape[axis]
    return d if isinstance(d, int) else None


def _conv_kind(node: Node) -> str | None:
    """``dense`` (group 1), ``depthwise`` (one channel per group, as many out as in) or None."""
    w = _const(node.input(1))
    x = node.input(0)
    if w is None or w.ndim < 3 or w.dtype.kind != "f" or x is None:
        return None
    group = node.attr("group", 1)
    c = _channels(x, 1)
    if group == 1 and c == w.shape[1]:
        return "dense"
    if c is not None and group == c == w.shape[0] and w.shape[1] == 1:
        return "depthwise"
    return None


def _dense_weight(node: Node) -> tuple[np.ndarray, bool] | None:
    """(W, transposed) of a Gemm or MatMul by a constant 2-D weight, read as ``x @ W``; None otherwise."""
    w = _const(node.input(1))
    if w is None or w.ndim != 2 or w.dtype.kind != "f":
        return None
    if node.op_type == "MatMul":
        return w, False
    if node.attr("transA", 0) or node.attr("alpha", 1.0) != 1.0 or node.attr("beta", 1.0) != 1.0:
        return None
    c = node.input(2)
    if c is not None and (not c.is_constant or c.numpy().size not in (1, w.shape[0] if node.attr("transB", 0)
                                                                         else w.shape[1])):
        return None
    return w, bool(node.attr("transB", 0))


def _padded(node: Node) -> bool:
    auto = node.attr("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    return auto not in ("NOTSET", "VALID") or any(node.attr("pads", []) or [])


class ChannelGraph:
    """The channel spaces of ``graph``'s top level, their atoms, and what each channel holds."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._uf = UnionFind()
        self._axis: dict[int, int] = {}  # id(value) -> channel axis
        self._values: dict[int, Value] = {}
        self._pins: dict[int, str] = {}  # id(value) -> why its space is pinned
        self._links: list[tuple[Node, int]] = []  # concat nodes and their axis
        self._build()

    # -- building

    def _track(self, v: Value, axis: int) -> bool:
        """Give ``v`` a channel axis; False (and a pin) if it has no static channel count there."""
        if v.shape is None:
            return False
        axis = axis % len(v.shape) if v.shape else 0
        if id(v) in self._axis and self._axis[id(v)] != axis:
            self._pins[id(v)] = f"'{v.name}' is read with two channel axes"
            return True
        self._axis[id(v)] = axis
        self._values[id(v)] = v
        self._uf[id(v)]  # a set of its own until tied
        if _channels(v, axis) is None:
            self._pins[id(v)] = f"'{v.name}' has no static channel count"
        return True

    def _tie(self, a: Value, b: Value, axis_a: int, axis_b: int) -> None:
        if self._track(a, axis_a) and self._track(b, axis_b):
            if _channels(a, self._axis[id(a)]) != _channels(b, self._axis[id(b)]):
                self._pins[id(a)] = f"'{a.name}' and '{b.name}' differ in channels"
            self._uf.union(id(a), id(b))

    def _build(self) -> None:
        g = self.graph
        self._role: dict[int, str] = {}  # id(node) -> producer | member | link | pin
        for node in g.nodes:
            self._classify(node)
        for v in g.inputs:
            if id(v) in self._axis:
                self._pins[id(v)] = f"graph input '{v.name}'"
        for v in g.outputs:
            if id(v) in self._axis:
                self._pins[id(v)] = f"graph output '{v.name}'"
        self._spaces()

    def _classify(self, node: Node) -> None:
        y = node.outputs[0] if node.outputs else None
        op = node.op_type if node.domain == "" else None
        if any(True for _ in node.subgraphs()):
            self._pin_inputs(node, f"read by {node.label()} (a control-flow op)")
            return
        kind = _conv_kind(node) if op == "Conv" else None
        if kind == "dense" and y is not None:
            self._track(node.input(0), 1)
            self._track(y, 1)
            self._role[id(node)] = "producer"
            self._pin_unknown_inputs(node, (0, 1, 2))
            return
        if kind == "depthwise" and y is not None:
            self._tie(node.input(0), y, 1, 1)
            self._role[id(node)] = "member"
            self._pin_unknown_inputs(node, (0, 1, 2))
            return
        if op in ("Gemm", "MatMul") and _dense_weight(node) is not None and y is not None:
            x = node.input(0)
            if x is not None and x.shape is not None and (op == "MatMul" and len(x.shape) >= 2 or len(x.shape) == 2):
                self._track(x, -1)
                self._track(y, -1)
                self._role[id(node)] = "producer"
                self._pin_unknown_inputs(node, (0, 1, 2))
                return
        if op == "BatchNormalization" and len(node.outputs) == 1 and y is not None and all(
                _const(node.input(i)) is not None for i in range(1, 5)):
            self._tie(node.input(0), y, 1, 1)
            self._role[id(node)] = "member"
            return
        if (op in UNARY or op in POOLS) and y is not None and node.input(0) is not None and (
                len(node.outputs) == 1 or not any(o.uses or o.is_graph_output for o in node.outputs[1:])):
            if op in ("PRelu", "Clip") and any(_const(v) is None for v in node.inputs[1:] if v is not None):
                self._pin_inputs(node, f"read by {node.label()} with a variable parameter")
                return
            if op == "PRelu" and not self._broadcasts_per_channel(node.input(1), node.input(0), 1):
                self._pin_inputs(node, f"read by {node.label()} with a slope over more than channels")
                return
            x = node.input(0)
            axis = 1 if op in POOLS else self._axis.get(id(x))  # an activation keeps its input's channel axis
            if axis is None:
                self._pin_inputs(node, f"read by {node.label()}, whose input is no channel group's")
                return
            self._tie(x, y, axis, axis)
            self._role[id(node)] = "member"
            return
        if op in BINARY and y is not None and self._binary(node, y):
            self._role[id(node)] = "member"
            return
        if op == "Flatten" and y is not None and node.attr("axis", 1) == 1 and self._spatial_ones(node.input(0)):
            self._tie(node.input(0), y, 1, 1)
            self._role[id(node)] = "member"
            return
        if op == "Reshape" and y is not None and self._squeezes_spatial(node):
            self._tie(node.input(0), y, 1, 1)
            self._role[id(node)] = "member"
            return
        if op == "Concat" and y is not None and y.shape is not None:
            axis = node.attr("axis", 0) % len(y.shape)
            if all(v is not None and self._axis.get(id(v)) == axis and _channels(v, axis) is not None
                   for v in node.inputs):
                for v in node.inputs:
                    self._track(v, axis)
                self._track(y, axis)
                self._links.append((node, axis))
                self._role[id(node)] = "link"
                return
        self._pin_inputs(node, f"read by {node.label()}")

    def _spatial_ones(self, v: Value | None) -> bool:
        return v is not None and v.shape is not None and len(v.shape) >= 3 and all(d == 1 for d in v.shape[2:])

    def _squeezes_spatial(self, node: Node) -> bool:
        """A Reshape of ``[N, C, 1, .., 1]`` to ``[N, C]`` by a constant shape (a classifier's flatten)."""
        x, y, shape = node.input(0), node.outputs[0], _const(node.input(1))
        return (self._spatial_ones(x) and shape is not None and shape.shape == (2,) and y.shape is not None
                and len(y.shape) == 2 and y.shape[1] == x.shape[1] and int(shape[1]) in (-1, x.shape[1])
                and int(shape[0]) != -1 and not node.attr("allowzero", 0))

    def _broadcasts_per_channel(self, c: Value | None, like: Value | None, axis: int) -> bool:
        """Whether constant ``c`` broadcasts against ``like`` with size 1 everywhere but (maybe) ``axis``."""
        arr = _const(c)
        if arr is None or like is None or like.shape is None or arr.ndim > len(like.shape):
            return False
        axis = axis % len(like.shape)
        shape = (1,) * (len(like.shape) - arr.ndim) + arr.shape
        return all(d == 1 or i == axis for i, d in enumerate(shape))

    def _binary(self, node: Node, y: Value) -> bool:
        if y.shape is None or len(node.inputs) != 2 or any(v is None or v.shape is None for v in node.inputs):
            return False
        rank = len(y.shape)
        if rank < 2 or y.dtype is None or not y.dtype.is_float:
            return False
        variables = [v for v in node.inputs if not v.is_constant]
        axis = next((self._axis[id(v)] for v in variables if id(v) in self._axis), None)
        if axis is None:
            return False
        consts = [v for v in node.inputs if v.is_constant]
        if any(not self._broadcasts_per_channel(c, y, axis) for c in consts):
            return False
        for v in variables:  # a variable operand broadcasts only over the leading dims or is full-rank
            if len(v.shape) != rank:
                return False
        tied = [v for v in variables if _channels(v, axis) == _channels(y, axis)]
        if len(tied) != len(variables):  # a [N, 1, H, W] mask: fine for the channels, not a space member
            others = [v for v in variables if v not in tied]
            if any(_channels(v, axis) != 1 for v in others):
                return False
        self._track(y, axis)
        for v in tied:
            self._tie(v, y, axis, axis)
        return True

    def _pin_inputs(self, node: Node, why: str) -> None:
        for v in node.inputs:
            if v is not None:
                self._pins.setdefault(id(v), why)
                self._values.setdefault(id(v), v)

    def _pin_unknown_inputs(self, node: Node, known: tuple[int, ...]) -> None:
        for i, v in enumerate(node.inputs):
            if v is not None and i not in known:
                self._pins.setdefault(id(v), f"read by {node.label()}")

    def _spaces(self) -> None:
        roots: dict[object, Space] = {}
        for vid, v in self._values.items():
            if vid not in self._axis:
                continue
            root = self._uf[vid]
            size = _channels(v, self._axis[vid]) or 0
            space = roots.setdefault(root, Space(size))
            space.values.append(v)
            space.axes[vid] = self._axis[vid]
        for vid, v in self._values.items():
            if vid in self._axis and v.producer is not None and id(v.producer) not in self._role:
                self._pins.setdefault(vid, f"'{v.name}' is made by {v.producer.label()}")
        for vid, why in self._pins.items():
            if vid in self._axis:
                roots[self._uf[vid]].pin(why)
        self.spaces: list[Space] = list(roots.values())
        self.space_of: dict[int, Space] = {vid: roots[self._uf[vid]] for vid in self._axis}
        for node in self.graph.nodes:
            role = self._role.get(id(node))
            if role == "producer":
                self.space_of[id(node.outputs[0])].producers.append(node)
                self.space_of[id(node.input(0))].readers.append((node, 0))
            elif role == "member":
                self.space_of[id(node.outputs[0])].members.append(node)
        # atoms: (space index, channel) pairs that concats make one channel
        index = {id(s): i for i, s in enumerate(self.spaces)}
        self._atoms = UnionFind()
        for node, _axis in self._links:
            out = self.space_of[id(node.outputs[0])]
            offset = 0
            for v in node.inputs:
                s = self.space_of[id(v)]
                for c in range(s.size):
                    self._atoms.union((index[id(out)], offset + c), (index[id(s)], c))
                offset += s.size
        self._index = index

    # -- queries

    def atoms(self) -> dict[object, list[tuple[Space, int]]]:
        """The channels that are one channel (through concats): root -> [(space, channel)]."""
        out: dict[object, list[tuple[Space, int]]] = {}
        for i, s in enumerate(self.spaces):
            for c in range(s.size):
                out.setdefault(self._atoms[(i, c)], []).append((s, c))
        return out

    def constants(self) -> dict[int, np.ndarray]:
        """Per value in a space: its per-channel constant (NaN where a channel is not constant)."""
        out: dict[int, np.ndarray] = {}
        nan = {id(v): np.full(s.size, np.nan, np.float64) for s in self.spaces for v in s.values}
        for node in self.graph.nodes:
            y = node.outputs[0] if node.outputs else None
            if y is None or id(y) not in self.space_of:
                continue
            role = self._role.get(id(node))
            space = self.space_of[id(y)]
            if role == "producer":
                out[id(y)] = _producer_constant(node, space.size)
            elif role == "link":
                out[id(y)] = np.concatenate([out.get(id(v), nan[id(v)]) for v in node.inputs])
            elif role == "member":
                out[id(y)] = self._member_constant(node, out, nan)
            else:
                out[id(y)] = nan[id(y)]
        for vid, arr in nan.items():
            out.setdefault(vid, arr)
        return out

    def _member_constant(self, node: Node, known: dict[int, np.ndarray], nan: dict[int, np.ndarray]) -> np.ndarray:
        y = node.outputs[0]
        axis = self.space_of[id(y)].axes[id(y)]
        ins = [v for v in node.inputs if v is not None and not v.is_constant]
        probes = {v.name: known.get(id(v), nan.get(id(v))) for v in ins}
        size = _channels(y, axis) or 0
        none = np.full(size, np.nan)
        if y.dtype is None or not y.dtype.is_float:
            return none
        if any(p is None or np.isnan(p).all() for p in probes.values()) and node.op_type != "Conv":
            return none
        op = node.op_type
        if op == "Conv":  # depthwise: a zero filter outputs its bias; unpadded, c * sum(w) + b
            w = node.input(1).numpy().astype(np.float64)
            b = _const(node.input(2))
            b = np.zeros(size) if b is None else b.astype(np.float64)
            x = probes[node.input(0).name]
            zero = ~w.reshape(size, -1).any(axis=1)
            out = np.where(zero, b, np.nan)
            if x is not None:
                flat = x * w.reshape(size, -1).sum(axis=1) + b
                out = np.where(~zero & ((x == 0) | (not _padded(node))) & ~np.isnan(x), flat, out)
            return out
        if op in POOLS:
            x = probes[node.input(0).name]
            if x is None or op == "AveragePool" and _padded(node) and node.attr("count_include_pad", 0):
                return none
            return x
        feeds = {}
        for v in ins:
            shape = [1] * len(v.shape)
            shape[self.space_of[id(v)].axes[id(v)] if id(v) in self.space_of else axis] = -1
            p = probes[v.name] if probes[v.name] is not None else np.full(_channels(v, axis) or 1, np.nan)
            feeds[v.name] = p.astype(v.dtype.numpy if v.dtype is not None else np.float32).reshape(shape)
        try:
            with np.errstate(all="ignore"):
                result = np.asarray(evaluate_node(node, feeds)[0], np.float64)
        except Exception:  # noqa: BLE001 - a probe the op refuses: treat its channels as not constant
            return none
        if result.ndim != len(y.shape) or result.shape[axis] != size:
            return none
        flat = np.moveaxis(result, axis, 0).reshape(size, -1)
        return np.where((flat == flat[:, :1]).all(axis=1), flat[:, 0], np.nan)


def _producer_constant(node: Node, size: int) -> np.ndarray:
    """What each output channel of a producer holds when its weights there are all zero (else NaN)."""
    if node.op_type == "Conv":
        w = node.input(1).numpy()
        zero = ~w.reshape(w.shape[0], -1).any(axis=1)
        b = _const(node.input(2))
    else:
        w, transposed = _dense_weight(node)  # type: ignore[misc]
        cols = w if transposed else w.T  # [N, K]
        zero = ~cols.any(axis=1)
        b = _const(node.input(2)) if node.op_type == "Gemm" else None
    bias = np.zeros(size) if b is None else np.broadcast_to(b.astype(np.float64).reshape(-1), (size,))
    return np.where(zero, bias, np.nan)


def reader_weights(node: Node) -> np.ndarray:
    """Per input channel of a reader: the L1 norm of the weights that read it."""
    if node.op_type == "Conv":
        w = np.abs(node.input(1).numpy().astype(np.float64))
        return w.transpose(1, 0, *range(2, w.ndim)).reshape(w.shape[1], -1).sum(axis=1)
    w, transposed = _dense_weight(node)  # type: ignore[misc]
    rows = (w.T if transposed else w).astype(np.float64)  # [K, N]
    return np.abs(rows).sum(axis=1)


def producer_importance(space: Space, norm: str = "l1") -> np.ndarray:
    """Per channel of ``space``: its producers' filter norms, summed (BatchNorm gammas are folded in)."""
    out = np.zeros(space.size)
    for node in space.producers:
        if node.op_type == "Conv":
            w = node.input(1).numpy().astype(np.float64).reshape(space.size, -1)
        else:
            w, transposed = _dense_weight(node)  # type: ignore[misc]
            w = (w if transposed else w.T).astype(np.float64)
        out += np.abs(w).sum(axis=1) if norm == "l1" else np.sqrt((w * w).sum(axis=1))
    return out


# --------------------------------------------------------------------------- removal


def foldable(node: Node, value: float) -> bool:
    """Whether reader ``node`` can take a removed input channel that holds ``value`` into its bias exactly."""
    if np.isnan(value):
        return False
    return value == 0 or node.op_type != "Conv" or not _padded(node)


def _slice(arr: np.ndarray, axis: int, keep: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.take(arr, keep, axis=axis))


def _set_const(graph: Graph, node: Node, i: int, arr: np.ndarray, name: str) -> None:
    """Input ``i`` of ``node`` becomes a new constant (never the old one changed: it may be shared);
    an optional input past the node's last (a bias it did not have) is added."""
    value = graph.add_constant(arr, name)
    if i < len(node.inputs):
        node.set_input(i, value)
    else:
        node.set_inputs([*node.inputs, *([None] * (i - len(node.inputs))), value])


def remove_channels(cg: ChannelGraph, drop: dict[int, np.ndarray], consts: dict[int, np.ndarray]) -> int:
    """Remove the channels ``drop[id(space)]`` (a bool mask) from their spaces; how many were removed.

    Readers fold a removed channel's constant (``consts``, per value; NaN for an unread one) into
    their bias; the caller chose channels that are unread or foldable (see :func:`foldable`).
    Producers and members shrink first, then the readers, so that a fold sees its reader's
    final output channels.
    """
    g = cg.graph
    chosen = [(s, drop[id(s)]) for s in cg.spaces if id(s) in drop and drop[id(s)].any() and not s.pinned]
    for space, mask in chosen:
        keep = np.flatnonzero(~mask)
        for node in space.producers:
            _shrink_producer(g, node, keep)
        for node in space.members:
            _shrink_member(g, node, keep, space)
        for v in space.values:
            shape = list(v.shape)
            shape[space.axes[id(v)]] = len(keep)
            v.shape = tuple(shape)
    for space, mask in chosen:
        keep, gone = np.flatnonzero(~mask), np.flatnonzero(mask)
        for node, i in space.readers:
            x = node.input(i)
            _shrink_reader(g, node, keep, gone, consts.get(id(x), np.full(space.size, np.nan)))
    return sum(int(m.sum()) for _, m in chosen)


def _shrink_producer(g: Graph, node: Node, keep: np.ndarray) -> None:
    w = node.input(1).numpy()
    if node.op_type == "Conv":
        _set_const(g, node, 1, _slice(w, 0, keep), f"{node.name}_w")
        b = _const(node.input(2))
        if b is not None:
            _set_const(g, node, 2, _slice(b, 0, keep), f"{node.name}_b")
        return
    transposed = node.op_type == "Gemm" and bool(node.attr("transB", 0))
    _set_const(g, node, 1, _slice(w, 0 if transposed else 1, keep), f"{node.name}_w")
    c = _const(node.input(2)) if node.op_type == "Gemm" else None
    if c is not None and c.size > 1:
        _set_const(g, node, 2, _slice(c.reshape(-1), 0, keep), f"{node.name}_c")


def _shrink_member(g: Graph, node: Node, keep: np.ndarray, space: Space) -> None:
    y = node.outputs[0]
    rank = len(y.shape)
    axis = space.axes[id(y)]
    if node.op_type == "Conv":  # depthwise
        _set_const(g, node, 1, _slice(node.input(1).numpy(), 0, keep), f"{node.name}_w")
        if _const(node.input(2)) is not None:
            _set_const(g, node, 2, _slice(node.input(2).numpy(), 0, keep), f"{node.name}_b")
        node.set_attr("group", len(keep))
        return
    if node.op_type == "Reshape":  # [N, C, 1, 1] -> [N, C]: a literal C becomes the kept count
        shape = node.input(1).numpy().copy()
        if shape[1] != -1:
            shape[1] = len(keep)
            _set_const(g, node, 1, shape, f"{node.name}_shape")
        return
    if node.op_type == "BatchNormalization":
        for i in range(1, 5):
            _set_const(g, node, i, _slice(node.input(i).numpy(), 0, keep), f"{node.name}_{i}")
        return
    for i, v in enumerate(node.inputs):
        arr = _const(v)
        if arr is None or i == 0 and node.op_type in UNARY:
            continue
        full = arr.reshape((1,) * (rank - arr.ndim) + arr.shape)
        if full.shape[axis] == space.size and space.size > 1:
            sliced = _slice(full, axis, keep)
            _set_const(g, node, i, sliced.reshape(sliced.shape[rank - arr.ndim:]), f"{node.name}_{i}")


def _shrink_reader(g: Graph, node: Node, keep: np.ndarray, gone: np.ndarray, values: np.ndarray) -> None:
    w = node.input(1).numpy()
    fold = np.nan_to_num(values[gone], nan=0.0)  # unread channels (nan) contribute nothing to fold
    if node.op_type == "Conv":
        extra = np.tensordot(fold, w[:, gone].reshape(w.shape[0], len(gone), -1).sum(axis=2), axes=([0], [1])) \
            if fold.any() else None
        _set_const(g, node, 1, _slice(w, 1, keep), f"{node.name}_w")
        if extra is not None:
            b = _const(node.input(2))
            b = np.zeros(w.shape[0], w.dtype) if b is None else b
            _set_const(g, node, 2, (b + extra).astype(w.dtype), f"{node.name}_b")
        return
    transposed = node.op_type == "Gemm" and bool(node.attr("transB", 0))
    rows = w.T if transposed else w  # [K, N]
    extra = fold @ rows[gone].astype(np.float64) if fold.any() else None
    _set_const(g, node, 1, _slice(w, 1 if transposed else 0, keep), f"{node.name}_w")
    if extra is None:
        return
    if node.op_type == "Gemm":
        c = _const(node.input(2))
        c = np.zeros(rows.shape[1], w.dtype) if c is None else np.broadcast_to(c.reshape(-1), (rows.shape[1],))
        _set_const(g, node, 2, (c + extra).astype(w.dtype), f"{node.name}_c")
        return
    y = node.outputs[0]  # MatMul: the folded rows go into an Add after it
    uses, graph_out = list(y.uses), y.is_graph_output
    add = g.insert_after(node, Node("Add", [y, g.add_constant(extra.astype(w.dtype), f"{node.name}_folded")],
                                    name=f"{node.name}_folded"))
    added = add.outputs[0]
    added.dtype, added.shape = y.dtype, y.shape
    for use in uses:
        use.node.set_input(use.index, added)
    if graph_out:  # the output keeps its name: the MatMul's result takes a new one
        name = y.name
        g.rename_value(y, g.fresh_name(f"{name}_unfolded"))
        g.rename_value(added, name)
        g.outputs = [added if v is y else v for v in g.outputs]
