"""A custom kiln rewrite rule, from pattern to verified pass.

    python examples/custom_rule.py                       # verify the rule, run it on a small graph
    kiln optimize MODEL.onnx -o OUT.onnx --load examples/custom_rule.py --passes fold-constants,hardswish,dce

The rule turns ``x * HardSigmoid(x)`` (with HardSigmoid's alpha = 1/6, beta = 0.5)
into one ``HardSwish(x)``, the op that exists for exactly this since opset 14.
"""

from __future__ import annotations

import numpy as np

from kiln.ir import DType, Graph, Node, Value, evaluate
from kiln.passes import (
    MatchFailure, PassManager, RewriteRule, apply_rules, example_graph, get_pass, register_rule_set, verify_rule,
)


# 1. The pattern: what to find. Its parameters are the variables it binds (x=Const() would match only
#    a constant); op.X(...) matches an X node. Mul is commutative, so x * h and h * x both match.
def pattern(op, x):
    return op.Mul(x, op.HardSigmoid(x, _name="hsig"))


# 2. The check: when the match must not be used. It raises MatchFailure with the reason.
def check(ctx, x: Value, hsig: Node) -> None:
    alpha, beta = hsig.attr("alpha", 0.2), hsig.attr("beta", 0.5)
    if not (np.isclose(alpha, 1 / 6, rtol=1e-5) and np.isclose(beta, 0.5)):
        raise MatchFailure(f"HardSigmoid has alpha={alpha:.6g}, beta={beta:.6g}; HardSwish needs 1/6 and 0.5")
    if ctx.graph.model_opset.get("", 0) < 14:
        raise MatchFailure("HardSwish needs opset 14 or newer")


# 3. The rewrite: what to put in its place.
def rewrite(op, x: Value) -> Value:
    return op.HardSwish(x)


# 4. An example graph the rule fires on: verification runs it before and after.
def example() -> Graph:
    return example_graph("hardswish", {"x": (DType.FLOAT32, (2, 8))},
                         lambda op, x: op.Mul(x, op.HardSigmoid(x, alpha=1 / 6, beta=0.5)))


HARDSWISH = RewriteRule("hardswish", pattern, rewrite, check=check, example=example,
                        description="x * HardSigmoid(x) with alpha 1/6, beta 0.5 becomes HardSwish(x)")

# 5. Register it: the rule by name, and a pass that applies it (--passes hardswish, --explain hardswish).
register_rule_set("hardswish", [HARDSWISH])


def main() -> None:
    report = verify_rule(HARDSWISH)  # raises if the rule changes the numbers
    print(f"verified: fired {report.fired}x, {report.nodes_before} -> {report.nodes_after} nodes, "
          + "; ".join(f"{c.name} max error {max(c.max_abs.values()):.2g}" for c in report.comparisons))

    g = example()
    x = np.linspace(-4, 4, 16, dtype=np.float32).reshape(2, 8)
    before = evaluate(g, {"x": x})
    stats = apply_rules(g, [HARDSWISH])
    print(f"fired: {stats.fired}")
    print(g)
    assert np.allclose(evaluate(g, {"x": x})[g.outputs[0].name], list(before.values())[0], atol=1e-6)

    # A near miss, explained from a pipeline run: HardSigmoid with Paddle's default slope 0.2 is no HardSwish.
    miss = example_graph("miss", {"x": (DType.FLOAT32, (4,))},
                         lambda op, x: op.Mul(op.HardSigmoid(x, alpha=0.2, beta=0.5), x))
    _, run = PassManager([get_pass("hardswish"), get_pass("dce")]).run(miss)
    print(run.explain("hardswish"))


if __name__ == "__main__":
    main()
