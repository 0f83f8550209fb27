"""Cleanup and simplification rules: no-op removal and algebraic identities.

This module registers one rule set, the pass ``simplify``, from two lists:

- ``NOOP_RULES``: nodes that compute their input unchanged (Identity, inference
  Dropout, a Cast to the input's own type, a Reshape/Expand to the input's own
  shape, Transposes that cancel, Squeeze/Unsqueeze pairs that cancel). Each
  rewrite returns the input value, so the node disappears. Two canonical forms go with
  them: ``conv1d-as-2d`` (a 1-D Conv as a 2-D one of height 1, for kiln's conv kernels)
  and ``squeeze-<act>-unsqueeze`` (an activation between a Squeeze and the Unsqueeze that
  undoes it applies to the unsqueezed value), so a chain of 1-D convs stays 2-D.
- ``ALGEBRA_RULES``: generated from ``ALGEBRA_TABLE``, one row per identity
  (``x * 1 -> x``, ``(x * c1) * c2 -> x * (c1*c2)``, ``Neg(Neg(x)) -> x``, ...),
  each row a whole rule: name, pattern, conditions, replacement, description, example.

Rewrites that forward an existing value need no special care for graph outputs:
the engine keeps every output's name, with an Identity where the forwarded value
is a graph input, another graph output or a value of an outer scope.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import ml_dtypes
import numpy as np

from kiln.ir import DType, Graph, Node, Value, const_ints, normalize_axes
from kiln.passes.pattern import Const, MatchContext, MatchFailure, Optional, copy_attrs
from kiln.passes.rules import RewriteRule, example_graph, register_rule_set

F32 = DType.FLOAT32

# =========================================================================== shared checks


def _shape_str(v: Value) -> str:
    if v.shape is None:
        return "(unknown)"
    return "(" + ", ".join(str(d) for d in v.shape) + ("," if len(v.shape) == 1 else "") + ")"


def _check_keeps(x: Value, c: Value, dtype: bool = True) -> None:
    """Broadcasting ``c`` against ``x`` leaves x's shape (and, with ``dtype``, its dtype) unchanged."""
    if dtype and x.dtype is not None and c.dtype is not None and x.dtype is not c.dtype:
        raise MatchFailure(f"constant %{c.name} is {c.dtype} but %{x.name} is {x.dtype}")
    if x.shape is None:
        raise MatchFailure(f"the rank of %{x.name} is unknown, so broadcasting %{c.name} might enlarge it")
    cs = tuple(c.numpy().shape)
    if len(cs) > len(x.shape):
        raise MatchFailure(f"constant %{c.name} of shape {cs} has a higher rank than %{x.name} {_shape_str(x)}, "
                           "so broadcasting enlarges it")
    for e, d in zip(reversed(cs), reversed(x.shape)):
        if e != 1 and not (isinstance(d, int) and d == e):
            raise MatchFailure(f"constant %{c.name} of shape {cs} would broadcast %{x.name} {_shape_str(x)} to a "
                               "larger (or unprovable) shape")


# =========================================================================== no-op rules


def _identity_pattern(op, x):
    return op.Identity(x)


IDENTITY = RewriteRule(
    name="identity",
    description="Identity(x) -> x.",
    pattern=_identity_pattern,
    rewrite=lambda op, x: x,
    example=lambda: example_graph("identity", {"x": (F32, (2, 3))}, lambda op, x: op.Identity(op.Relu(x))),
)


def _dropout_pattern(op, x, ratio, training_mode):
    return op.Dropout(x, Optional(ratio), Optional(training_mode), _name="drop")


def _dropout_check(ctx: MatchContext, x: Value, training_mode: Value | None, drop: Node) -> None:
    for mask in drop.outputs[1:]:
        if mask.name and (mask.uses or mask.is_graph_output):
            where = "a graph output" if mask.is_graph_output else f"read by {mask.users[0].label()}"
            raise MatchFailure(f"the Dropout mask output %{mask.name} is used ({where})")
    if 0 < ctx.graph.model_opset.get("", 0) < 7 and not drop.attr("is_test", 0):
        raise MatchFailure("Dropout before opset 7 trains unless is_test=1")
    if training_mode is not None:
        if not training_mode.is_constant:
            raise MatchFailure(f"training_mode %{training_mode.name} is not a constant, so Dropout may train")
        if np.any(training_mode.numpy()):
            raise MatchFailure(f"training_mode %{training_mode.name} is true: Dropout runs in training mode")


def _dropout_rewrite(op, x: Value, drop: Node) -> Any:
    named = [o for o in drop.outputs if o.name]
    return x if len(named) == 1 else (x, *([None] * (len(named) - 1)))  # the mask is unread


def _dropout_example() -> Graph:
    return example_graph("dropout", {"x": (F32, (2, 8))},
                         lambda op, x: op.Relu(op.Dropout(x, op.constant(np.array(0.5, np.float32)))))


DROPOUT = RewriteRule(
    name="dropout-inference",
    description="Dropout(x) in inference (no used mask, training_mode absent or a false constant) -> x.",
    pattern=_dropout_pattern, check=_dropout_check, rewrite=_dropout_rewrite, example=_dropout_example,
)


def _cast_check(ctx: MatchContext, x: Value, cast: Node) -> None:
    if x.dtype is None:
        raise MatchFailure(f"the dtype of %{x.name} is unknown")
    to = cast.attr("to")
    if to != x.dtype.onnx_code:
        raise MatchFailure(f"Cast to type {to} changes %{x.name} ({x.dtype}, type {x.dtype.onnx_code})")


CAST_SAME = RewriteRule(
    name="cast-same-type",
    description="Cast(x, to=T) where x already has type T -> x.",
    pattern=lambda op, x: op.Cast(x, _name="cast"),
    check=_cast_check,
    rewrite=lambda op, x: x,
    example=lambda: example_graph("cast_same", {"x": (F32, (2, 3))},
                                  lambda op, x: op.Relu(op.Cast(x, to=DType.FLOAT32.onnx_code))),
)


def _castlike_check(ctx: MatchContext, x: Value, like: Value) -> None:
    if x.dtype is None or like.dtype is None:
        raise MatchFailure(f"the dtype of %{x.name} or %{like.name} is unknown")
    if x.dtype is not like.dtype:
        raise MatchFailure(f"CastLike changes %{x.name} from {x.dtype} to {like.dtype}")


CASTLIKE_SAME = RewriteRule(
    name="castlike-same-type",
    description="CastLike(x, like) where x already has like's type -> x.",
    pattern=lambda op, x, like: op.CastLike(x, like),
    check=_castlike_check,
    rewrite=lambda op, x: x,
    example=lambda: example_graph("castlike_same", {"x": (F32, (2, 3)), "y": (F32, (1,))},
                                  lambda op, x, y: op.Relu(op.CastLike(x, y))),
)


def _reshape_check(ctx: MatchContext, x: Value, shape: Value, reshape: Node) -> None:
    if x.shape is None:
        raise MatchFailure(f"the rank of %{x.name} is unknown")
    target = const_ints(shape) or []
    dims = x.shape
    if len(target) != len(dims):
        raise MatchFailure(f"Reshape to rank {len(target)} changes the rank of %{x.name} {_shape_str(x)}")
    allowzero = reshape.attr("allowzero", 0)
    infer = [i for i, t in enumerate(target) if t == -1]
    if len(infer) > 1:
        raise MatchFailure(f"target shape {target} has more than one -1")
    for i, (t, d) in enumerate(zip(target, dims)):
        if t == -1:
            continue
        if t == 0 and not allowzero:
            continue  # copies dim i of the input
        if not (isinstance(d, int) and d == t):
            raise MatchFailure(f"target shape {target} differs from %{x.name} {_shape_str(x)} at dim {i}")
    if infer:
        others = [d for i, d in enumerate(dims) if i != infer[0]]
        if not all(isinstance(d, int) and d > 0 for d in others):
            raise MatchFailure(f"the -1 in target shape {target} is inferred from dims of %{x.name} "
                               f"{_shape_str(x)} that are not static and non-zero")


def _reshape_example() -> Graph:
    return example_graph("reshape_noop", {"x": (F32, (2, 3, 4))},
                         lambda op, x: op.Relu(op.Reshape(x, op.constant(np.array([0, -1, 4], np.int64)))))


RESHAPE_NOOP = RewriteRule(
    name="reshape-noop",
    description="Reshape(x, shape) whose constant shape (0 copies a dim unless allowzero, -1 infers) is x's own -> x.",
    pattern=lambda op, x, shape=Const(): op.Reshape(x, shape, _name="reshape"),
    check=_reshape_check,
    rewrite=lambda op, x: x,
    example=_reshape_example,
)


def _expand_check(ctx: MatchContext, x: Value, shape: Value) -> None:
    if x.shape is None:
        raise MatchFailure(f"the rank of %{x.name} is unknown")
    target = const_ints(shape) or []
    if len(target) > len(x.shape):
        raise MatchFailure(f"Expand to {target} raises the rank of %{x.name} {_shape_str(x)}")
    for i, (e, d) in enumerate(zip(reversed(target), reversed(x.shape))):
        if e != 1 and not (isinstance(d, int) and d == e):
            raise MatchFailure(f"Expand to {target} changes %{x.name} {_shape_str(x)} at dim {len(x.shape) - 1 - i}")


EXPAND_NOOP = RewriteRule(
    name="expand-noop",
    description="Expand(x, shape) whose constant shape broadcasts to exactly x's shape -> x.",
    pattern=lambda op, x, shape=Const(): op.Expand(x, shape),
    check=_expand_check,
    rewrite=lambda op, x: x,
    example=lambda: example_graph("expand_noop", {"x": (F32, (2, 3, 4))},
                                  lambda op, x: op.Relu(op.Expand(x, op.constant(np.array([3, 1], np.int64))))),
)


def _perm(node: Node, rank: int | None) -> list[int] | None:
    perm = node.attr("perm")
    if perm is not None:
        return [int(p) for p in perm]
    return None if rank is None else list(range(rank))[::-1]


def _transpose_check(ctx: MatchContext, x: Value, t: Node) -> None:
    perm = _perm(t, x.rank)
    if perm is None:
        raise MatchFailure(f"Transpose has no perm and the rank of %{x.name} is unknown")
    if perm != list(range(len(perm))):
        raise MatchFailure(f"perm {perm} is not the identity")


TRANSPOSE_IDENTITY = RewriteRule(
    name="transpose-identity",
    description="Transpose(x) with the identity perm -> x.",
    pattern=lambda op, x: op.Transpose(x, _name="t"),
    check=_transpose_check,
    rewrite=lambda op, x: x,
    example=lambda: example_graph("transpose_identity", {"x": (F32, (2, 3, 4))},
                                  lambda op, x: op.Relu(op.Transpose(x, perm=[0, 1, 2]))),
)


def _transpose_pair_check(ctx: MatchContext, x: Value, t1: Node, t2: Node) -> None:
    p1 = _perm(t1, x.rank)
    p2 = _perm(t2, x.rank)
    if p1 is None or p2 is None:
        raise MatchFailure(f"a Transpose has no perm and the rank of %{x.name} is unknown")
    if len(p1) != len(p2) or [p1[j] for j in p2] != list(range(len(p1))):
        raise MatchFailure(f"perms {p1} then {p2} do not cancel")


TRANSPOSE_PAIR = RewriteRule(
    name="transpose-pair",
    description="Transpose(Transpose(x, p1), p2) with p1[p2[j]] == j for all j -> x.",
    pattern=lambda op, x: op.Transpose(op.Transpose(x, _name="t1"), _name="t2"),
    check=_transpose_pair_check,
    rewrite=lambda op, x: x,
    example=lambda: example_graph(
        "transpose_pair", {"x": (F32, (2, 3, 4))},
        lambda op, x: op.Relu(op.Transpose(op.Transpose(x, perm=[1, 2, 0]), perm=[2, 0, 1]))),
)


def _axes(node: Node, axes_input: Value | None, in_rank: int | None, out_rank: int | None,
          squeeze_shape: tuple | None) -> list[int]:
    """Sorted, normalised axes of a Squeeze/Unsqueeze node; raises MatchFailure when they cannot be known.

    Axes come from the constant input (opset 13+) or the attribute (older opsets).
    Unsqueeze axes index its output (rank ``out_rank``), Squeeze axes its input.
    """
    if axes_input is not None:
        raw = const_ints(axes_input)
        if raw is None:
            raise MatchFailure(f"the axes %{axes_input.name} of {node.label()} are not a constant")
    elif node.attr("axes") is not None:
        raw = [int(a) for a in node.attr("axes")]
    elif node.op_type == "Squeeze":
        if squeeze_shape is None or not all(isinstance(d, int) for d in squeeze_shape):
            raise MatchFailure(f"{node.label()} squeezes every size-1 dim, and its input shape is not static")
        return [i for i, d in enumerate(squeeze_shape) if d == 1]
    else:
        raise MatchFailure(f"{node.label()} has no axes")
    rank = out_rank if node.op_type == "Unsqueeze" else in_rank
    if rank is None:
        raise MatchFailure(f"the rank around {node.label()} is unknown")
    return normalize_axes(raw, rank)


def _n_axes(node: Node, axes_input: Value | None) -> int:
    """How many axes a Squeeze/Unsqueeze names (0 when it names none or they are not constant)."""
    if axes_input is not None:
        return axes_input.const.size if axes_input.const is not None else 0
    return len(node.attr("axes") or ())


def _rank_of(x: Value) -> int:
    if x.rank is None:
        raise MatchFailure(f"the rank of %{x.name} is unknown")
    return x.rank


def _squeeze_unsqueeze_check(ctx: MatchContext, x: Value, sq_axes: Value | None, unsq_axes: Value | None,
                             sq: Node, unsq: Node) -> None:
    r = _rank_of(x)
    a = _axes(sq, sq_axes, r, None, x.shape)
    b = _axes(unsq, unsq_axes, None, r - len(a) + _n_axes(unsq, unsq_axes), None)
    if a != b:
        raise MatchFailure(f"Squeeze axes {a} and Unsqueeze axes {b} differ")
    for i in a:
        d = x.shape[i]  # type: ignore[index]
        if isinstance(d, int) and d != 1:
            raise MatchFailure(f"Squeeze axis {i} of %{x.name} has size {d}, not 1")


def _unsqueeze_squeeze_check(ctx: MatchContext, x: Value, unsq_axes: Value | None, sq_axes: Value | None,
                             unsq: Node, sq: Node) -> None:
    r = _rank_of(x)
    a = _axes(unsq, unsq_axes, None, r + _n_axes(unsq, unsq_axes), None)
    b = _axes(sq, sq_axes, r + len(a), None, unsq.outputs[0].shape)
    if a != b:
        raise MatchFailure(f"Unsqueeze axes {a} and Squeeze axes {b} differ")


def _squeeze_unsqueeze_pattern(op, x, sq_axes, unsq_axes):
    return op.Unsqueeze(op.Squeeze(x, Optional(sq_axes), _name="sq"), Optional(unsq_axes), _name="unsq")


def _unsqueeze_squeeze_pattern(op, x, unsq_axes, sq_axes):
    y = op.Unsqueeze(x, Optional(unsq_axes), _name="unsq")
    return op.Squeeze(y, Optional(sq_axes), _name="sq")


def _axes_const(op, axes: list[int]) -> Value:
    return op.constant(np.array(axes, np.int64))


SQUEEZE_UNSQUEEZE = RewriteRule(
    name="squeeze-unsqueeze",
    description="Unsqueeze(Squeeze(x, axes), axes) with the same normalised axes -> x.",
    pattern=_squeeze_unsqueeze_pattern,
    check=_squeeze_unsqueeze_check,
    rewrite=lambda op, x: x,
    example=lambda: example_graph(
        "squeeze_unsqueeze", {"x": (F32, (2, 1, 4, 1))},
        lambda op, x: op.Relu(op.Unsqueeze(op.Squeeze(x, _axes_const(op, [1, -1])), _axes_const(op, [-1, 1])))),
)

UNSQUEEZE_SQUEEZE = RewriteRule(
    name="unsqueeze-squeeze",
    description="Squeeze(Unsqueeze(x, axes), axes) with the same normalised axes -> x.",
    pattern=_unsqueeze_squeeze_pattern,
    check=_unsqueeze_squeeze_check,
    rewrite=lambda op, x: x,
    example=lambda: example_graph(
        "unsqueeze_squeeze", {"x": (F32, (2, 4))},
        lambda op, x: op.Relu(op.Squeeze(op.Unsqueeze(x, _axes_const(op, [0, -1])), _axes_const(op, [3, 0])))),
)

# =========================================================================== 1-D convs as 2-D
#
# kiln's conv kernels (fusion, the blocked layout, the tuned schedules) are 2-D. A 1-D Conv (audio:
# silero-vad's STFT and encoder, Whisper's stem) runs as a 2-D one of height 1, between an Unsqueeze and
# a Squeeze of that axis; between two such convs, a Squeeze, an elementwise activation and an Unsqueeze
# cancel, so a chain of 1-D convs stays 2-D.


def _axes_op(op, name: str, x: Value, axes: list[int]) -> Value:
    """Squeeze or Unsqueeze of ``axes``: a constant input from opset 13, the attribute before."""
    if op.opset >= 13:
        return getattr(op, name)(x, _axes_const(op, axes))
    return getattr(op, name)(x, axes=axes)


def _conv1d_pattern(op, x, w, b):
    return op.Conv(x, w, Optional(b), _name="conv")


def _conv1d_check(ctx: MatchContext, x: Value, w: Value, b: Value | None, conv: Node) -> None:
    if x.rank != 3 or w.rank != 3:
        raise MatchFailure(f"not a 1-D conv: X is {x.type_str()}, W {w.type_str()}")
    y = conv.outputs[0]
    for v in (x, y):
        length = v.shape[2] if v.rank == 3 else None
        if not isinstance(length, int) and not (isinstance(length, str) and length.isidentifier()):
            # TVM's reshape-as-view analysis (RewriteDataflowReshape) fails outright on the
            # Unsqueeze/Squeeze of a length such as (samples // 5 - 1): it cannot prove the
            # fused extent divisible, and the build stops
            raise MatchFailure(f"%{v.name}'s length {length} is not a size or a plain symbol")


def _conv1d_rewrite(op, x: Value, w: Value, b: Value | None, conv: Node) -> Value:
    attrs = {"group": conv.attr("group", 1)}
    pads = list(conv.attr("pads", ()) or ())
    for name in ("strides", "dilations", "kernel_shape"):
        v = conv.attr(name)
        if v:
            attrs[name] = [1, int(v[0])]  # the height's kernel, stride and dilation: 1
    if pads:
        attrs["pads"] = [0, int(pads[0]), 0, int(pads[1])]
    auto_pad = conv.attr("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", ""):
        attrs["auto_pad"] = auto_pad  # the height: kernel 1, stride 1, so SAME pads it by 0
    w4 = (op.constant(w.numpy()[:, :, None, :], f"{w.name}_2d") if w.is_constant
          else _axes_op(op, "Unsqueeze", w, [2]))
    y = op.Conv(_axes_op(op, "Unsqueeze", x, [2]), w4, b, **attrs)
    return _axes_op(op, "Squeeze", y, [2])


def _conv1d_example() -> Graph:
    rng = np.random.default_rng(0)

    def build(op, x):
        w = op.constant(rng.standard_normal((6, 2, 3)).astype(np.float32))
        bias = op.constant(rng.standard_normal(6).astype(np.float32))
        return op.Relu(op.Conv(op.Relu(op.Conv(x, w, bias, strides=[2], pads=[1, 2], dilations=[2], group=2)),
                               op.constant(rng.standard_normal((4, 6, 1)).astype(np.float32))))

    return example_graph("conv1d", {"x": (F32, (1, 4, 19))}, build)


CONV1D_AS_2D = RewriteRule(
    name="conv1d-as-2d",
    description="A 1-D Conv becomes a 2-D Conv of height 1 between an Unsqueeze and a Squeeze, for kiln's 2-D "
                "conv kernels.",
    pattern=_conv1d_pattern, check=_conv1d_check, rewrite=_conv1d_rewrite, example=_conv1d_example,
)

#: elementwise ops of one input that commute with a Squeeze
_UNARY = ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Softplus",
          "Softsign", "Mish", "Gelu", "Erf", "Abs", "Neg", "Exp", "Sqrt")


def _unary_through_squeeze_rule(act: str) -> RewriteRule:
    def pattern(op, x, sq_axes, unsq_axes):
        y = getattr(op, act)(op.Squeeze(x, Optional(sq_axes), _name="sq"), _name="act")
        return op.Unsqueeze(y, Optional(unsq_axes), _name="unsq")

    def check(ctx, x, sq_axes, unsq_axes, sq, act, unsq) -> None:
        for v in (sq.outputs[0], act.outputs[0]):
            if len(v.users) != 1 or v.is_graph_output:
                raise MatchFailure(f"%{v.name} has readers other than the next op")
        _squeeze_unsqueeze_check(ctx, x, sq_axes, unsq_axes, sq, unsq)

    def rewrite(op, x, sq_axes, unsq_axes, sq, act, unsq):
        return getattr(op, act.op_type)(x, **copy_attrs(act))

    def example():
        return example_graph(f"squeeze_{act.lower()}_unsqueeze", {"x": (F32, (2, 3, 1, 5))},
                             lambda op, x: op.Relu(op.Unsqueeze(getattr(op, act)(op.Squeeze(x, _axes_const(op, [2]))),
                                                                _axes_const(op, [2]))),
                             opset=20 if act == "Gelu" else 18)

    return RewriteRule(f"squeeze-{act.lower()}-unsqueeze", pattern, rewrite, check=check, example=example,
                       description=f"Unsqueeze({act}(Squeeze(x, axes)), axes) -> {act}(x): the activation does not "
                                   "care about the shape (two 1-D convs in a row meet so).")


NOOP_RULES: list[RewriteRule] = [
    IDENTITY, DROPOUT, CAST_SAME, CASTLIKE_SAME, RESHAPE_NOOP, EXPAND_NOOP, TRANSPOSE_IDENTITY, TRANSPOSE_PAIR,
    SQUEEZE_UNSQUEEZE, UNSQUEEZE_SQUEEZE, CONV1D_AS_2D, *(_unary_through_squeeze_rule(a) for a in _UNARY),
]

# =========================================================================== algebraic rules
#
# A condition is ``cond(**bindings) -> None`` that raises MatchFailure with its reason when it
# does not hold; a row's conditions run in order. The factories below name the bindings they read.

Cond = Callable[..., None]


def all_equal(name: str, value: float) -> Cond:
    """Constant ``name`` is ``value`` everywhere."""

    def cond(**b: Value) -> None:
        arr = b[name].numpy()
        if arr.size == 0 or not np.all(arr == value):
            raise MatchFailure(f"constant %{b[name].name} is not all {value:g}")

    return cond


def keeps(x: str, c: str, dtype: bool = True) -> Cond:
    """Broadcasting constant ``c`` against ``x`` leaves x's shape (and dtype) unchanged.

    ``dtype=False`` for Pow, whose exponent may have another type than its base."""
    return lambda **b: _check_keeps(b[x], b[c], dtype)


def same_dtype(x: str, c: str) -> Cond:
    """``c`` has x's dtype (the merged constant keeps it)."""

    def cond(**b: Value) -> None:
        if b[x].dtype is not b[c].dtype:
            raise MatchFailure(f"constant %{b[c].name} is {b[c].dtype} but %{b[x].name} is {b[x].dtype}")

    return cond


def is_float(name: str) -> Cond:
    """``name`` has a float dtype."""

    def cond(**b: Value) -> None:
        dt = b[name].dtype
        if dt is None or not dt.is_float:
            raise MatchFailure(f"%{b[name].name} is {dt}, not a float type")

    return cond


_MAX_MERGED_GROWTH = 1  # a merged constant may not be bigger than the bigger of the two it replaces


def _combine(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], a: Value, b: Value) -> np.ndarray:
    """``fn(a, b)`` in a's dtype: floats computed in float64 and rounded once; integers wrap as ONNX does."""
    dt = a.dtype
    assert dt is not None
    with np.errstate(all="ignore"):
        if dt.is_float:
            out = fn(a.numpy().astype(np.float64), b.numpy().astype(np.float64))
        else:
            out = fn(a.numpy(), b.numpy())
        return np.asarray(out).astype(dt.numpy)


def mergeable(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], c1: str, c2: str) -> Cond:
    """``fn(c1, c2)`` is a finite constant of c1's dtype no bigger than the larger of the two."""

    def cond(**b: Value) -> None:
        a, c = b[c1], b[c2]
        if a.dtype is not c.dtype:
            raise MatchFailure(f"constants %{a.name} ({a.dtype}) and %{c.name} ({c.dtype}) differ in dtype")
        shape = np.broadcast_shapes(a.numpy().shape, c.numpy().shape)
        if int(np.prod(shape)) > _MAX_MERGED_GROWTH * max(a.numpy().size, c.numpy().size):
            raise MatchFailure(f"merging %{a.name} {a.numpy().shape} and %{c.name} {c.numpy().shape} "
                               f"would grow the constant to {shape}")
        if a.dtype is not None and a.dtype.is_float:
            if np.any(c.numpy() == 0) and fn is np.divide:
                raise MatchFailure(f"constant %{c.name} has a zero: dividing by it")
            both_finite = np.all(np.isfinite(a.numpy().astype(np.float64))) and np.all(
                np.isfinite(c.numpy().astype(np.float64)))
            merged = _combine(fn, a, c).astype(np.float64)
            if both_finite and not np.all(np.isfinite(merged)):
                raise MatchFailure(f"merging %{a.name} and %{c.name} overflows {a.dtype}")

    return cond


def reciprocal_ok(name: str) -> Cond:
    """1/c is exact enough: c is finite and non-zero, and 1/c is finite and a normal number."""

    def cond(**b: Value) -> None:
        v = b[name]
        arr = v.numpy().astype(np.float64)
        if np.any(arr == 0):
            raise MatchFailure(f"constant %{v.name} has a zero: x / 0 is not x * (1/0) for x = 0")
        if not np.all(np.isfinite(arr)):
            raise MatchFailure(f"constant %{v.name} is not finite")
        r = _reciprocal(v).astype(np.float64)
        tiny = float(ml_dtypes.finfo(v.dtype.numpy).tiny)  # type: ignore[union-attr]
        if not np.all(np.isfinite(r)) or np.any(np.abs(r) < tiny):
            raise MatchFailure(f"the reciprocal of %{v.name} is not a finite normal {v.dtype} number")

    return cond


def _reciprocal(c: Value) -> np.ndarray:
    with np.errstate(all="ignore"):
        return (1.0 / c.numpy().astype(np.float64)).astype(c.dtype.numpy)  # type: ignore[union-attr]


class Alg(NamedTuple):
    """One algebraic identity, a whole rule: ``pattern`` -> ``replacement`` when every condition holds.

    ``example(op, x)`` builds, for x: f32[2,3,4], a graph the rule must fire on.
    """

    name: str
    pattern: Callable[..., Any]
    conditions: tuple[Cond, ...]
    replacement: Callable[..., Any]
    description: str
    example: Callable[..., Any]
    priority: int = 0


def _merged(op, fn: Callable[[np.ndarray, np.ndarray], np.ndarray], c1: Value, c2: Value) -> Value:
    """A new constant ``fn(c1, c2)`` in c1's dtype, broadcast to both shapes."""
    return op.constant(_combine(fn, c1, c2), f"{c1.name}_{fn.__name__}")


def _f32(v: float | list) -> np.ndarray:
    return np.asarray(v, np.float32)


ONE, ZERO, TWO = all_equal("c", 1), all_equal("c", 0), all_equal("c", 2)
KEEP, KEEP_POW, FLOAT = keeps("x", "c"), keeps("x", "c", dtype=False), is_float("x")
SAME, SAME1, RECIP = same_dtype("x", "c"), same_dtype("x", "c1"), reciprocal_ok("c")
MERGE_MUL, MERGE_ADD, MERGE_DIV = (mergeable(fn, "c1", "c2") for fn in (np.multiply, np.add, np.divide))

# fmt: off
ALGEBRA_TABLE: list[Alg] = [
    # name, pattern, conditions, replacement,
    #     description,
    #     example (x: f32[2,3,4]), priority
    Alg("mul-by-one",       lambda op, x, c=Const(): op.Mul(x, c),             (ONE, KEEP),            lambda op, x: x,
        "x * 1 -> x, when the 1 does not enlarge x (also 1 * x)",
        lambda op, x: op.Relu(op.Mul(op.constant(_f32([1, 1, 1, 1])), x))),
    Alg("add-zero",         lambda op, x, c=Const(): op.Add(x, c),             (ZERO, KEEP),           lambda op, x: x,
        "x + 0 -> x, when the 0 does not enlarge x (-0.0 + 0 is +0.0, equal under comparison)",
        lambda op, x: op.Relu(op.Add(x, op.constant(_f32(0))))),
    Alg("sub-zero",         lambda op, x, c=Const(): op.Sub(x, c),             (ZERO, KEEP),           lambda op, x: x,
        "x - 0 -> x, when the 0 does not enlarge x",
        lambda op, x: op.Relu(op.Sub(x, op.constant(_f32([[0], [0], [0]]))))),
    Alg("div-by-one",       lambda op, x, c=Const(): op.Div(x, c),             (ONE, KEEP),            lambda op, x: x,
        "x / 1 -> x, when the 1 does not enlarge x",
        lambda op, x: op.Relu(op.Div(x, op.constant(_f32([1])))), 1),
    Alg("pow-one",          lambda op, x, c=Const(): op.Pow(x, c),             (ONE, KEEP_POW),        lambda op, x: x,
        "Pow(x, 1) -> x, when the exponent does not enlarge x",
        lambda op, x: op.Relu(op.Pow(x, op.constant(_f32(1))))),
    Alg("pow-two",          lambda op, x, c=Const(): op.Pow(x, c),             (TWO, KEEP_POW, FLOAT), lambda op, x: op.Mul(x, x),
        "Pow(x, 2) -> x * x for float x",
        lambda op, x: op.Pow(x, op.constant(np.array(2, np.int64)))),
    Alg("neg-neg",          lambda op, x: op.Neg(op.Neg(x)),                   (),                     lambda op, x: x,
        "Neg(Neg(x)) -> x",
        lambda op, x: op.Relu(op.Neg(op.Neg(x)))),
    Alg("mul-mul-const",    lambda op, x, c1=Const(), c2=Const(): op.Mul(op.Mul(x, c1), c2), (SAME1, MERGE_MUL),
        lambda op, x, c1, c2: op.Mul(x, _merged(op, np.multiply, c1, c2)),
        "(x * c1) * c2 -> x * (c1*c2); reassociation rounds differently, verified at rtol 1e-5",
        lambda op, x: op.Mul(op.constant(_f32([0.5, 2, 3, -1])), op.Mul(x, op.constant(_f32(1.5))))),
    Alg("add-add-const",    lambda op, x, c1=Const(), c2=Const(): op.Add(op.Add(x, c1), c2), (SAME1, MERGE_ADD),
        lambda op, x, c1, c2: op.Add(x, _merged(op, np.add, c1, c2)),
        "(x + c1) + c2 -> x + (c1+c2); reassociation rounds differently, verified at rtol 1e-5",
        lambda op, x: op.Add(op.Add(x, op.constant(_f32([0.25, 1, -2, 0]))), op.constant(_f32(0.5)))),
    Alg("mul-div-const",    lambda op, x, c1=Const(), c2=Const(): op.Div(op.Mul(x, c1), c2), (FLOAT, SAME1, MERGE_DIV),
        lambda op, x, c1, c2: op.Mul(x, _merged(op, np.divide, c1, c2)),
        "(x * c1) / c2 -> x * (c1/c2) for float x; rounds differently, verified at rtol 1e-5",
        lambda op, x: op.Div(op.Mul(x, op.constant(_f32([3, 1, 7, 0.1]))), op.constant(_f32(3))), 1),
    Alg("div-const-to-mul", lambda op, x, c=Const(): op.Div(x, c),             (FLOAT, SAME, RECIP),
        lambda op, x, c: op.Mul(x, op.constant(_reciprocal(c), f"{c.name}_recip")),
        "x / c -> x * (1/c) for float c (finite, non-zero, with a normal reciprocal); about 1 ulp from the "
        "division, verified at rtol 1e-5",
        lambda op, x: op.Div(x, op.constant(_f32([3, -7, 0.1, 1e3])))),
]
# fmt: on


def _rule_from_row(row: Alg) -> RewriteRule:
    def check(ctx: MatchContext, **b: Any) -> None:
        for cond in row.conditions:
            cond(**b)

    check.__name__ = f"check_{row.name.replace('-', '_')}"

    def example() -> Graph:
        return example_graph(row.name, {"x": (F32, (2, 3, 4))}, row.example)

    return RewriteRule(name=row.name, pattern=row.pattern, rewrite=row.replacement, check=check, example=example,
                       description=row.description, priority=row.priority)


ALGEBRA_RULES: list[RewriteRule] = [_rule_from_row(row) for row in ALGEBRA_TABLE]

register_rule_set("simplify", [*NOOP_RULES, *ALGEBRA_RULES])

__all__ = ["ALGEBRA_RULES", "ALGEBRA_TABLE", "NOOP_RULES", "Alg"]
