"""The pass manager, the pattern engine, and the cleanup and folding passes."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

import kiln
from kiln.check import compare
from kiln.ir import DType, Graph, evaluate, load
from kiln.passes import (
    Const, MatchFailure, NearMiss, Optional, Pass, PassError, PassManager, PassResult, RewriteRule, RuleRun, Var,
    apply_rules, get_pass, parse_passes,
)
from kiln.passes.cleanup import CommonSubexpressionElimination, DeadCodeElimination
from kiln.passes.fold_constants import FoldConstants
from kiln.passes.pipeline import passes_for
from kiln.passes.rules import example_graph
from helpers import f32, make_model, ort_outputs, shape_chain_model

RNG = np.random.default_rng(0)


def _numbers_unchanged(before: Graph, after: Graph, feeds, rtol=1e-6, atol=1e-7):
    cmp = compare("pass", evaluate(after, feeds), evaluate(before, feeds), rtol, atol)
    assert cmp.passed, cmp.max_abs


# --------------------------------------------------------------------------- pattern engine


def _mul_add_rule(**kw) -> RewriteRule:
    """x * c + d  ->  kiln-free form: Add(Mul(x, c), d) matched in either order, rewritten as Mul then Add."""

    def pattern(op, x, d, c=Const()):
        return op.Add(op.Mul(x, c, _name="mul"), d, _name="add")

    def rewrite(op, x, c, d):
        return op.Add(op.Mul(x, c), d)

    return RewriteRule("test-mul-add", pattern, rewrite, **kw)


def _mul_add_graph(swap: bool) -> Graph:
    def build(op, x, d):
        m = op.Mul(op.constant(np.float32(2.0)), x) if swap else op.Mul(x, op.constant(np.float32(2.0)))
        return op.Add(d, m) if swap else op.Add(m, d)

    return example_graph("ma", {"x": (DType.FLOAT32, (3,)), "d": (DType.FLOAT32, (3,))}, build)


@pytest.mark.parametrize("swap", [False, True])
def test_add_and_mul_match_in_either_order(swap):
    g = _mul_add_graph(swap)
    stats = apply_rules(g, [_mul_add_rule()], max_rounds=1)
    assert stats.fired == {"test-mul-add": 1}


def test_constant_predicate_reports_a_reason():
    g = example_graph("m", {"x": (DType.FLOAT32, (3,)), "y": (DType.FLOAT32, (3,))},
                      lambda op, x, y: op.Add(op.Mul(x, y), x))
    stats = apply_rules(g, [_mul_add_rule()])
    assert stats.fired == {}
    assert "'c' must be a constant" in stats.near_miss["test-mul-add"].reason


def test_check_failure_is_reported_with_its_reason():
    def check(ctx, c):
        if float(c.numpy()) == 2:
            raise MatchFailure("c is two")

    rule = _mul_add_rule(check=check)
    g = _mul_add_graph(False)
    stats = apply_rules(g, [rule])
    assert stats.fired == {} and stats.near_miss[rule.name].reason == "check failed: c is two"


def test_a_helper_inside_check_may_raise_the_failure():
    def positive(v, label):  # a helper: it raises, the check does not thread a verdict back
        if not np.all(v.numpy() > 0):
            raise MatchFailure(f"the {label} %{v.name} is not positive")

    def check(ctx, c):
        positive(c, "factor")

    g = example_graph("ma", {"x": (DType.FLOAT32, (3,)), "d": (DType.FLOAT32, (3,))},
                      lambda op, x, d: op.Add(op.Mul(x, op.constant(np.float32(-2.0))), d))
    stats = apply_rules(g, [_mul_add_rule(check=check)])
    assert stats.fired == {}
    assert stats.near_miss["test-mul-add"].reason == "check failed: the factor %const is not positive"
    assert apply_rules(_mul_add_graph(False), [_mul_add_rule(check=check)], max_rounds=1).fired == {"test-mul-add": 1}


def test_a_check_that_returns_a_verdict_is_an_error():
    rule = _mul_add_rule(check=lambda ctx, c: "c is two")
    with pytest.raises(TypeError, match="the check of rule 'test-mul-add' returned 'c is two'"):
        apply_rules(_mul_add_graph(False), [rule])


def test_any_other_exception_from_a_check_propagates():
    def check(ctx, c):
        raise ZeroDivisionError("a bug in the check")

    with pytest.raises(ZeroDivisionError, match="a bug in the check"):
        apply_rules(_mul_add_graph(False), [_mul_add_rule(check=check)])


def _shadowing(op, x, w):  # the parameter w is shadowed by an inline Const: what the engine refuses
    return op.Conv(x, Const("w"))


def _stray(op, x):
    return op.Add(x, Const())


def _unused(op, x, b):
    return op.Relu(x)


def _bad_default(op, x, alpha=0.5):
    return op.LeakyRelu(x)


@pytest.mark.parametrize("pattern, message", [
    (_shadowing, r"pattern _shadowing binds Const\('w'\), which is not one of its parameters"),
    (_stray, "pattern _stray binds an unnamed Const, which is not one of its parameters"),
    (_unused, r"pattern _unused does not use its parameter\(s\) b"),
    (_bad_default, r"pattern _bad_default: the default of parameter 'alpha' must be Var\(...\) or Const"),
])
def test_a_pattern_whose_parameters_are_not_what_it_binds_is_refused(pattern, message):
    rule = RewriteRule("test-bad-pattern", pattern, lambda op, x: x)
    with pytest.raises(TypeError, match=message):
        rule.root


def test_parameter_defaults_give_the_kind_and_condition_of_a_variable():
    def pattern(op, x=Var(where=lambda v: v.rank == 1), c=Const()):
        return op.Mul(x, c)

    rule = RewriteRule("test-kinds", pattern, lambda op, x: x)
    root = rule.root
    x, c = root.node.inputs
    assert (type(x), x.name, type(c), c.name) == (Var, "x", Const, "c")
    assert pattern.__defaults__[1].name is None  # the engine names a copy; the default stays as written
    g = example_graph("k", {"x": (DType.FLOAT32, (3,)), "y": (DType.FLOAT32, (3,))},
                      lambda op, x, y: (op.Mul(x, op.constant(np.float32(1.0))), op.Mul(x, y)))
    stats = apply_rules(g, [rule])
    assert stats.fired == {"test-kinds": 1} and "'c' must be a constant" in stats.near_miss["test-kinds"].reason


def test_intermediate_with_other_uses_is_not_fused():
    def build(op, x, d):
        m = op.Mul(x, op.constant(np.float32(2.0)))
        return op.Add(m, d), op.Neg(m)

    g = example_graph("m", {"x": (DType.FLOAT32, (3,)), "d": (DType.FLOAT32, (3,))}, build)
    stats = apply_rules(g, [_mul_add_rule()])
    assert stats.fired == {}
    assert "is also used by" in stats.near_miss["test-mul-add"].reason


def test_a_shared_pattern_node_may_feed_nodes_outside_the_match():
    def pattern(op, x, d, c=Const()):  # the Mul may have other users: the rewrite leaves it for them
        return op.Add(op.Mul(x, c, _name="mul", _shared=True), d, _name="add")

    def rewrite(op, x, c, d):
        return op.Sub(d, op.Mul(op.Neg(x), c))

    def build(op, x, d):
        m = op.Mul(x, op.constant(np.float32(2.0)))
        return op.Add(m, d), op.Neg(m)

    inputs = {"x": (DType.FLOAT32, (3,)), "d": (DType.FLOAT32, (3,))}
    g, before = example_graph("m", inputs, build), example_graph("m", inputs, build)
    stats = apply_rules(g, [RewriteRule("test-shared", pattern, rewrite)], max_rounds=1)
    assert stats.fired == {"test-shared": 1}
    g.verify()
    ops = [n.op_type for n in g.nodes]
    assert ops.count("Mul") == 2 and "Add" not in ops  # the shared Mul stays for the Neg
    feeds = {"x": RNG.standard_normal(3).astype(np.float32), "d": RNG.standard_normal(3).astype(np.float32)}
    _numbers_unchanged(before, g, feeds)


def test_attribute_predicates_and_optional_inputs():
    def pattern(op, x, lo, hi):
        return op.Clip(x, lo, Optional(hi), _name="clip")

    seen = {}

    def rewrite(op, x, lo, hi):
        seen["hi"] = hi
        return op.Relu(x)

    rule = RewriteRule("test-clip", pattern, rewrite)
    g = example_graph("c", {"x": (DType.FLOAT32, (3,))}, lambda op, x: op.Clip(x, op.constant(np.float32(0))))
    assert apply_rules(g, [rule]).fired == {"test-clip": 1} and seen["hi"] is None

    def leaky(op, x):
        return op.LeakyRelu(x, alpha=lambda a: a is not None and a < 0.5)

    rule = RewriteRule("test-leaky", leaky, lambda op, x: op.Relu(x))
    g = example_graph("l", {"x": (DType.FLOAT32, (3,))}, lambda op, x: op.LeakyRelu(x, alpha=0.9))
    stats = apply_rules(g, [rule])
    assert stats.fired == {} and "attribute alpha=0.9" in stats.near_miss["test-leaky"].reason


def test_rule_priority_decides_overlaps():
    fired = []

    def mk(name, prio):
        return RewriteRule(name, lambda op, x: op.Relu(x), lambda op, x: (fired.append(name), op.Sigmoid(x))[1],
                           priority=prio)

    g = example_graph("r", {"x": (DType.FLOAT32, (3,))}, lambda op, x: op.Relu(x))
    apply_rules(g, [mk("low", 0), mk("high", 5)])
    assert fired == ["high"]


def test_rewrite_never_mutates_a_shared_constant():
    """Conv+BN where the weight is shared with a second conv: the other conv still reads the original."""
    from kiln.passes.fuse_conv import CONV_BN

    w = RNG.standard_normal((4, 3, 1, 1)).astype(np.float32)
    stats = [RNG.uniform(0.5, 1.5, 4).astype(np.float32) for _ in range(4)]

    def build(op, x):
        wc = op.constant(w)
        y = op.Conv(x, wc)
        return op.BatchNormalization(y, *[op.constant(s) for s in stats]), op.Conv(x, wc)

    g = example_graph("shared", {"x": (DType.FLOAT32, (1, 3, 4, 4))}, build)
    before = example_graph("shared", {"x": (DType.FLOAT32, (1, 3, 4, 4))}, build)
    original = next(iter(g.constants.values()))
    assert apply_rules(g, [CONV_BN]).fired == {"conv-bn": 1}
    np.testing.assert_array_equal(original.numpy(), w)
    assert any(n.input(1) is original for n in g.nodes)
    feeds = {"x": RNG.standard_normal((1, 3, 4, 4)).astype(np.float32)}
    cmp = compare("shared", evaluate(g, feeds), evaluate(before, feeds), 1e-5, 1e-6)
    assert cmp.passed


def test_graph_output_keeps_its_name_after_a_rewrite():
    from kiln.passes.fuse_conv import CONV_BN

    g = CONV_BN.example()
    out_name = g.outputs[0].name
    apply_rules(g, [CONV_BN])
    assert g.outputs[0].name == out_name and g.outputs[0].producer.op_type == "Conv"
    g.verify()


def test_explain_reports_the_nearest_miss():
    """Conv+BN where the BN scale is a graph input, not a constant."""
    c = 4

    def build(op, x, scale):
        y = op.Conv(x, op.constant(RNG.standard_normal((c, 3, 1, 1)).astype(np.float32)))
        stats = [op.constant(RNG.uniform(0.5, 1.5, c).astype(np.float32)) for _ in range(3)]
        return op.BatchNormalization(y, scale, *stats, _name="bn")

    g = example_graph("miss", {"x": (DType.FLOAT32, (1, 3, 4, 4)), "scale": (DType.FLOAT32, (c,))}, build)
    _, report = PassManager(passes_for("O2")).run(g)
    text = report.explain("conv-bn")
    assert text == ("rule 'conv-bn' did not fire in pass 'fuse-conv'; nearest miss in pass 'fuse-conv' at 'bn' "
                    "(BatchNormalization): check failed: the BN scale %scale is not a constant")
    no_bn = example_graph("e", {"x": (DType.FLOAT32, (2,))}, lambda op, x: op.Neg(x))
    _, report = PassManager(passes_for("O2")).run(no_bn)
    assert report.explain("conv-bn") == ("rule 'conv-bn' did not fire in pass 'fuse-conv'; never came close: no "
                                         "BatchNormalization node was there when pass 'fuse-conv' ran")
    with pytest.raises(PassError, match="no rule named 'nope'; known rules: .*conv-bn"):
        report.explain("nope")


def _residual_graph() -> Graph:
    """Two Conv + Add residuals: the first fuses, the second's other operand is a broadcast row."""
    w = RNG.standard_normal((4, 4, 1, 1)).astype(np.float32)

    def build(op, x, row):
        y = op.Add(op.Conv(x, op.constant(w)), x, _name="add_fused")
        return op.Add(op.Conv(y, op.constant(w)), row, _name="add_broadcast")

    return example_graph("res", {"x": (DType.FLOAT32, (1, 4, 3, 3)), "row": (DType.FLOAT32, (1, 4, 1, 3))}, build)


def test_the_report_keeps_each_passs_fire_counts_and_nearest_misses():
    _, report = PassManager(passes_for("O2")).run(_residual_graph())
    run = report.stats["fuse-conv"].rules["conv-residual"]
    assert run.root_op == "Add" and run.fired == 1
    assert run.miss is not None and run.miss.node == "'add_broadcast' (Add)"
    assert run.miss.iteration == 2  # the deepest miss, from the latest iteration that met it
    assert run.miss.reason.startswith("check failed: the residual f32[1,4,1,3] does not have the conv output's type")
    assert "conv-residual" not in report.stats["simplify"].rules  # simplify does not run it
    assert report.stats["simplify"].rules["add-zero"].fired == 0  # but every rule it tried is there
    assert report.explain("conv-residual") == (
        "rule 'conv-residual' fired 1 time(s) in pass 'fuse-conv'; nearest miss in pass 'fuse-conv' at "
        "'add_broadcast' (Add): check failed: the residual f32[1,4,1,3] does not have the conv output's type "
        "f32[1,4,3,3]")
    assert report.iterations == 2 and report.stats["fuse-conv"].runs == 2  # fire counts summed over both


def test_explain_a_rule_no_pass_of_the_pipeline_runs():
    _, report = PassManager(passes_for("O1")).run(_residual_graph())
    assert report.explain("conv-bn") == (
        "rule 'conv-bn' did not run: no pass of this pipeline ('qdq', 'fold-constants', 'inline-if', 'simplify', "
        "'cse', 'dce') applies it; it runs in passes 'fuse-conv', 'fold-into-conv'")
    _, report = PassManager(passes_for("O3", block=8)).run(_residual_graph())
    assert "rule 'conv-blocked' " in report.explain("conv-blocked")  # layout's rules are known too
    assert "in pass 'layout'" in report.explain("conv-blocked")


def test_a_fire_after_a_miss_at_the_same_node_forgets_the_miss():
    calls = []

    def check(ctx, c):  # fails the first time only, as a rule waiting for shapes does
        calls.append(1)
        if len(calls) == 1:
            raise MatchFailure("not yet")

    rule = _mul_add_rule(check=check)
    g = _mul_add_graph(False)
    from kiln.passes.rules import RewriteStats

    stats = RewriteStats()
    apply_rules(g, [rule], max_rounds=1, stats=stats)
    assert stats.near_miss["test-mul-add"].reason == "check failed: not yet"
    apply_rules(g, [rule], max_rounds=1, stats=stats)
    assert stats.fired == {"test-mul-add": 1} and stats.near_miss == {}
    assert stats.runs()["test-mul-add"].miss is None


# --------------------------------------------------------------------------- pass manager


class _Counter(Pass):
    name = "count-down"

    def __init__(self, budget: int):
        self.budget = budget

    def run(self, graph):
        self.budget -= 1
        return PassResult.of(graph, 1 if self.budget > 0 else 0)


class _Broken(Pass):
    name = "broken"

    def run(self, graph):
        raise RuntimeError("boom")


class _Corrupting(Pass):
    name = "corrupting"

    def run(self, graph):
        graph.nodes[0].outputs[0].dtype = None
        return PassResult.of(graph, 1)


def _tiny() -> Graph:
    return example_graph("t", {"x": (DType.FLOAT32, (2,))}, lambda op, x: op.Relu(x))


class _Scripted(Pass):
    """Reports a scripted fire count and near miss for rule 'r' on each run."""

    name = "scripted"

    def __init__(self, script):
        self.script = list(script)

    def run(self, graph):
        fired, miss = self.script.pop(0)
        return PassResult.of(graph, fired, {"r": fired} if fired else {}, {"r": RuleRun("Add", fired, miss)})


def test_near_misses_are_merged_over_the_iterations():
    deep, shallow = NearMiss("'a' (Add)", "deep", 3), NearMiss("'b' (Add)", "shallow", 1)
    _, report = PassManager([_Scripted([(2, deep), (1, shallow), (0, None)])]).run(_tiny())
    run = report.stats["scripted"].rules["r"]
    assert report.iterations == 3 and run.fired == 3 and report.rule_counts() == {"r": 3}
    assert run.miss == NearMiss("'a' (Add)", "deep", 3, iteration=1)
    assert report.explain("r") == "rule 'r' fired 3 time(s) in pass 'scripted'; nearest miss in pass 'scripted' " \
                                  "at 'a' (Add): deep"


def test_pipeline_iterates_to_a_fixed_point():
    counter = _Counter(3)
    _, report = PassManager([counter]).run(_tiny())
    assert report.iterations == 3 and report.stats["count-down"].runs == 3
    assert report.stats["count-down"].changes == 2


def test_a_failing_pass_is_named_with_its_predecessors():
    with pytest.raises(PassError, match=r"pass 'broken' failed \(after count-down\): RuntimeError: boom"):
        PassManager([_Counter(1), _Broken()]).run(_tiny())


def test_verify_each_catches_a_pass_that_breaks_the_graph():
    with pytest.raises(PassError, match="graph is invalid after pass 'corrupting'.*no known dtype"):
        PassManager([_Corrupting()], verify_each=True).run(_tiny())


def test_print_after():
    lines = []
    PassManager([DeadCodeElimination()], print_after=["dce"], printer=lines.append).run(_tiny())
    assert lines and lines[0].startswith("# after dce") and "Relu" in lines[0]


def test_unknown_pass_and_level():
    with pytest.raises(PassError, match="no pass named 'nope'; known passes: .*fold-constants"):
        passes_for(names=["nope"])
    with pytest.raises(PassError, match="no optimisation level 'O9'"):
        passes_for("O9")


# --------------------------------------------------------------------------- pass specs


def test_pass_specs_name_passes_and_set_their_fields():
    passes = parse_passes("layout{block=8}, fold-constants{max_elements=100},dce,cse{},quantize{symmetric=true}")
    assert [p.name for p in passes] == ["layout", "fold-constants", "dce", "cse", "quantize"]
    assert passes[0].block == 8 and passes[1].max_elements == 100 and passes[4].symmetric is True
    assert passes[3].max_constant_elements == 64  # {} keeps the defaults
    assert parse_passes("quantize{per_channel=0,symmetric=FALSE}")[0].per_channel is False
    assert [p.describe() for p in passes_for(names="layout{block=4},dce")] == ["layout{block=4}", "dce"]
    assert [p.describe() for p in passes_for(names=["fuse-conv,dce", "layout{block=4}"], block=8)] == [
        "fuse-conv", "dce", "layout{block=8}"]  # block still sets the layout pass's block
    assert get_pass("layout{block=4}").block == 4


@pytest.mark.parametrize("spec", ["layout{block=8},dce", "quantize{per_channel=false,symmetric=true}",
                                  "fold-constants{max_elements=12},cse{max_constant_elements=3},inline-if"])
def test_describe_round_trips_a_spec(spec):
    passes = parse_passes(spec)
    again = parse_passes(",".join(p.describe() for p in passes))
    assert [p.describe() for p in again] == [p.describe() for p in passes]
    assert parse_passes(passes[0].describe())[0] == passes[0]


def test_describe_writes_every_settable_field():
    assert get_pass("layout").describe() == "layout{block=16}"
    assert get_pass("quantize").describe() == "quantize{per_channel=true,symmetric=false}"
    assert get_pass("dce").describe() == "dce" and get_pass("fuse-conv").describe() == "fuse-conv"


@pytest.mark.parametrize("spec, message", [
    ("fold-constants,nope", "pass spec 'fold-constants,nope': no pass named 'nope'; known passes: bf16, cse, dce, "),
    ("layout{blok=8}", "pass spec 'layout{blok=8}': pass 'layout' has no field 'blok'; it takes block (int)"),
    ("dce{depth=2}", "pass spec 'dce{depth=2}': pass 'dce' has no field 'depth'; it takes no fields"),
    ("layout{block=eight}", "pass spec 'layout{block=eight}': block='eight' is not a valid int for pass 'layout'; "
                            "it takes block (int)"),
    ("quantize{symmetric=yes}", "symmetric='yes' is not a valid bool for pass 'quantize'; it takes per_channel "
                                "(bool), symmetric (bool)"),
    ("layout{block}", "pass spec 'layout{block}': expected field=value in 'block' for pass 'layout'"),
    ("layout{block=8", "pass spec 'layout{block=8': '{' without '}'"),
    ("layout{block={8}}", "braces do not nest"),
    ("quantize{ranges=1}", "pass 'quantize' has no field 'ranges'; it takes per_channel (bool), symmetric (bool)"),
])
def test_a_bad_spec_is_one_clear_error(spec, message):
    with pytest.raises(PassError) as info:
        parse_passes(spec)
    text = str(info.value)
    assert message in text and "\n" not in text


# --------------------------------------------------------------------------- cleanup and folding


def test_fold_shape_chain_to_a_constant():
    model = shape_chain_model()
    g = load(model)
    g, report = PassManager(passes_for("O1"), verify_each=True).run(g)
    assert [n.op_type for n in g.nodes] == ["Reshape"]
    assert g.nodes[0].input(1).numpy().tolist() == [2, -1]
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    assert compare("fold", evaluate(g, {"x": x}), ort_outputs(model, {"x": x}), 0, 0).passed


def test_constant_of_shape_weights_fold():
    shape = numpy_helper.from_array(np.array([2, 2], np.int64), "wshape")
    model = make_model(
        [helper.make_node("ConstantOfShape", ["wshape"], ["w"], value=helper.make_tensor("v", 1, [1], [0.5])),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        [f32("x", [1, 2])], [f32("y", [1, 2])], [shape],
    )
    g = load(model)
    FoldConstants().run(g)
    DeadCodeElimination().run(g)
    assert [n.op_type for n in g.nodes] == ["MatMul"] and list(g.constants) == ["w"]
    assert g.constants["w"].numpy().tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_folding_a_graph_output_keeps_its_name():
    g = example_graph("f", {"x": (DType.FLOAT32, (2,))},
                      lambda op, x: (op.Relu(x), op.Neg(op.constant(np.array([1.0, -2.0], np.float32)))))
    name = g.outputs[1].name
    FoldConstants().run(g)
    assert g.outputs[1].name == name and g.outputs[1].is_constant
    assert evaluate(g, {"x": np.zeros(2, np.float32)})[name].tolist() == [-1.0, 2.0]
    g.verify()


def test_dce_and_cse():
    def build(op, x):
        a = op.Relu(x)
        b = op.Relu(x)  # same as a
        op.Neg(x)  # dead
        k1, k2 = op.constant(np.float32(3.0)), op.constant(np.float32(3.0))
        return op.Add(op.Mul(a, k1), op.Mul(b, k2))

    g = example_graph("c", {"x": (DType.FLOAT32, (4,))}, build)
    before = example_graph("c", {"x": (DType.FLOAT32, (4,))}, build)
    assert DeadCodeElimination().run(g).changes == 1
    res = CommonSubexpressionElimination().run(g)
    assert res.changes == 3  # the constant, then Relu, then Mul
    assert [n.op_type for n in g.nodes] == ["Relu", "Mul", "Add"]
    g.verify()
    _numbers_unchanged(before, g, {"x": RNG.standard_normal(4).astype(np.float32)})


def test_o2_on_the_example_folds_every_batchnorm():
    g = kiln.load("examples/tiny_cnn.onnx")
    before = kiln.load("examples/tiny_cnn.onnx")
    g, report = PassManager(passes_for("O2"), verify_each=True).run(g)
    assert report.rule_counts() == {"conv-bn": 4, "conv-relu": 3, "conv-residual": 1, "fused-conv-relu": 1}
    assert [n.qualified_op for n in g.nodes] == [
        "kiln::FusedConv", "MaxPool", "kiln::FusedConv", "kiln::FusedConv", "kiln::FusedConv",
        "GlobalAveragePool", "Flatten", "Gemm", "Softmax"]
    assert report.nodes_before == 18 and report.nodes_after == 9
    feeds = {"input": RNG.standard_normal((2, 3, 64, 64)).astype(np.float32)}
    cmp = compare("O2", ort_outputs(kiln.to_onnx(g), feeds), ort_outputs(kiln.to_onnx(before), feeds), 1e-4, 1e-5)
    assert cmp.passed, cmp.max_abs


_FORWARD = RewriteRule("test-forward", lambda op, x: op.Identity(x), lambda op, x: x)


def test_forwarding_a_graph_input_keeps_the_interface():
    g = example_graph("g", {"x": (DType.FLOAT32, (2,))}, lambda op, x: op.Identity(x))
    out = g.outputs[0].name
    assert apply_rules(g, [_FORWARD]).fired == {}  # an Identity is needed anyway: nothing to do, and no loop
    assert [v.name for v in g.inputs] == ["x"] and [v.name for v in g.outputs] == [out]
    g.verify()


def test_forwarding_into_two_graph_outputs_keeps_both_names():
    def build(op, x):
        r = op.Relu(x)
        return r, op.Identity(op.Identity(r))

    g = example_graph("g", {"x": (DType.FLOAT32, (2,))}, build)
    names = [v.name for v in g.outputs]
    assert apply_rules(g, [_FORWARD]).fired == {"test-forward": 1}
    assert [v.name for v in g.outputs] == names and g.outputs[0] is not g.outputs[1]
    g.verify()
    x = np.array([-1.0, 2.0], np.float32)
    assert [a.tolist() for a in evaluate(g, {"x": x}).values()] == [[0.0, 2.0], [0.0, 2.0]]


def test_rewrite_may_return_none_for_an_unread_output():
    rule = RewriteRule("test-drop", lambda op, x: op.Dropout(x, _outputs=2)[0], lambda op, x: (op.Relu(x), None))
    g = example_graph("g", {"x": (DType.FLOAT32, (2,))}, lambda op, x: op.Neg(op.Dropout(x, _outputs=2)[0]))
    assert apply_rules(g, [rule]).fired == {"test-drop": 1}
    g.verify()


def test_zero_pad_before_maxpool_does_not_fold():
    """MaxPool's own padding is -inf; padding with zeros first changes results for negative inputs."""
    from kiln.passes.fuse_conv import PAD_MAXPOOL

    def build(op, x):
        padded = op.Pad(x, op.constant(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)))
        return op.MaxPool(padded, kernel_shape=[2, 2])

    g = example_graph("p", {"x": (DType.FLOAT32, (1, 1, 4, 4))}, build)
    stats = apply_rules(g, [PAD_MAXPOOL])
    assert stats.fired == {} and "MaxPool pads with -inf; this Pad fills 0.0" in stats.near_miss["pad-maxpool"].reason


def test_pad_rows_pads_the_row_axis_that_grows_the_rows_least():
    """[19, 1, K] (tokens first, as torchvision's attention projections run) pads its 19 to 20,
    not its 1 to 4, which would quadruple the product; the numbers stay the same."""
    from kiln.passes import RULES, apply_rules
    from kiln.passes.rules import example_graph

    rng = np.random.default_rng(0)
    w = rng.standard_normal((20, 32)).astype(np.float32)

    def build(op, x):
        return op.MatMul(x, op.constant(w))

    g = example_graph("rows_first", {"x": (DType.FLOAT32, (19, 1, 20))}, build)
    assert apply_rules(g, [RULES["matmul-pad-rows"]]).fired.get("matmul-pad-rows") == 1
    (pad,) = [n for n in g.nodes if n.op_type == "Pad"]
    assert pad.outputs[0].shape == (20, 1, 20)
    x = rng.standard_normal((19, 1, 20)).astype(np.float32)
    np.testing.assert_allclose(evaluate(g, {"x": x})[g.outputs[0].name], x @ w, rtol=1e-5, atol=1e-5)
