"""Rewrite rules, rule sets, and the pass that applies a rule set.

:func:`register_rule_set` registers rules by name and a pass that applies them.
Every rule carries an ``example``: a function that builds a small graph the rule
fires on. The verified-rewrite test runs each example before and after the rule,
through kiln's evaluator and through onnxruntime, and a rule without an example
fails that test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from kiln.ir import DType, Graph, Node, Value, infer_shapes, is_unknown_dim, reinfer_if_untyped
from kiln.passes.manager import NearMiss, Pass, PassResult, RuleRun, register_pass_factory
from kiln.passes.pattern import (
    Attempt, Match, MatchContext, MatchFailure, Out, RewriteBuilder, build_pattern, call_with_bindings,
    iter_outputs, match,
)


@dataclass
class RewriteRule:
    """One rule: ``pattern(op, *vars)``, optional ``check(ctx, **b)``, ``rewrite(op, **b)``.

    ``check`` returns None, or raises :class:`MatchFailure` with the reason the match
    must not be used. ``priority`` orders overlapping rules (higher first).
    ``example()`` returns a small graph the rule fires on; ``rtol``/``atol`` are the
    float32 tolerances its verification uses.
    """

    name: str
    pattern: Callable[..., Any]
    rewrite: Callable[..., Any]
    check: Callable[..., None] | None = None
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
            self._root = build_pattern(self.pattern)
        return self._root

    @property
    def root_op(self) -> str:
        """The op the pattern is rooted at: ``Add``, or ``kiln::FusedConv``."""
        node = self.root.node
        return f"{node.domain}::{node.op_type}" if node.domain else node.op_type

    def try_match(self, node: Node) -> Match | Attempt:
        """Structural match at ``node``, then the rule's check (a MatchFailure is the failed attempt)."""
        result = match(self.root, node)
        if isinstance(result, Attempt) or self.check is None:
            return result
        assert node.graph is not None
        ctx = MatchContext(node.graph, node, result.matched)
        try:
            verdict = call_with_bindings(self.check, ctx, result.bindings())
        except MatchFailure as f:
            return Attempt(node, len(result.matched) + 1, f"check failed: {f.reason}")
        if verdict is not None:
            raise TypeError(f"the check of rule '{self.name}' returned {verdict!r}; a check returns None "
                            "and raises MatchFailure(reason) when the match must not be used")
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
    """What :func:`apply_rules` did: fire counts, and every rule's nearest miss (for ``--explain``)."""

    fired: dict[str, int] = field(default_factory=dict)
    roots: dict[str, str] = field(default_factory=dict)  # every rule tried -> the op its pattern is rooted at
    misses: dict[str, dict[int, Attempt]] = field(default_factory=dict)  # rule -> id(root node) -> latest miss

    @property
    def near_miss(self) -> dict[str, Attempt]:
        """Each rule's deepest failed attempt (the latest one at each node), at a node where it did not fire afterwards."""
        out: dict[str, Attempt] = {}
        for name, by_node in self.misses.items():
            for a in by_node.values():
                if name not in out or a.depth > out[name].depth:
                    out[name] = a
        return out

    def runs(self) -> dict[str, RuleRun]:
        """Every rule tried, as the pass manager reports it."""
        misses = self.near_miss
        return {name: RuleRun(root, self.fired.get(name, 0),
                              NearMiss(misses[name].root.label(), misses[name].reason, misses[name].depth)
                              if name in misses else None)
                for name, root in self.roots.items()}

    def _missed(self, rule: str, attempt: Attempt) -> None:
        # the latest attempt at a node says why it fails there now; the attempt holds the node, so its id stays unique
        self.misses.setdefault(rule, {})[id(attempt.root)] = attempt

    def _fired(self, rule: str, node: Node) -> None:
        self.fired[rule] = self.fired.get(rule, 0) + 1
        self.misses.get(rule, {}).pop(id(node), None)


def apply_rules(graph: Graph, rules: list[RewriteRule], *, max_rounds: int = 20,
                stats: RewriteStats | None = None) -> RewriteStats:
    """Apply ``rules`` everywhere in ``graph`` (and subgraphs) until none matches.

    Pass ``stats`` to accumulate over several calls (a miss at a node where the rule fires
    in a later call is then forgotten).
    """
    stats = stats if stats is not None else RewriteStats()
    ordered = sorted(rules, key=lambda r: -r.priority)
    by_op: dict[tuple[str, str], list[RewriteRule]] = {}
    for r in ordered:
        stats.roots.setdefault(r.name, r.root_op)
        by_op.setdefault((r.root.node.domain, r.root.node.op_type), []).append(r)
    fired = False
    for _ in range(max_rounds):
        changed = False
        for g in list(graph.walk_graphs()):
            for node in g.nodes:
                if node.graph is not g:
                    continue  # removed by an earlier rewrite in this sweep
                for rule in by_op.get((node.domain, node.op_type), ()):
                    result = rule.try_match(node)
                    if isinstance(result, Attempt):
                        stats._missed(rule.name, result)
                        continue
                    if not rule.apply(result):
                        stats._missed(rule.name, Attempt(node, len(result.matched),
                                                         "the value must stay a graph output under its own name"))
                        continue
                    stats._fired(rule.name, node)
                    changed = fired = True
                    break
        if not changed:
            break
    if fired:
        reinfer_if_untyped(graph)
    return stats


@dataclass(repr=False)
class RewritePass(Pass):
    """Applies a rule set; its details are the rules' fire counts, its rules their runs."""

    rule_set: RuleSet | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.rule_set.name if self.rule_set else "rewrite"

    def rule_names(self) -> list[str]:
        """The names of the rules in the rule set."""
        return [r.name for r in self.rule_set.rules] if self.rule_set else []

    def run(self, graph: Graph) -> PassResult:
        assert self.rule_set is not None
        stats = apply_rules(graph, self.rule_set.ordered())
        return PassResult.of(graph, sum(stats.fired.values()), stats.fired, stats.runs())


def register_rule_set(name: str, rules: Sequence[RewriteRule]) -> RuleSet:
    """Register ``rules`` and a pass named ``name`` that applies them (``--passes name``)."""
    for r in rules:
        register_rule(r)
    rule_set = RuleSet(name, list(rules))
    register_pass_factory(name, lambda: RewritePass(rule_set=rule_set))
    return rule_set


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
