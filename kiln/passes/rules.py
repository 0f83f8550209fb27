"""Rewrite rules, rule sets, and the pass that applies a rule set.

Register a rule with :func:`register_rule`. Every rule carries an ``example``:
a function that builds a small graph the rule fires on. The verified-rewrite
test runs each example before and after the rule, through kiln's evaluator and
through onnxruntime, and a rule without an example fails that test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from kiln.ir import DType, Graph, Node, Value, infer_shapes
from kiln.passes.manager import Pass, PassResult
from kiln.passes.pattern import (
    Attempt, Match, MatchContext, MatchResult, Out, RewriteBuilder, build_pattern, call_with_bindings,
    iter_outputs, match,
)


@dataclass
class RewriteRule:
    """One rule: ``pattern(op, *vars)``, optional ``check(ctx, **b)``, ``rewrite(op, **b)``.

    ``priority`` orders overlapping rules (higher first). ``example()`` returns a
    small graph the rule fires on; ``rtol``/``atol`` are the float32 tolerances
    its verification uses.
    """

    name: str
    pattern: Callable[..., Any]
    rewrite: Callable[..., Any]
    check: Callable[..., MatchResult] | None = None
    priority: int = 0
    example: Callable[[], Graph] | None = None
    description: str = ""
    rtol: float = 1e-5
    atol: float = 1e-6
    _root: Out | None = field(default=None, init=False, repr=False)

    @property
    def root(self) -> Out:
        """The built pattern (built once)."""
        if self._root is None:
            self._root, _ = build_pattern(self.pattern)
        return self._root

    def try_match(self, node: Node) -> Match | Attempt:
        """Structural match at ``node``, then the rule's check."""
        result = match(self.root, node)
        if isinstance(result, Attempt) or self.check is None:
            return result
        assert node.graph is not None
        ctx = MatchContext(node.graph, node, result.matched)
        verdict = call_with_bindings(self.check, ctx, result.bindings())
        if not verdict:
            return Attempt(node, len(result.matched) + 1, f"check failed: {verdict.reason}")
        return result

    def apply(self, m: Match) -> bool:
        """Replace the match with the rewrite's result.

        A rewrite returns one value per named output of the root; ``None`` is
        allowed for an output nobody reads. Graph outputs keep their names: if
        the replacement cannot take the name (it is a graph input, another graph
        output, or a value of an outer graph), an Identity carries it instead.
        Returns False, changing nothing, when that Identity would just recreate
        the matched root (an Identity from that same value).
        """
        graph = m.root.graph
        assert graph is not None
        builder = RewriteBuilder(graph, m.root)
        result = call_with_bindings(self.rewrite, builder, m.bindings())
        new = [result] if result is None or isinstance(result, Value) else list(result)
        old = [o for o in m.root.outputs if o.name]
        if len(new) != len(old):
            raise ValueError(f"rule '{self.name}' replaced {len(old)} output(s) with {len(new)}")
        def needs_identity(o: Value, n: Value) -> bool:
            return o.is_graph_output and (n.is_graph_input or n.is_graph_output or n.graph is not graph)

        root = m.root
        if (len(old) == 1 and new[0] is not None and needs_identity(old[0], new[0]) and root.op_type == "Identity"
                and root.domain == "" and root.input(0) is new[0] and not builder.created):
            return False  # it would put back the very Identity it removes
        for o, n in zip(old, new):
            if n is None:
                if o.uses or o.is_graph_output:
                    raise ValueError(f"rule '{self.name}' returned None for %{o.name}, which is read")
                continue
            if needs_identity(o, n):
                n = builder.Identity(n)
            if n.dtype is None:
                n.dtype = o.dtype
            if n.shape is None:
                n.shape = o.shape
            keep_name = o.is_graph_output
            o.replace_all_uses_with(n)
            if keep_name:  # graph outputs keep their names: the model's interface does not change
                old_name = o.name
                o.name = graph.fresh_name(f"{old_name}_replaced")
                graph.rename_value(n, old_name)
        for node in reversed(m.matched):
            if node.graph is graph and not any(o.uses or o.is_graph_output for o in node.outputs):
                graph.remove_node(node)
        return True


RULES: dict[str, RewriteRule] = {}


def register_rule(rule: RewriteRule) -> RewriteRule:
    """Make a rule known by name (for rule sets, ``--explain`` and the verification test)."""
    if rule.name in RULES and RULES[rule.name] is not rule:
        raise ValueError(f"a rule named '{rule.name}' is already registered")
    RULES[rule.name] = rule
    return rule


@dataclass
class RuleSet:
    """A named group of rules, applied highest priority first."""

    name: str
    rules: list[RewriteRule]

    def ordered(self) -> list[RewriteRule]:
        return sorted(self.rules, key=lambda r: -r.priority)


@dataclass
class RewriteStats:
    """Fire counts, and the nearest miss for each rule that never fired (for --explain)."""

    fired: dict[str, int] = field(default_factory=dict)
    near_miss: dict[str, Attempt] = field(default_factory=dict)


def apply_rules(graph: Graph, rules: list[RewriteRule], *, max_rounds: int = 20) -> RewriteStats:
    """Apply ``rules`` everywhere in ``graph`` (and subgraphs) until none matches."""
    stats = RewriteStats()
    ordered = sorted(rules, key=lambda r: -r.priority)
    by_op: dict[tuple[str, str], list[RewriteRule]] = {}
    for r in ordered:
        by_op.setdefault((r.root.node.domain, r.root.node.op_type), []).append(r)
    for _ in range(max_rounds):
        changed = False
        for g in list(graph.walk_graphs()):
            for node in g.nodes:
                if node.graph is not g:
                    continue  # removed by an earlier rewrite in this sweep
                for rule in by_op.get((node.domain, node.op_type), ()):
                    result = rule.try_match(node)
                    if isinstance(result, Attempt):
                        best = stats.near_miss.get(rule.name)
                        if best is None or result.depth > best.depth:
                            stats.near_miss[rule.name] = result
                        continue
                    if not rule.apply(result):
                        stats.near_miss.setdefault(rule.name, Attempt(
                            node, len(result.matched), "the value must stay a graph output under its own name"))
                        continue
                    stats.fired[rule.name] = stats.fired.get(rule.name, 0) + 1
                    changed = True
                    break
        if not changed:
            break
    if stats.fired and _has_untyped(graph):
        infer_shapes(graph)
    return stats


def _has_untyped(graph: Graph) -> bool:
    return any(o.name and (o.dtype is None or o.shape is None) for n in graph.walk_nodes() for o in n.outputs)


@dataclass(repr=False)
class RewritePass(Pass):
    """Applies a rule set; its details are the rules' fire counts."""

    rule_set: RuleSet | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.rule_set.name if self.rule_set else "rewrite"

    def run(self, graph: Graph) -> PassResult:
        assert self.rule_set is not None
        stats = apply_rules(graph, self.rule_set.ordered())
        return PassResult.of(graph, sum(stats.fired.values()), stats.fired)


def register_rule_set(name: str, rules: Sequence[RewriteRule]) -> RuleSet:
    """Register ``rules`` and a pass named ``name`` that applies them (``--passes name``)."""
    from kiln.passes.manager import register_pass_factory

    for r in rules:
        register_rule(r)
    rule_set = RuleSet(name, list(rules))
    register_pass_factory(name, lambda: RewritePass(rule_set=rule_set))
    return rule_set


def explain(graph: Graph, rule_name: str) -> str:
    """Why ``rule_name`` does or does not fire on ``graph``: its fire count or nearest miss."""
    rule = RULES.get(rule_name)
    if rule is None:
        known = ", ".join(sorted(RULES))
        raise KeyError(f"no rule named '{rule_name}'; known rules: {known}")
    best: Attempt | None = None
    fires = 0
    for node in graph.walk_nodes():
        if node.op_type != rule.root.node.op_type or node.domain != rule.root.node.domain:
            continue
        result = rule.try_match(node)
        if isinstance(result, Attempt):
            if best is None or result.depth > best.depth:
                best = result
        else:
            fires += 1
    if fires:
        return f"rule '{rule_name}' matches {fires} place(s) in this graph"
    if best is None:
        return f"rule '{rule_name}' never came close: the graph has no {rule.root.node.op_type} node"
    return f"rule '{rule_name}' nearest miss at {best.root.label()}: {best.reason}"


def example_graph(
    name: str,
    inputs: dict[str, tuple[DType, tuple[int, ...]]],
    build: Callable[..., Value | Sequence[Value]],
    *,
    opset: int = 17,
) -> Graph:
    """A small graph for a rule's ``example``: ``build(op, *inputs)`` returns its outputs.

    ``op`` is a :class:`RewriteBuilder` (``op.Conv(...)``, ``op.constant(array)``).
    """
    g = Graph(name, opset={"": opset})
    values = [g.add_input(n, dt, shape) for n, (dt, shape) in inputs.items()]
    outs = build(RewriteBuilder(g, None), *values)
    g.outputs.extend(iter_outputs(outs))
    infer_shapes(g)
    return g
