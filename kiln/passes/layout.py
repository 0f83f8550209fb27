"""Layout: convolutions in a blocked layout, NCHW[b]c, with weights pre-packed at compile time.

A CPU conv kernel keeps ``b`` output channels in one vector register (b = 16 float32 lanes
for AVX-512, 8 for AVX2), so activations are stored ``[N, C/b, H, W, b]`` and weights
``[O/b, I/b, kh, kw, b, b]``. This pass rewrites each eligible ``Conv``/``kiln::FusedConv``
into ``kiln::BlockedConv`` between ``kiln::ToBlocked`` and ``kiln::FromBlocked``, then moves
the transforms out of the way, so that only the boundaries of the blocked region pay one:

- ``conv-blocked``, ``fused-conv-blocked``: the conv becomes BlockedConv. Its weight is
  packed by a Reshape and a Transpose of the constant, which ``fold-constants`` folds;
- ``blocked-<op>``: an elementwise op reading ``FromBlocked(t)`` (unary, or binary with a
  scalar constant or another ``FromBlocked`` of the same shape) runs on ``t`` instead;
- ``unblock-reblock``: ``ToBlocked(FromBlocked(t))`` with the same block is ``t``.

Eligible convs are 2-D, float32, with a static channel count: group 1 with the output
channels a multiple of ``b`` (the input channels too, or fewer than ``b``, as in an RGB
stem, which then form one block), or depthwise (group = C = O, a multiple of ``b``).
Others stay in NCHW, with transforms around them where a blocked neighbour needs one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from kiln.ir import DType, Graph, Node, Value
from kiln.passes.manager import Pass, PassResult, register_pass
from kiln.passes.pattern import Const, MatchResult, Optional, Var, copy_attrs
from kiln.passes.rules import MatchContext, RewriteRule, apply_rules, example_graph, register_rule

DEFAULT_BLOCK = 16

#: Elementwise ops whose result does not depend on where an element sits: they run on blocked data.
UNARY_OPS = ("Relu", "Sigmoid", "Tanh", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Exp", "Abs", "Neg", "Sqrt",
             "Erf", "Elu", "Selu", "Softplus")
BINARY_OPS = ("Add", "Sub", "Mul", "Div", "Max", "Min")


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


# --------------------------------------------------------------------------- convs


def conv_blocks(node: Node, x: Value, w: Value, block: int) -> tuple[int, int] | str:
    """(input block, output block) for a conv the pass can block, else the reason it cannot."""
    if x.dtype != DType.FLOAT32:
        return f"the input is {x.dtype}, not float32"
    if x.shape is None or len(x.shape) != 4 or w.shape is None or len(w.shape) != 4:
        return "only 2-D convs are blocked"
    if node.attr("auto_pad", "NOTSET") not in ("NOTSET", ""):
        return "the conv uses auto_pad"
    c_in, c_out, group = x.shape[1], w.shape[0], node.attr("group", 1)
    if not isinstance(c_in, int):
        return "the input channel count is not static"
    if c_out % block:
        return f"{c_out} output channels are not a multiple of the block {block}"
    if group == 1:
        if c_in % block == 0:
            return block, block
        if c_in < block:
            return c_in, block
        return f"{c_in} input channels are neither a multiple of the block {block} nor fewer"
    if group == c_in == c_out:
        return block, block
    return f"grouped conv (group {group}) that is not depthwise"


def _pack_weight(op, w: Value, bi: int, bo: int, depthwise: bool) -> Value:
    """``[O, I, kh, kw]`` -> ``[O/bo, I/bi', kh, kw, bi', bo]`` as Reshape + Transpose (folded later)."""
    o, i, kh, kw = w.shape
    bi = 1 if depthwise else bi
    shape = op.constant(np.array([o // bo, bo, i // bi, bi, kh, kw], np.int64), "packed_shape")
    return op.Transpose(op.Reshape(w, shape), perm=[0, 2, 4, 5, 3, 1])


def _conv_rule(core: str, block: int) -> RewriteRule:
    def pattern(op, x, w):
        if core == "conv":
            return op.Conv(x, Const("w"), Optional(Const("b")), _name="conv")
        return op.kiln.FusedConv(x, Const("w"), Optional(Const("b")), Optional(Var("z")), _name="conv")

    def check(ctx: MatchContext, x: Value, w: Value, conv: Node) -> MatchResult:
        blocks = conv_blocks(conv, x, w, block)
        return MatchResult.fail(blocks) if isinstance(blocks, str) else MatchResult.ok()

    def rewrite(op, x, w, conv, b=None, z=None):
        bi, bo = conv_blocks(conv, x, w, block)  # type: ignore[misc]
        depthwise = conv.attr("group", 1) != 1
        attrs = copy_attrs(conv, "auto_pad")
        attrs.setdefault("kernel_shape", list(w.shape[2:]))
        xb = op.kiln.ToBlocked(x, block=bi)
        zb = op.kiln.ToBlocked(z, block=bo) if z is not None else None
        y = op.kiln.BlockedConv(xb, _pack_weight(op, w, bi, bo, depthwise), b, zb, **attrs)
        return op.kiln.FromBlocked(y)

    def example() -> Graph:
        rng = _rng()

        def build(op, x, *rest):
            w = op.constant(rng.standard_normal((32, 16, 3, 3)).astype(np.float32) * 0.2)
            b = op.constant(rng.standard_normal(32).astype(np.float32))
            if core == "conv":
                return op.Conv(x, w, b, pads=[1, 1, 1, 1], strides=[2, 2])
            return op.kiln.FusedConv(x, w, b, rest[0], pads=[1, 1, 1, 1], kernel_shape=[3, 3], activation="Relu")

        inputs = {"x": (DType.FLOAT32, (1, 16, 6, 6))}
        if core == "fused-conv":
            inputs["z"] = (DType.FLOAT32, (1, 32, 6, 6))
        return example_graph(f"{core}_blocked", inputs, build)

    return RewriteRule(f"{core}-blocked", pattern, rewrite, check=check, example=example, rtol=1e-4, atol=1e-5,
                       description=f"A {core.replace('-', ' ')} in NCHW becomes kiln::BlockedConv in NCHW{block}c "
                                   "with its weight packed at compile time.")


# --------------------------------------------------------------------------- moving transforms


def _blocked_source(v: Value) -> Value | None:
    """``t`` if ``v`` is ``FromBlocked(t)``, else None."""
    p = v.producer
    return p.input(0) if p is not None and p.domain == "kiln" and p.op_type == "FromBlocked" else None


def _from_blocked_check(ctx: MatchContext, x: Value) -> MatchResult:
    if _blocked_source(x) is None:
        return MatchResult.fail(f"%{x.name} is not unblocked by kiln::FromBlocked")
    return MatchResult.ok()


# The FromBlocked stays where it is for its other readers, so it is checked, not matched: a
# pattern would claim it as part of the match.
def _blocked_unary_rule(op_type: str) -> RewriteRule:
    def pattern(op, x):
        return getattr(op, op_type)(x, Optional(Const("lo")), Optional(Const("hi")), _name="act")

    def rewrite(op, x, act, lo=None, hi=None):
        inputs = [_blocked_source(x)] + ([lo, hi] if lo is not None or hi is not None else [])
        return op.kiln.FromBlocked(getattr(op, op_type)(*inputs, **copy_attrs(act)))

    def example() -> Graph:
        def build(op, x):
            y = op.kiln.FromBlocked(op.kiln.ToBlocked(x, block=4))
            if op_type == "Clip":
                return op.Clip(y, op.constant(np.array(-0.5, np.float32)), op.constant(np.array(0.5, np.float32)))
            return getattr(op, op_type)(y)

        return example_graph(f"blocked_{op_type.lower()}", {"x": (DType.FLOAT32, (1, 8, 3, 3))}, build)

    return RewriteRule(f"blocked-{op_type.lower()}", pattern, rewrite, check=_from_blocked_check, example=example,
                       description=f"{op_type} runs on blocked data: the unblocking moves after it.")


def _blocked_binary_rule(op_type: str) -> RewriteRule:
    def pattern(op, x, other):
        return getattr(op, op_type)(x, other, _name="binary")

    def check(ctx: MatchContext, x: Value, other: Value) -> MatchResult:
        t = _blocked_source(x)
        if t is None:
            return MatchResult.fail(f"%{x.name} is not unblocked by kiln::FromBlocked")
        partner = _blocked_source(other)
        if partner is not None and partner.shape == t.shape and t.shape is not None:
            return MatchResult.ok()
        if other.is_constant and other.numpy().size == 1:
            return MatchResult.ok()
        return MatchResult.fail(f"the other operand %{other.name} is neither a scalar constant nor "
                                "unblocked from the same blocked shape")

    def rewrite(op, x, other, binary):
        t = _blocked_source(x)
        partner = _blocked_source(other)
        rhs = partner if partner is not None and partner.shape == t.shape else other
        return op.kiln.FromBlocked(getattr(op, op_type)(t, rhs))

    def example() -> Graph:
        def build(op, x, y):
            xb = op.kiln.FromBlocked(op.kiln.ToBlocked(x, block=4))
            yb = op.kiln.FromBlocked(op.kiln.ToBlocked(y, block=4))
            return [getattr(op, op_type)(xb, yb), getattr(op, op_type)(xb, op.constant(np.array(1.5, np.float32)))]

        shape = (DType.FLOAT32, (1, 8, 3, 3))
        return example_graph(f"blocked_{op_type.lower()}", {"x": shape, "y": shape}, build)

    return RewriteRule(f"blocked-{op_type.lower()}", pattern, rewrite, check=check, example=example,
                       description=f"{op_type} of blocked data (with a scalar, or another blocked tensor of the same "
                                   "shape) runs blocked.")


def _unblock_reblock_pattern(op, t):
    return op.kiln.ToBlocked(op.kiln.FromBlocked(t), _name="reblock")


def _unblock_reblock_check(ctx: MatchContext, t: Value, reblock: Node) -> MatchResult:
    if t.shape is None or t.shape[-1] != reblock.attr("block", DEFAULT_BLOCK):
        return MatchResult.fail(f"blocked as {t.shape[-1] if t.shape else '?'} lanes, reblocked as "
                                f"{reblock.attr('block', DEFAULT_BLOCK)}")
    return MatchResult.ok()


def _unblock_reblock_example() -> Graph:
    def build(op, x):
        y = op.Relu(op.kiln.FromBlocked(op.kiln.ToBlocked(x, block=4)))  # keeps the outer pair
        return op.kiln.FromBlocked(op.kiln.ToBlocked(op.kiln.FromBlocked(op.kiln.ToBlocked(y, block=4)), block=4))

    return example_graph("unblock_reblock", {"x": (DType.FLOAT32, (1, 8, 3, 3))}, build)


UNBLOCK_REBLOCK = RewriteRule(
    "unblock-reblock", _unblock_reblock_pattern, lambda op, t, reblock: t, check=_unblock_reblock_check,
    example=_unblock_reblock_example, description="Blocking what was just unblocked, with the same block, is a no-op.",
)

MOVE_RULES = [UNBLOCK_REBLOCK, *(_blocked_unary_rule(o) for o in UNARY_OPS),
              *(_blocked_binary_rule(o) for o in BINARY_OPS)]


def layout_rules(block: int) -> list[RewriteRule]:
    """The layout rules for a block size (lanes per vector)."""
    return [_conv_rule("conv", block), _conv_rule("fused-conv", block), *MOVE_RULES]


@functools.lru_cache(maxsize=None)
def _rules_for(block: int) -> list[RewriteRule]:
    return layout_rules(block)


RULES = layout_rules(DEFAULT_BLOCK)
for _rule in RULES:
    register_rule(_rule)


@register_pass
@dataclass
class Layout(Pass):
    """Blocks convs as NCHW[block]c and moves the layout transforms to the region's edges."""

    name = "layout"
    block: int = DEFAULT_BLOCK

    def run(self, graph: Graph) -> PassResult:
        stats = apply_rules(graph, RULES if self.block == DEFAULT_BLOCK else _rules_for(self.block))
        return PassResult.of(graph, sum(stats.fired.values()), dict(stats.fired))
