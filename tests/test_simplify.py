"""The cleanup and simplification rules: each verified on its example, the cases they must refuse, and all together."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kiln.ir import DType, Graph, evaluate, infer_shapes, to_onnx
from kiln.ir.oracle import run_onnxruntime, seeded_inputs
from kiln.passes import RULES, apply_rules, example_graph, verify_rule
from kiln.passes.simplify import ALGEBRA_RULES, ALGEBRA_TABLE, NOOP_RULES

F32 = DType.FLOAT32
ALL = NOOP_RULES + ALGEBRA_RULES
BY_NAME = {r.name: r for r in ALL}


def i64(*v):
    return np.array(v, np.int64)


def f32(v):
    return np.asarray(v, np.float32)


# ------------------------------------------------------------------ every rule, on its own example


@pytest.mark.parametrize("rule", ALL, ids=lambda r: r.name)
def test_rule_is_numerically_verified(rule):
    report = verify_rule(rule)
    assert report.fired >= 1
    # conv1d-as-2d adds the Unsqueeze and Squeeze that the squeeze rules then cancel between convs
    assert report.nodes_after < report.nodes_before or rule.name in {"div-const-to-mul", "pow-two", "conv1d-as-2d"}
    assert [c.passed for c in report.comparisons] == [True, True]


def test_rules_are_well_formed():
    names = [r.name for r in ALL]
    assert len(names) == len(set(names))
    assert not set(names) & (set(RULES) - set(names)), "a name clashes with another registered rule"
    assert [r.name for r in ALGEBRA_RULES] == [row.name for row in ALGEBRA_TABLE]
    for r in ALL:
        assert r.description and r.example is not None


def verify_variant(name: str, build, inputs=None, opset: int = 17):
    """verify_rule on another example graph for the same rule."""
    inputs = inputs or {"x": (F32, (2, 3, 4))}
    rule = dataclasses.replace(BY_NAME[name], example=lambda: example_graph(name, inputs, build, opset=opset))
    return verify_rule(rule)


def near_miss(name: str, build, inputs=None, opset: int = 17, rules=None) -> str:
    """The rule's nearest-miss reason on a graph it must not fire on (asserting it did not fire)."""
    g = example_graph("g", inputs or {"x": (F32, (2, 3, 4))}, build, opset=opset)
    before = len(g)
    stats = apply_rules(g, rules or [BY_NAME[name]])
    assert stats.fired.get(name, 0) == 0, f"{name} fired"
    assert len(g) == before
    return stats.near_miss[name].reason


# ------------------------------------------------------------------ no-op rules: more positive cases


def test_dropout_with_an_unused_mask_and_false_training_mode():
    def build(op, x):
        y, _mask = op.Dropout(x, op.constant(f32(0.3)), op.constant(np.array(False)), _outputs=2)
        return op.Relu(y)

    assert verify_variant("dropout-inference", build).fired == 1


def test_dropout_before_opset_12_has_a_ratio_attribute():
    assert verify_variant("dropout-inference", lambda op, x: op.Relu(op.Dropout(x, ratio=0.2)), opset=11).fired == 1


def test_dropout_before_opset_7_needs_is_test():
    assert "trains unless is_test=1" in near_miss("dropout-inference", lambda op, x: op.Relu(op.Dropout(x)), opset=6)
    g = example_graph("g", {"x": (F32, (4,))}, lambda op, x: op.Relu(op.Dropout(x, is_test=1)), opset=6)
    assert apply_rules(g, [BY_NAME["dropout-inference"]]).fired == {"dropout-inference": 1}


@pytest.mark.parametrize("shape,allowzero", [((2, 3, 4), 0), ((2, 3, -1), 0), ((0, 0, 0), 0), ((2, 3, 4), 1),
                                             ((-1, 3, 4), 0)])
def test_reshape_noop_variants(shape, allowzero):
    def build(op, x):
        return op.Relu(op.Reshape(x, op.constant(i64(*shape)), allowzero=allowzero))

    assert verify_variant("reshape-noop", build).fired == 1


def test_reshape_noop_with_a_symbolic_batch_dim():
    g = example_graph("g", {"x": (F32, ("N", 3, 4))},
                      lambda op, x: op.Relu(op.Reshape(x, op.constant(i64(0, 3, 4)))))
    feeds = {"x": np.random.default_rng(0).standard_normal((5, 3, 4)).astype(np.float32)}
    want = evaluate(g, feeds)
    assert apply_rules(g, [BY_NAME["reshape-noop"]]).fired == {"reshape-noop": 1}
    g.verify()
    np.testing.assert_array_equal(evaluate(g, feeds)["relu_out"], want["relu_out"])


@pytest.mark.parametrize("shape", [(1,), (4,), (1, 1, 1), (2, 3, 4), ()])
def test_expand_noop_variants(shape):
    assert verify_variant("expand-noop", lambda op, x: op.Relu(op.Expand(x, op.constant(i64(*shape))))).fired == 1


def test_transpose_identity_without_perm_on_rank_1():
    assert verify_variant("transpose-identity", lambda op, x: op.Relu(op.Transpose(x)), {"x": (F32, (5,))}).fired == 1


def test_transpose_pair_with_default_perms():
    build = lambda op, x: op.Relu(op.Transpose(op.Transpose(x)))  # noqa: E731
    assert verify_variant("transpose-pair", build).fired == 1


def test_squeeze_unsqueeze_with_attributes_before_opset_13():
    def build(op, x):
        return op.Relu(op.Unsqueeze(op.Squeeze(x, axes=[1]), axes=[-2]))

    assert verify_variant("squeeze-unsqueeze", build, {"x": (F32, (2, 1, 4))}, opset=11).fired == 1
    build2 = lambda op, x: op.Relu(op.Squeeze(op.Unsqueeze(x, axes=[0, 2]), axes=[0, -2]))  # noqa: E731
    assert verify_variant("unsqueeze-squeeze", build2, {"x": (F32, (2, 4))}, opset=11).fired == 1


def test_squeeze_without_axes_uses_the_static_shape():
    def build(op, x):
        return op.Relu(op.Unsqueeze(op.Squeeze(x), op.constant(i64(0, 2))))

    assert verify_variant("squeeze-unsqueeze", build, {"x": (F32, (1, 3, 1))}).fired == 1


def test_identity_to_a_graph_output_fed_by_a_constant():
    """The engine renames the constant to the output's name; ORT and the evaluator agree."""
    build = lambda op, x: (op.Relu(x), op.Identity(op.constant(f32([1.0, 2.0]))))  # noqa: E731
    assert verify_variant("identity", build).fired == 1


# ------------------------------------------------------------------ no-op rules: cases that must not fire


def test_forwarding_into_a_graph_output_keeps_the_interface():
    """The engine keeps input and output names: an Identity carries the output where it must."""
    g = example_graph("g", {"x": (F32, (3,))}, lambda op, x: op.Identity(x))
    assert apply_rules(g, [BY_NAME["identity"]]).fired == {}  # an Identity is needed anyway
    g = example_graph("g", {"x": (F32, (3,))}, lambda op, x: op.Cast(x, to=1))
    out = g.outputs[0].name
    assert apply_rules(g, [BY_NAME["cast-same-type"]]).fired == {"cast-same-type": 1}
    assert [n.op_type for n in g.nodes] == ["Identity"] and [v.name for v in g.inputs] == ["x"]
    assert g.outputs[0].name == out
    g.verify()

    def build(op, x):
        r = op.Relu(x)
        return r, op.Identity(op.Identity(r))

    g = example_graph("g", {"x": (F32, (3,))}, build)
    names = [v.name for v in g.outputs]
    assert apply_rules(g, [BY_NAME["identity"]]).fired == {"identity": 1}
    assert [v.name for v in g.outputs] == names and g.outputs[0] is not g.outputs[1]
    g.verify()


def test_subgraph_identity_of_an_outer_value_stays_and_an_inner_one_is_removed():
    def build(outer_identity: bool) -> Graph:
        g = Graph("g", opset={"": 17})
        cond = g.add_input("cond", DType.BOOL, ())
        x = g.add_input("x", F32, (3,))
        r = g.make_node("Relu", [x]).outputs[0]
        then = g.subgraph("then")
        src = r if outer_identity else then.make_node("Neg", [r]).outputs[0]
        then.outputs.append(then.make_node("Identity", [src]).outputs[0])
        other = g.subgraph("else")
        other.outputs.append(other.make_node("Abs", [r]).outputs[0])
        node = g.make_node("If", [cond], {"then_branch": then, "else_branch": other}, name="if")
        g.outputs.append(node.outputs[0])
        infer_shapes(g)
        g.verify()
        return g

    g = build(outer_identity=True)
    stats = apply_rules(g, [BY_NAME["identity"]])
    assert not stats.fired  # the branch output needs its own value: the Identity stays
    g.verify()

    g, ref = build(outer_identity=False), build(outer_identity=False)
    assert apply_rules(g, [BY_NAME["identity"]]).fired == {"identity": 1}
    g.verify()
    feeds = {"cond": np.array(True), "x": f32([-1.0, 2.0, -3.0])}
    out = g.outputs[0].name
    want = evaluate(ref, feeds)[out]
    np.testing.assert_array_equal(evaluate(g, feeds)[out], want)
    np.testing.assert_array_equal(run_onnxruntime(to_onnx(g).SerializeToString(), feeds)[out], want)


def test_cast_to_another_type():
    reason = near_miss("cast-same-type", lambda op, x: op.Relu(op.Cast(x, to=11)))
    assert "Cast to type 11 changes %x (f32, type 1)" in reason


def test_castlike_to_another_type():
    reason = near_miss("castlike-same-type", lambda op, x, y: op.Relu(op.CastLike(x, y)),
                       {"x": (F32, (2,)), "y": (DType.FLOAT16, (1,))})
    assert "changes %x from f32 to f16" in reason


def test_dropout_whose_mask_is_used():
    def build(op, x):
        y, mask = op.Dropout(x, _outputs=2)
        return op.Relu(y), mask

    assert "the Dropout mask output" in near_miss("dropout-inference", build)


def test_dropout_in_training_mode():
    def build(op, x):
        return op.Relu(op.Dropout(x, op.constant(f32(0.5)), op.constant(np.array(True))))

    assert "training_mode %const_0 is true" in near_miss("dropout-inference", build)

    def build_dynamic(op, x, t):
        return op.Relu(op.Dropout(x, op.constant(f32(0.5)), t))

    reason = near_miss("dropout-inference", build_dynamic, {"x": (F32, (4,)), "t": (DType.BOOL, ())})
    assert "training_mode %t is not a constant" in reason


@pytest.mark.parametrize("shape,allowzero,why", [
    ((4, 3, 2), 0, "differs from %x (2, 3, 4) at dim 0"),
    ((6, 4), 0, "changes the rank"),
    ((2, 0, 4), 1, "differs from %x (2, 3, 4) at dim 1"),
])
def test_reshape_to_another_shape(shape, allowzero, why):
    def build(op, x):
        return op.Relu(op.Reshape(x, op.constant(i64(*shape)), allowzero=allowzero))

    g = example_graph("g", {"x": (F32, (2, 3, 4))}, build)
    if allowzero and 0 in shape:  # a real zero-size output: only check the rule's reason
        stats = apply_rules(g, [BY_NAME["reshape-noop"]])
        assert not stats.fired and why in stats.near_miss["reshape-noop"].reason
        return
    assert why in near_miss("reshape-noop", build)


def test_reshape_with_a_symbolic_dim_and_minus_one():
    reason = near_miss("reshape-noop", lambda op, x: op.Relu(op.Reshape(x, op.constant(i64(0, -1, 4)))),
                       {"x": (F32, ("N", 3, 4))})
    assert "not static and non-zero" in reason
    # -1 in the symbolic position is inferred from static dims: that one is a no-op
    g = example_graph("g", {"x": (F32, ("N", 3, 4))}, lambda op, x: op.Relu(op.Reshape(x, op.constant(i64(-1, 3, 4)))))
    assert apply_rules(g, [BY_NAME["reshape-noop"]]).fired == {"reshape-noop": 1}


def test_expand_that_enlarges():
    small = {"x": (F32, (1, 3))}
    reason = near_miss("expand-noop", lambda op, x: op.Relu(op.Expand(x, op.constant(i64(2, 1, 3)))), small)
    assert "raises the rank" in reason
    reason = near_miss("expand-noop", lambda op, x: op.Relu(op.Expand(x, op.constant(i64(5, 3)))), small)
    assert "changes %x (1, 3) at dim 0" in reason


def test_transposes_that_do_not_cancel():
    build = lambda op, x: op.Relu(op.Transpose(op.Transpose(x, perm=[1, 2, 0]), perm=[1, 2, 0]))  # noqa: E731
    assert "perms [1, 2, 0] then [1, 2, 0] do not cancel" in near_miss("transpose-pair", build)
    assert "perm [0, 2, 1] is not the identity" in near_miss(
        "transpose-identity", lambda op, x: op.Relu(op.Transpose(x, perm=[0, 2, 1])))


def test_transpose_pair_whose_middle_value_is_read_elsewhere():
    def build(op, x):
        t = op.Transpose(x, perm=[1, 0, 2])
        return op.Relu(op.Transpose(t, perm=[1, 0, 2])), op.Neg(t)

    assert "is also used by" in near_miss("transpose-pair", build)


def test_squeeze_unsqueeze_with_different_axes():
    build = lambda op, x: op.Relu(op.Unsqueeze(op.Squeeze(x, op.constant(i64(1))), op.constant(i64(0))))  # noqa: E731
    x = {"x": (F32, (2, 1, 4))}
    assert "Squeeze axes [1] and Unsqueeze axes [0] differ" in near_miss("squeeze-unsqueeze", build, x)
    build = lambda op, x: op.Relu(op.Squeeze(op.Unsqueeze(x, op.constant(i64(0))), op.constant(i64(1))))  # noqa: E731
    assert "Unsqueeze axes [0] and Squeeze axes [1] differ" in near_miss("unsqueeze-squeeze", build, x)


def test_squeeze_with_dynamic_axes():
    build = lambda op, x, a: op.Relu(op.Unsqueeze(op.Squeeze(x, a), op.constant(i64(1))))  # noqa: E731
    reason = near_miss("squeeze-unsqueeze", build, {"x": (F32, (2, 1, 4)), "a": (DType.INT64, (1,))})
    assert "are not a constant" in reason


# ------------------------------------------------------------------ algebraic rules


def test_mul_by_a_one_that_enlarges_x():
    reason = near_miss("mul-by-one", lambda op, x: op.Mul(x, op.constant(np.ones((2, 3), np.float32))),
                       {"x": (F32, (3,))})
    assert "higher rank than %x (3,)" in reason
    reason = near_miss("mul-by-one", lambda op, x: op.Mul(x, op.constant(np.ones((4,), np.float32))),
                       {"x": (F32, (2, 1))})
    assert "would broadcast %x (2, 1) to a larger" in reason


def test_mul_by_not_one_and_add_not_zero():
    assert "is not all 1" in near_miss("mul-by-one", lambda op, x: op.Relu(op.Mul(x, op.constant(f32(2.0)))))
    assert "is not all 0" in near_miss("add-zero", lambda op, x: op.Relu(op.Add(x, op.constant(f32([0, 1, 0, 0])))))


def test_division_by_zero_is_not_a_reciprocal():
    reason = near_miss("div-const-to-mul", lambda op, x: op.Div(x, op.constant(f32([1, 0, 2, 3]))))
    assert "has a zero" in reason
    reason = near_miss("div-const-to-mul", lambda op, x: op.Div(x, op.constant(f32(1e-39))))
    assert "is not a finite normal" in reason


def test_integer_division_is_not_a_reciprocal():
    reason = near_miss("div-const-to-mul", lambda op, x: op.Div(x, op.constant(i64(3))), {"x": (DType.INT64, (4,))})
    assert "is i64, not a float type" in reason


def test_merged_constants_keep_their_dtype_and_broadcast():
    g = example_graph("g", {"x": (F32, (2, 3, 4))},
                      lambda op, x: op.Mul(op.Mul(x, op.constant(f32([[1.5], [2], [3]]))), op.constant(f32(2))))
    assert apply_rules(g, [BY_NAME["mul-mul-const"]]).fired == {"mul-mul-const": 1}
    (mul,) = g.nodes
    merged = next(v for v in mul.inputs if v.is_constant)
    assert merged.dtype is F32 and merged.shape == (3, 1)
    np.testing.assert_array_equal(merged.numpy(), f32([[3], [4], [6]]))


def test_merging_that_would_grow_or_overflow_is_refused():
    column, row = f32([[1], [2], [3]]), f32([1, 2, 3, 4])
    build = lambda op, x: op.Mul(op.Mul(x, op.constant(column)), op.constant(row))  # noqa: E731
    assert "would grow the constant" in near_miss("mul-mul-const", build)
    build = lambda op, x: op.Mul(op.Mul(x, op.constant(f32(1e30))), op.constant(f32(1e30)))  # noqa: E731
    assert "overflows f32" in near_miss("mul-mul-const", build)


def test_integer_constant_chains_merge_exactly():
    build = lambda op, x: op.Add(op.Add(x, op.constant(i64(3, 4))), op.constant(i64(-1)))  # noqa: E731
    assert verify_variant("add-add-const", build, {"x": (DType.INT64, (3, 2))}).fired == 1
    build = lambda op, x: op.Mul(op.constant(i64(5)), op.Mul(op.constant(i64(2)), x))  # noqa: E731
    assert verify_variant("mul-mul-const", build, {"x": (DType.INT64, (3, 2))}).fired == 1


def test_pow_two_needs_float():
    reason = near_miss("pow-two", lambda op, x: op.Pow(x, op.constant(i64(2))), {"x": (DType.INT64, (4,))})
    assert "not a float type" in reason


# ------------------------------------------------------------------ all rules together


def _mixed(op, x, y):
    a = op.Identity(op.Relu(x))                                               # identity
    a = op.Dropout(a, op.constant(f32(0.5)))                                  # dropout in inference
    a = op.Cast(a, to=1)                                                      # cast to f32, already f32
    a = op.Reshape(a, op.constant(i64(0, -1, 4)))                             # reshape to its own shape
    a = op.Transpose(op.Transpose(a, perm=[2, 0, 1]), perm=[1, 2, 0])         # transposes that cancel
    a = op.Mul(op.Mul(a, op.constant(f32(2))), op.constant(f32(0.25)))        # (a * 2) * 0.25
    a = op.Add(a, op.constant(f32(0)))                                        # a + 0
    a = op.Div(op.Neg(op.Neg(a)), op.constant(f32(1)))                       # Neg(Neg(a)) / 1
    b = op.Unsqueeze(op.Squeeze(y, op.constant(i64(1))), op.constant(i64(1)))  # squeeze/unsqueeze pair
    b = op.Expand(op.Pow(b, op.constant(f32(1))), op.constant(i64(1, 4)))     # Pow(b, 1), expand to its shape
    return op.Add(a, b), op.Transpose(y, perm=[0, 1, 2])                      # a kept transpose-identity output


def test_all_rules_together_shrink_the_graph_and_keep_the_numbers():
    inputs = {"x": (F32, (2, 3, 4)), "y": (F32, (2, 1, 4))}
    before = example_graph("mixed", inputs, _mixed)
    after = example_graph("mixed", inputs, _mixed)
    stats = apply_rules(after, ALL)
    after.verify()
    assert len(after) < len(before)
    # Relu, the merged Mul, the final Add; the identity Transpose of input y becomes the Identity that
    # carries the graph output's name
    assert sorted(n.op_type for n in after.nodes) == ["Add", "Identity", "Mul", "Relu"], str(after)
    assert stats.fired.get("transpose-identity", 0) == 1
    assert [v.name for v in after.inputs] == [v.name for v in before.inputs]
    assert [v.name for v in after.outputs] == [v.name for v in before.outputs]
    feeds = seeded_inputs(before, {}, 0)
    want, got = evaluate(before, feeds), evaluate(after, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
    ort = run_onnxruntime(to_onnx(after).SerializeToString(), feeds)
    for name in want:
        np.testing.assert_allclose(ort[name], want[name], rtol=1e-5, atol=1e-6)


def test_a_chain_of_1d_convs_runs_as_2d_convs_with_nothing_between_them():
    """silero-vad's encoder: Conv -> Relu -> Conv in 1-D becomes the same in 2-D (height 1), one Unsqueeze before
    and one Squeeze after, and the numbers stay."""
    from kiln.ir import Evaluator
    from kiln.passes import PassManager
    from kiln.passes.pipeline import passes_for
    from kiln.passes.simplify import CONV1D_AS_2D

    g = CONV1D_AS_2D.example()
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 4, 19)).astype(np.float32)}
    want = Evaluator(g).run(feeds)
    g, _ = PassManager(passes_for(names=["simplify", "dce"])).run(g)
    assert [n.op_type for n in g.nodes] == ["Unsqueeze", "Conv", "Relu", "Conv", "Squeeze", "Relu"]
    assert all(len(n.inputs[1].shape) == 4 for n in g.nodes if n.op_type == "Conv")
    got = Evaluator(g).run(feeds)
    np.testing.assert_array_equal(got[g.outputs[0].name], want[next(iter(want))])
