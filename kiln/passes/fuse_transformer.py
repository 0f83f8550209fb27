"""Transformer fusions: LayerNorm and GELU from their decomposed forms, and attention.

- ``layernorm``, ``layernorm-square``: ``ReduceMean / Sub / Pow 2 (or d·d) / ReduceMean / Add eps /
  Sqrt / Div / Mul γ / Add β`` (as Paddle and PyTorch export it) becomes ``LayerNormalization``
  at opset 17+, else ``kiln::LayerNorm``;
- ``gelu-erf`` (and ``-half-first``, ``-half-inner``, ``-scaled`` variants): ``x · ½ · (1 + erf(x / √2))``
  with the ½ in any of the three places, with ``x / √2`` or ``x · (1/√2)``, and ``gelu-tanh``: GPT-2's ``½x(1 + tanh(√(2/π)(x + 0.044715x³)))``, become ``Gelu``
  at opset 20+, else ``kiln::Gelu``;
- ``attention-scaled-q``, ``attention-scaled-scores``, ``attention-masked``, ``attention-unscaled[-masked]``:
  ``Q·Kt`` with a constant scale on Q or on the scores (or none: Whisper scales Q's projection), an
  optional additive mask, a last-axis Softmax and a MatMul by V, become ``kiln::Attention``; so does PyTorch's exported SDPA
  (``attention-sdpa[-masked]``: the scale split between Q and Kt, NaN rows zeroed).
"""

from __future__ import annotations

import math

import numpy as np

from kiln.ir import DType, Node, Value, const_ints, normalize_axes, normalize_axis
from kiln.passes.pattern import Const, MatchContext, MatchFailure, Optional
from kiln.passes.rules import RewriteRule, example_graph, register_rule_set


def _scalar(v: Value | None) -> float | None:
    if v is None or not v.is_constant or v.numpy().size != 1:
        return None
    return float(v.numpy().reshape(()))


def _check_is(v: Value, want: float, label: str, rtol: float = 1e-5) -> None:
    """``v`` is a scalar constant close to ``want``; else MatchFailure naming it by ``label``."""
    got = _scalar(v)
    if got is None:
        raise MatchFailure(f"the {label} %{v.name} is not a scalar constant")
    if not math.isclose(got, want, rel_tol=rtol, abs_tol=1e-7):
        raise MatchFailure(f"the {label} is {got:.7g}, not {want:.7g}")


def _check_scalar(v: Value, what: str) -> float:
    """``v``'s value when it is a scalar constant; else MatchFailure saying ``what`` is not one."""
    got = _scalar(v)
    if got is None:
        raise MatchFailure(f"{what} is not a scalar constant")
    return got


# --------------------------------------------------------------------------- LayerNorm


def _layernorm(op, x, square, gamma, beta, eps, axes1, axes2):
    """The decomposed LayerNorm, with the deviation squared by ``square(d)``."""
    mean = op.ReduceMean(x, Optional(axes1), _name="mean1")
    d = op.Sub(x, mean)
    var = op.ReduceMean(square(d), Optional(axes2), _name="mean2")
    std = op.Sqrt(op.Add(var, eps))
    return op.Add(op.Mul(op.Div(d, std), gamma), beta)


def _ln_pow_pattern(op, x, gamma=Const(), beta=Const(), eps=Const(), axes1=Const(), axes2=Const(), two=Const()):
    return _layernorm(op, x, lambda d: op.Pow(d, two), gamma, beta, eps, axes1, axes2)


def _ln_square_pattern(op, x, gamma=Const(), beta=Const(), eps=Const(), axes1=Const(), axes2=Const()):
    return _layernorm(op, x, lambda d: op.Mul(d, d), gamma, beta, eps, axes1, axes2)


def _reduced_axes(node: Node, axes_input: Value | None, rank: int) -> list[int] | None:
    axes = const_ints(axes_input) if axes_input is not None else node.attr("axes")
    return None if axes is None else normalize_axes(axes, rank)


def _ln_check(ctx: MatchContext, x, eps, gamma, beta, axes1, axes2, mean1, mean2, two=None) -> None:
    if x.shape is None:
        raise MatchFailure("the input's rank is unknown")
    rank = len(x.shape)
    a1, a2 = _reduced_axes(mean1, axes1, rank), _reduced_axes(mean2, axes2, rank)
    if a1 is None or a1 != a2:
        raise MatchFailure(f"the two ReduceMeans reduce different axes ({a1} vs {a2})")
    if a1 != list(range(a1[0], rank)):
        raise MatchFailure(f"the reduced axes {a1} are not the trailing axes")
    if mean1.attr("keepdims", 1) != 1 or mean2.attr("keepdims", 1) != 1:
        raise MatchFailure("a ReduceMean drops the reduced axes (keepdims=0)")
    norm = x.shape[a1[0]:]
    if not all(isinstance(d, int) for d in norm):
        raise MatchFailure(f"the normalised dims {list(norm)} are not static")
    for label, v in (("scale", gamma), ("bias", beta)):
        try:
            np.broadcast_to(v.numpy(), tuple(norm))  # type: ignore[arg-type]
        except ValueError:
            raise MatchFailure(f"the {label} {v.type_str()} does not broadcast to the normalised dims "
                               f"{list(norm)}") from None
        if v.numpy().ndim > len(norm):
            raise MatchFailure(f"the {label} {v.type_str()} has more dims than the normalised ones")
    if two is not None:
        _check_is(two, 2.0, "exponent")
    _check_scalar(eps, "epsilon")


def _ln_rewrite(op, x, eps, gamma, beta, axes1, mean1):
    rank = len(x.shape)
    first = _reduced_axes(mean1, axes1, rank)[0]
    norm = tuple(x.shape[first:])
    dt = x.dtype.numpy
    scale = op.constant(np.broadcast_to(gamma.numpy(), norm).astype(dt), "ln_scale")
    bias = op.constant(np.broadcast_to(beta.numpy(), norm).astype(dt), "ln_bias")
    attrs = {"axis": first - rank, "epsilon": _scalar(eps)}
    if op.opset >= 17:
        return op.LayerNormalization(x, scale, bias, **attrs)
    return op.kiln.LayerNorm(x, scale, bias, **attrs)


def _ln_example(opset: int, square: str = "pow"):
    def make():
        rng = np.random.default_rng(0)

        def build(op, x):
            mean = op.ReduceMean(x, axes=[-1]) if opset < 18 else op.ReduceMean(x, op.constant(np.array([-1])))
            d = op.Sub(x, mean)
            p = op.Pow(d, op.constant(np.float32(2.0))) if square == "pow" else op.Mul(d, d)
            var = op.ReduceMean(p, axes=[-1]) if opset < 18 else op.ReduceMean(p, op.constant(np.array([-1])))
            n = op.Div(d, op.Sqrt(op.Add(var, op.constant(np.float32(1e-5)))))
            return op.Add(op.Mul(n, op.constant(rng.uniform(0.5, 1.5, 8).astype(np.float32))),
                          op.constant(rng.uniform(-0.5, 0.5, 8).astype(np.float32)))

        return example_graph(f"layernorm_{opset}", {"x": (DType.FLOAT32, (2, 5, 8))}, build, opset=opset)

    return make


LAYERNORM = RewriteRule(
    "layernorm", _ln_pow_pattern, _ln_rewrite, check=_ln_check, example=_ln_example(12),
    description="Decomposed layer normalisation becomes LayerNormalization (opset 17+) or kiln::LayerNorm.",
)
LAYERNORM_SQUARE = RewriteRule(
    "layernorm-square", _ln_square_pattern, _ln_rewrite, check=_ln_check, example=_ln_example(18, "mul"),
    description="The same, with the deviation squared as d * d (and ReduceMean axes as an input, opset 18+).",
)


# --------------------------------------------------------------------------- GELU


def _gelu_rewrite(op, x, tanh_form: bool = False):
    approximate = "tanh" if tanh_form else "none"
    if op.opset >= 20:
        return op.Gelu(x, approximate=approximate)
    return op.kiln.Gelu(x, approximate=approximate)


#: where a GELU's ½ goes: last, (x·φ)·½; first, (x·½)·φ; inner, x·(½·φ) (torch's dynamo export), with φ = 1 + erf(x/√2)
_HALF = ("last", "first", "inner")


def _gelu_erf(op, x, arg, one, half, where: str):
    """x·½·(1 + erf(arg)), with the ½ applied where ``where`` says (see :data:`_HALF`)."""
    phi2 = op.Add(op.Erf(arg), one)  # 1 + erf(x / sqrt 2)
    if where == "first":
        return op.Mul(op.Mul(x, half), phi2)
    if where == "inner":
        return op.Mul(x, op.Mul(half, phi2))
    return op.Mul(op.Mul(x, phi2), half)


def _gelu_erf_pattern_for(where: str, scaled: bool):
    """x·½·(1 + erf(x/√2)), with the ½ applied where ``where`` says, and x/√2 written as x·(1/√2) or not."""
    if scaled:
        def pattern(op, x, inv_root2=Const(), one=Const(), half=Const()):
            return _gelu_erf(op, x, op.Mul(x, inv_root2), one, half, where)
    else:
        def pattern(op, x, root2=Const(), one=Const(), half=Const()):
            return _gelu_erf(op, x, op.Div(x, root2), one, half, where)
    return pattern


def _gelu_erf_check(ctx, one, half, root2=None, inv_root2=None) -> None:
    if root2 is not None:
        _check_is(root2, math.sqrt(2), "divisor")
    else:
        _check_is(inv_root2, 1 / math.sqrt(2), "factor 1/sqrt 2")
    _check_is(one, 1.0, "added constant")
    _check_is(half, 0.5, "factor")


def _gelu_example(form: str, opset: int = 17, scaled: bool = False):
    def make():
        def build(op, x):
            c = lambda v: op.constant(np.float32(v))  # noqa: E731
            if form == "tanh":
                inner = op.Mul(c(math.sqrt(2 / math.pi)), op.Add(x, op.Mul(c(0.044715), op.Pow(x, c(3.0)))))
                return op.Mul(op.Mul(c(0.5), x), op.Add(c(1.0), op.Tanh(inner)))
            arg = op.Mul(x, c(1 / math.sqrt(2))) if scaled else op.Div(x, c(math.sqrt(2)))
            phi2 = op.Add(op.Erf(arg), c(1.0))
            if form == "half-first":
                return op.Mul(op.Mul(x, c(0.5)), phi2)
            if form == "half-inner":
                return op.Mul(x, op.Mul(c(0.5), phi2))
            return op.Mul(op.Mul(x, phi2), c(0.5))

        return example_graph(f"gelu_{form}", {"x": (DType.FLOAT32, (3, 16))}, build, opset=opset)

    return make


_GELU_TEXT = {"last": ("x * (1 + erf(x", " * 0.5"), "first": ("(x * 0.5) * (1 + erf(x", ""),
              "inner": ("x * (0.5 * (1 + erf(x", ")")}

GELU_ERF_RULES = [
    RewriteRule(
        f"gelu-erf{'' if where == 'last' else '-half-' + where}{'-scaled' if scaled else ''}",
        _gelu_erf_pattern_for(where, scaled), lambda op, x: _gelu_rewrite(op, x), check=_gelu_erf_check,
        example=_gelu_example("erf" if where == "last" else "half-" + where, opset=20 if where == "first" else 17,
                              scaled=scaled),
        description=_GELU_TEXT[where][0] + (" * (1/sqrt 2)))" if scaled else " / sqrt 2))") + _GELU_TEXT[where][1]
        + " becomes Gelu.",
    )
    for where in _HALF for scaled in (False, True)
]


def _gelu_tanh_pattern(op, x, three=Const(), k=Const(), c=Const(), half=Const(), one=Const()):
    cube = op.Pow(x, three)
    inner = op.Mul(k, op.Add(x, op.Mul(c, cube)))
    return op.Mul(op.Mul(half, x), op.Add(one, op.Tanh(inner)))


def _gelu_tanh_check(ctx, three, k, c, half, one) -> None:
    _check_is(three, 3.0, "exponent")
    _check_is(k, math.sqrt(2 / math.pi), "factor sqrt(2/pi)", 1e-4)
    _check_is(c, 0.044715, "cubic coefficient", 1e-4)
    _check_is(half, 0.5, "factor")
    _check_is(one, 1.0, "added constant")


GELU_TANH = RewriteRule(
    "gelu-tanh", _gelu_tanh_pattern, lambda op, x: _gelu_rewrite(op, x, tanh_form=True), check=_gelu_tanh_check,
    example=_gelu_example("tanh"), description="GPT-2's tanh-approximated GELU becomes Gelu(approximate='tanh').",
)


# --------------------------------------------------------------------------- attention


def _check_softmax_last_axis(sm: Node) -> None:
    x = sm.input(0)
    rank = x.rank if x is not None else None
    opset = sm.graph.model_opset.get("", 13) if sm.graph else 13
    axis = sm.attr("axis", -1 if opset >= 13 else 1)
    if rank is None:
        raise MatchFailure("the scores' rank is unknown")
    if normalize_axis(axis, rank) != rank - 1:
        raise MatchFailure(f"Softmax normalises axis {axis}, not the last axis of rank {rank}")


def _attention(op, scores, v, mask):
    """Softmax(scores [+ mask]) @ v: the tail every attention pattern shares."""
    return op.MatMul(op.Softmax(scores if mask is None else op.Add(scores, mask), _name="softmax"), v)


def _attention_rule(name: str, variant: str) -> RewriteRule:
    """One attention form: ``scaled-q``, ``scaled-scores[-div]`` and ``scaled-scores-masked`` carry a
    constant scale ``s``; ``unscaled[-masked]`` have none (Whisper scales Q's projection, before the
    heads are split), so the fused scale is 1."""
    scaled = variant.startswith("scaled")

    def scores(op, q, kt, s):
        if not scaled:
            return op.MatMul(q, kt)
        if variant == "scaled-q":
            return op.MatMul(op.Mul(q, s), kt)
        if variant == "scaled-scores-div":
            return op.Div(op.MatMul(q, kt), s)
        return op.Mul(op.MatMul(q, kt), s)

    if variant.endswith("masked") and scaled:
        def pattern(op, q, kt, v, mask, s=Const()):
            return _attention(op, scores(op, q, kt, s), v, mask)
    elif scaled:
        def pattern(op, q, kt, v, s=Const()):
            return _attention(op, scores(op, q, kt, s), v, None)
    elif variant.endswith("masked"):
        def pattern(op, q, kt, v, mask):
            return _attention(op, scores(op, q, kt, None), v, mask)
    else:
        def pattern(op, q, kt, v):
            return _attention(op, scores(op, q, kt, None), v, None)

    def check(ctx, softmax, q, kt, v, s=None, mask=None) -> None:
        if scaled:
            scale = _check_scalar(s, f"the scale %{s.name}")
            if variant == "scaled-scores-div" and scale == 0:
                raise MatchFailure("the scores are divided by zero")
        _check_softmax_last_axis(softmax)

    def rewrite(op, q, kt, v, s=None, mask=None):
        scale = _scalar(s) if scaled else 1.0
        scale = 1.0 / scale if variant == "scaled-scores-div" else scale
        return op.kiln.Attention(q, kt, v, mask, scale=scale)

    def example():
        rng = np.random.default_rng(0)

        def build(op, q, k, v, *mask):
            kt = op.Transpose(k, perm=[0, 1, 3, 2])
            c = op.constant(np.float32(0.125 if variant != "scaled-scores-div" else 8.0))
            if variant == "scaled-q":
                sc = op.MatMul(op.Mul(q, c), kt)
            elif variant == "scaled-scores-div":
                sc = op.Div(op.MatMul(q, kt), c)
            elif scaled:
                sc = op.Mul(op.MatMul(q, kt), c)
            else:
                sc = op.MatMul(q, kt)
            if mask:
                sc = op.Add(sc, mask[0])
            return op.MatMul(op.Softmax(sc, axis=-1), v)

        shape = (1, 2, 5, 8)
        inputs = {n: (DType.FLOAT32, shape) for n in ("q", "k", "v")}
        if variant.endswith("masked"):
            inputs["mask"] = (DType.FLOAT32, (1, 1, 5, 5))
        del rng
        return example_graph(f"attention_{variant}", inputs, build, opset=13)

    return RewriteRule(f"attention-{name}", pattern, rewrite, check=check, example=example,
                       description=f"Scaled dot-product attention ({variant.replace('-', ' ')}) becomes kiln::Attention.")


def _sdpa_rule(masked: bool) -> RewriteRule:
    """PyTorch's exported SDPA: (Q·c)@(Kt·c) [+ mask], Softmax, NaN rows zeroed, @V."""

    def sdpa(op, q, kt, v, mask, cq, ck, zero):
        scores = op.MatMul(op.Mul(q, cq), op.Mul(kt, ck))
        p = op.Softmax(scores if mask is None else op.Add(scores, mask), _name="softmax")
        return op.MatMul(op.Where(op.IsNaN(p), zero, p), v)

    if masked:
        def pattern(op, q, kt, v, mask, cq=Const(), ck=Const(), zero=Const()):
            return sdpa(op, q, kt, v, mask, cq, ck, zero)
    else:
        def pattern(op, q, kt, v, cq=Const(), ck=Const(), zero=Const()):
            return sdpa(op, q, kt, v, None, cq, ck, zero)

    def check(ctx, cq, ck, zero, softmax) -> None:
        for label, c in (("scale on Q", cq), ("scale on K", ck)):
            _check_scalar(c, f"the {label} %{c.name}")
        _check_is(zero, 0.0, "NaN replacement")
        _check_softmax_last_axis(softmax)

    def rewrite(op, q, kt, v, cq, ck, mask=None):
        return op.kiln.Attention(q, kt, v, mask, scale=_scalar(cq) * _scalar(ck), nan_to_zero=1)

    def example():
        def build(op, q, k, v, *mask):
            c = op.constant(np.float32(8 ** -0.25))
            sc = op.MatMul(op.Mul(q, c), op.Mul(op.Transpose(k, perm=[0, 1, 3, 2]), c))
            if mask:
                sc = op.Add(sc, mask[0])
            p = op.Softmax(sc, axis=-1)
            return op.MatMul(op.Where(op.IsNaN(p), op.constant(np.float32(0)), p), v)

        inputs = {n: (DType.FLOAT32, (1, 2, 5, 8)) for n in ("q", "k", "v")}
        if masked:
            inputs["mask"] = (DType.FLOAT32, (1, 1, 5, 5))
        return example_graph(f"sdpa{'_masked' if masked else ''}", inputs, build, opset=17)

    return RewriteRule(f"attention-sdpa{'-masked' if masked else ''}", pattern, rewrite, check=check, example=example,
                       description="PyTorch's exported scaled-dot-product attention becomes kiln::Attention.")


ATTENTION_RULES = [
    _sdpa_rule(True),
    _sdpa_rule(False),
    _attention_rule("scaled-q", "scaled-q"),
    _attention_rule("scaled-scores", "scaled-scores"),
    _attention_rule("scaled-scores-div", "scaled-scores-div"),
    _attention_rule("masked", "scaled-scores-masked"),
    # last, so that a scale on Q is fused rather than left as a Mul before the attention
    _attention_rule("unscaled-masked", "unscaled-masked"),
    _attention_rule("unscaled", "unscaled"),
]

RULES = [LAYERNORM, LAYERNORM_SQUARE, *GELU_ERF_RULES, GELU_TANH, *ATTENTION_RULES]

register_rule_set("fuse-transformer", RULES)
