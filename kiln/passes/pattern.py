"""The pattern-rewrite engine: rules as pattern, check and rewrite functions.

A rule is three small functions::

    def pattern(op, x, scale, bias, mean, var, w=Const(), b=Const()):
        return op.BatchNormalization(op.Conv(x, w, Optional(b), _name="conv"), scale, bias, mean, var)

    def check(ctx, scale, bias, mean, var) -> None:
        if not all(v.is_constant for v in (scale, bias, mean, var)):
            raise MatchFailure("the BN statistics are not constants")

    def rewrite(op, x, w, b, conv, ...):
        return op.Conv(x, op.constant(new_w), op.constant(new_b), **conv.attrs)

The pattern's parameters (after ``op``) are exactly the variables it binds: a
parameter without a default matches any value (``Var``), one whose default is
``Const()`` only a constant, and ``Var(where=pred)`` / ``Const(where=pred)`` add a
condition. The engine makes one variable per parameter, named after it, and
refuses a pattern that uses a variable it was not given or leaves a parameter
unused. ``op.Conv(...)`` matches a node, with attribute predicates as keyword
arguments (a value, or a callable), ``Optional(pat)`` for optional inputs,
``_outputs=n`` for multi-output nodes and ``_name=`` to bind the matched node
itself. Add and Mul match in either input order. Nodes inside a match may not be
read from outside it, unless their pattern says ``_shared=True`` (the rewrite then
leaves them for their other users).

``check`` and ``rewrite`` receive only the bindings they name. ``check`` returns
None when the match may be used and raises :class:`MatchFailure` (from itself or
any helper it calls) when not. The engine never changes a constant in place:
``op.constant(array)`` always makes a new one.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from kiln.ir import Graph, Node, Value
from kiln.ir.schemas import coerce_attrs

COMMUTATIVE = frozenset({"Add", "Mul", "Max", "Min", "Sum", "And", "Or", "Xor", "Equal"})


# =========================================================================== check failures


class MatchFailure(Exception):
    """Raised by a rule's ``check`` (or a helper it calls): the match must not be used, and why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# =========================================================================== patterns


class Pat:
    """A pattern for one value."""


@dataclass(eq=False)
class Var(Pat):
    """Matches any value (the same value wherever it recurs); ``where`` filters it.

    As a pattern parameter's default it gives the parameter's kind and condition
    (``x=Var(where=lambda v: v.rank == 4)``); the engine names it after the parameter.
    """

    name: str | None = None
    where: Callable[[Value], bool] | None = None


@dataclass(eq=False)
class Const(Var):
    """Matches only a constant value."""


@dataclass(eq=False)
class Optional(Pat):
    """An optional input: matches an absent input, or a value matching ``pat``."""

    pat: Pat


@dataclass(eq=False)
class NodePat:
    """Matches one node: op type and domain, inputs, attribute predicates."""

    op_type: str
    domain: str
    inputs: list[Pat]
    attrs: dict[str, Any]
    num_outputs: int
    name: str | None
    allow_extra_inputs: bool = False
    shared: bool = False  # the node may also feed nodes outside the match (it stays for them)


@dataclass(eq=False)
class Out(Pat):
    """Output ``index`` of a node pattern."""

    node: NodePat
    index: int = 0


class PatternBuilder:
    """The ``op`` handed to pattern functions: ``op.Conv(x, w)`` builds a node pattern."""

    def __init__(self, domain: str = ""):
        self._domain = domain

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def build(*inputs: Pat, _domain: str | None = None, _outputs: int = 1, _name: str | None = None,
                  _allow_extra_inputs: bool = False, _shared: bool = False, **attrs: Any) -> Any:
            for i in inputs:
                if not isinstance(i, Pat):
                    raise TypeError(f"input of pattern op.{op_type} must be a pattern, got {i!r}")
            node = NodePat(op_type, self._domain if _domain is None else _domain, list(inputs), attrs, _outputs,
                           _name, _allow_extra_inputs, _shared)
            if _outputs == 1:
                return Out(node, 0)
            return tuple(Out(node, i) for i in range(_outputs))

        return build

    @property
    def kiln(self) -> PatternBuilder:
        """``op.kiln.FusedConv(...)``: patterns over kiln-domain ops."""
        return PatternBuilder("kiln")


def build_pattern(fn: Callable[..., Any]) -> Out:
    """Call a pattern function with one variable per parameter; return its root.

    A parameter without a default becomes ``Var(name)``; one whose default is a ``Var``
    (or ``Const``) becomes a copy of it with the parameter's name. The variables the built
    pattern uses must be exactly these (by identity), else ``TypeError``.
    """
    label = getattr(fn, "__qualname__", repr(fn))
    args: list[Var] = []
    kwargs: dict[str, Var] = {}
    for p in list(inspect.signature(fn).parameters.values())[1:]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise TypeError(f"pattern {label}: *{p.name} is not allowed; name each variable as a parameter")
        if p.default is inspect.Parameter.empty:
            var = Var(p.name)
        elif isinstance(p.default, Var):
            if p.default.name not in (None, p.name):
                raise TypeError(f"pattern {label}: parameter '{p.name}' has a default named '{p.default.name}'")
            var = dataclasses.replace(p.default, name=p.name)
        else:
            raise TypeError(f"pattern {label}: the default of parameter '{p.name}' must be Var(...) or Const(...), "
                            f"got {p.default!r}")
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            kwargs[p.name] = var
        else:
            args.append(var)
    root = fn(PatternBuilder(), *args, **kwargs)
    if isinstance(root, tuple):
        raise TypeError(f"pattern {label} must return a single node output (the root)")
    if not isinstance(root, Out):
        raise TypeError(f"pattern {label} must return op.Something(...), got {root!r}")
    given = {id(v): v for v in [*args, *kwargs.values()]}
    used = {id(v): v for v in _variables(root)}
    stray = [v for k, v in used.items() if k not in given]
    unused = [v.name for k, v in given.items() if k not in used]
    if stray:
        names = ", ".join(f"{type(v).__name__}({v.name!r})" if v.name else f"an unnamed {type(v).__name__}"
                          for v in stray)
        raise TypeError(f"pattern {label} binds {names}, which is not one of its parameters; make every variable "
                        "a parameter (w=Const() for a constant)")
    if unused:
        raise TypeError(f"pattern {label} does not use its parameter(s) {', '.join(unused)}")
    return root


def _variables(pat: Pat) -> Iterator[Var]:
    """Every variable object under ``pat`` (with repeats)."""
    if isinstance(pat, Var):
        yield pat
    elif isinstance(pat, Optional):
        yield from _variables(pat.pat)
    elif isinstance(pat, Out):
        for i in pat.node.inputs:
            yield from _variables(i)


# =========================================================================== matching


@dataclass
class Match:
    """A successful structural match: bindings, and the matched nodes (root last)."""

    root: Node
    values: dict[str, Value | None]
    nodes: dict[str, Node]
    matched: list[Node]
    shared: frozenset[int] = frozenset()  # ids of matched nodes whose pattern allows outside uses

    def bindings(self) -> dict[str, Any]:
        return {**self.values, **self.nodes}


@dataclass
class Attempt:
    """A failed match attempt: how far it got (matched nodes) and why it stopped."""

    root: Node
    depth: int
    reason: str


class _Fail(Exception):
    def __init__(self, reason: str, depth: int):
        super().__init__(reason)
        self.reason, self.depth = reason, depth


@dataclass
class _State:
    values: dict[str, Value | None] = field(default_factory=dict)
    nodes: dict[int, Node] = field(default_factory=dict)  # id(NodePat) -> Node
    order: list[Node] = field(default_factory=list)

    def copy(self) -> _State:
        return _State(dict(self.values), dict(self.nodes), list(self.order))


def match(root_pat: Out, node: Node) -> Match | Attempt:
    """Match ``root_pat`` with its root at ``node``."""
    state = _State()
    try:
        _match_node(root_pat.node, node, state)
        if root_pat.index != 0 and len(node.outputs) <= root_pat.index:
            raise _Fail(f"{node.label()} has no output {root_pat.index}", 0)
    except _Fail as f:
        return Attempt(node, f.depth, f.reason)
    named = {}
    for pat_id, n in state.nodes.items():
        name = _node_names(root_pat).get(pat_id)
        if name:
            named[name] = n
    matched = [n for n in node.graph.nodes if any(n is m for m in state.order)] if node.graph else state.order
    shared = frozenset(id(n) for pid, n in state.nodes.items() if pid in _shared_patterns(root_pat))
    m = Match(node, state.values, named, matched, shared)
    problem = _check_containment(m)
    if problem:
        return Attempt(node, len(matched), problem)
    return m


def _shared_patterns(root: Out) -> set[int]:
    """ids of the node patterns marked ``_shared=True`` under ``root``."""
    found: set[int] = set()

    def walk(p: Pat) -> None:
        if isinstance(p, Optional):
            walk(p.pat)
        elif isinstance(p, Out):
            if p.node.shared:
                found.add(id(p.node))
            for i in p.node.inputs:
                walk(i)

    walk(root)
    return found


def _node_names(root: Out) -> dict[int, str]:
    names: dict[int, str] = {}

    def walk(p: Pat) -> None:
        if isinstance(p, Optional):
            walk(p.pat)
        elif isinstance(p, Out):
            if p.node.name:
                names[id(p.node)] = p.node.name
            for i in p.node.inputs:
                walk(i)

    walk(root)
    return names


def _describe(v: Value) -> str:
    if v.is_constant:
        return f"constant %{v.name}"
    if v.producer is not None:
        return f"%{v.name} from {v.producer.qualified_op}"
    return f"graph input %{v.name}"


def _match_value(pat: Pat, v: Value | None, state: _State, where: str) -> None:
    depth = len(state.order)
    if isinstance(pat, Optional):
        if v is None:
            for var in _variables(pat.pat):  # variables of an absent optional input are None
                state.values.setdefault(var.name, None)
            return
        _match_value(pat.pat, v, state, where)
        return
    if v is None:
        raise _Fail(f"{where} is absent", depth)
    if isinstance(pat, Var):
        if isinstance(pat, Const) and not v.is_constant:
            raise _Fail(f"{where}: '{pat.name}' must be a constant, got {_describe(v)}", depth)
        if pat.name in state.values:
            if state.values[pat.name] is not v:
                raise _Fail(f"{where}: '{pat.name}' is bound to %{state.values[pat.name].name}, got %{v.name}", depth)
            return
        if pat.where is not None and not pat.where(v):
            raise _Fail(f"{where}: %{v.name} does not satisfy the condition on '{pat.name}'", depth)
        state.values[pat.name] = v
        return
    if isinstance(pat, Out):
        producer = v.producer
        if producer is None:
            raise _Fail(f"{where}: expected the output of {pat.node.op_type}, got {_describe(v)}", depth)
        if v.index != pat.index:
            raise _Fail(f"{where}: expected output {pat.index} of {pat.node.op_type}, got output {v.index}", depth)
        _match_node(pat.node, producer, state)
        return
    raise TypeError(f"unknown pattern {pat!r}")


def _match_node(pat: NodePat, node: Node, state: _State) -> None:
    depth = len(state.order)
    seen = state.nodes.get(id(pat))
    if seen is not None:
        if seen is not node:
            raise _Fail(f"{pat.op_type} must be one node, found two", depth)
        return
    if node.op_type != pat.op_type or node.domain != pat.domain:
        want = pat.op_type if not pat.domain else f"{pat.domain}::{pat.op_type}"
        raise _Fail(f"expected {want}, got {node.label()}", depth)
    if any(n is node for n in state.order):
        raise _Fail(f"{node.label()} would match two pattern nodes", depth)
    if len(node.outputs) < pat.num_outputs:
        raise _Fail(f"{node.label()} has {len(node.outputs)} outputs, pattern needs {pat.num_outputs}", depth)
    for name, want in pat.attrs.items():
        have = node.attr(name)
        ok = want(have) if callable(want) else _attr_equal(have, want)
        if not ok:
            raise _Fail(f"{node.label()} attribute {name}={have!r} does not match the pattern", depth)
    n_actual = len(node.inputs)
    while n_actual and node.inputs[n_actual - 1] is None:
        n_actual -= 1
    if n_actual > len(pat.inputs) and not pat.allow_extra_inputs:
        raise _Fail(f"{node.label()} has {n_actual} inputs, the pattern expects {len(pat.inputs)}", depth)
    state.nodes[id(pat)] = node
    state.order.append(node)
    orders = [list(range(len(pat.inputs)))]
    if node.op_type in COMMUTATIVE and len(pat.inputs) == 2 and node.domain == "":
        orders.append([1, 0])
    last: _Fail | None = None
    for order in orders:
        trial = state.copy()
        try:
            for pi, ni in enumerate(order):
                _match_value(pat.inputs[pi], node.input(ni), trial, f"{node.label()} input {ni}")
        except _Fail as f:
            if last is None or f.depth >= last.depth:
                last = f
            continue
        state.values, state.nodes, state.order = trial.values, trial.nodes, trial.order
        return
    assert last is not None
    raise last


def _attr_equal(have: Any, want: Any) -> bool:
    if isinstance(have, tuple) and isinstance(want, list | tuple):
        return tuple(have) == tuple(want)
    return have == want


def _check_containment(m: Match) -> str:
    """Intermediate values of the match must not be read outside it, nor be graph outputs.

    A node matched by a ``_shared=True`` pattern may be: the rewrite leaves it for its other users.
    """
    inside = {id(n) for n in m.matched}
    for n in m.matched:
        if n is m.root or id(n) in m.shared:
            continue
        for o in n.outputs:
            if o.is_graph_output:
                return f"%{o.name} (from {n.qualified_op}) is a graph output, so {n.qualified_op} cannot be fused away"
            for u in o.uses:
                if id(u.node) not in inside:
                    return f"%{o.name} (from {n.qualified_op}) is also used by {u.node.label()}"
    return ""


# =========================================================================== rewriting


class RewriteBuilder:
    """The ``op`` handed to rewrite functions: ``op.Conv(...)`` adds a node before the match root."""

    def __init__(self, graph: Graph, anchor: Node | None, domain: str = ""):
        self._graph = graph
        self._anchor = anchor
        self._domain = domain
        self.created: list[Node] = []

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def build(*inputs: Value | None, _domain: str | None = None, _outputs: int = 1, _name: str = "",
                  **attrs: Any) -> Any:
            domain = self._domain if _domain is None else _domain
            typed = coerce_attrs(domain, op_type, attrs, self._graph.model_opset.get(domain))
            node = Node(op_type, list(inputs), typed, domain=domain, outputs=_outputs, name=_name)
            if self._anchor is not None:
                self._graph.insert_before(self._anchor, node)
            else:
                self._graph.append(node)
            self.created.append(node)
            return node.outputs[0] if _outputs == 1 else tuple(node.outputs)

        return build

    @property
    def kiln(self) -> RewriteBuilder:
        """``op.kiln.FusedConv(...)``: build kiln-domain ops."""
        sub = RewriteBuilder(self._graph, self._anchor, "kiln")
        sub.created = self.created
        return sub

    @property
    def opset(self) -> int:
        """The model's ``ai.onnx`` opset version, for rewrites that emit a standard op where it exists."""
        return self._graph.model_opset.get("", 0)

    def constant(self, array: Any, name: str = "const") -> Value:
        """A new constant (never a change to an existing one)."""
        return self._graph.add_constant(np.asarray(array), name)


def call_with_bindings(fn: Callable[..., Any], first: Any, bindings: dict[str, Any]) -> Any:
    """Call ``fn(first, ...)`` passing only the bindings it names (all of them if it takes ``**kw``)."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return fn(first, **bindings)
    missing = [p.name for p in params if p.name not in bindings and p.default is inspect.Parameter.empty]
    if missing:
        raise TypeError(f"{fn.__name__}() asks for {', '.join(missing)}, which the pattern does not bind")
    return fn(first, **{p.name: bindings[p.name] for p in params if p.name in bindings})


@dataclass
class MatchContext:
    """What ``check`` receives first: the graph and the match."""

    graph: Graph
    root: Node
    nodes: list[Node]


def copy_attrs(node: Node, *drop: str, **overrides: Any) -> dict[str, Any]:
    """A node's attributes as plain values, minus ``drop``, with ``overrides``; for rewrites."""
    out: dict[str, Any] = {k: a.value for k, a in node.attrs.items() if k not in drop}
    out.update(overrides)
    return out


def iter_outputs(result: Value | Sequence[Value]) -> Iterator[Value]:
    """A rewrite's result as a sequence of values."""
    if isinstance(result, Value):
        yield result
    else:
        yield from result


__all__ = [
    "Attempt", "Const", "Match", "MatchContext", "MatchFailure", "Optional", "PatternBuilder",
    "RewriteBuilder", "Var", "build_pattern", "call_with_bindings", "copy_attrs", "match",
]
