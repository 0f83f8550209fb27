"""Passes, their registry, pass specs, and the pass manager.

A pass is a class with a ``name`` and ``run(graph) -> PassResult``; register it
with :func:`register_pass`. Parameterised passes are dataclasses whose fields
are their parameters. A *pass spec* names passes and sets fields, as xDSL's
``PassPipeline`` does::

    layout{block=8},fold-constants,dce

:func:`parse_passes` builds the passes of a spec, and ``Pass.describe()`` writes a
pass back in the same syntax.

The :class:`PassManager` runs a list of passes repeatedly until none of them
changes the graph (a fixed point), timing each pass and counting its changes.
With ``verify_each`` it runs ``Graph.verify()`` after every pass; when a pass
fails, the error names it and the passes that ran before it. Its
:class:`PipelineReport` keeps, per pass, each rule's fire count and nearest miss,
and ``report.explain(rule)`` answers from that run why a rule did or did not fire.

This module imports no pass: the pass files register into it, and importing
``kiln.passes`` imports them all.
"""

from __future__ import annotations

import dataclasses
import re
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Sequence

from kiln.errors import KilnError, VerifyError
from kiln.ir import Graph


class PassError(KilnError):
    """A pass failed, or a pass spec or rule name is wrong; the message says which."""


# =========================================================================== results


@dataclass(frozen=True)
class NearMiss:
    """A rule's deepest failed match: at which node (``'name' (Op)``), why, and how deep it got."""

    node: str
    reason: str
    depth: int
    iteration: int = 0  # the pipeline iteration it came from (set by the PassManager)


@dataclass
class RuleRun:
    """What one rule did in a pass: the op its pattern is rooted at, its fire count, its nearest miss."""

    root_op: str
    fired: int = 0
    miss: NearMiss | None = None

    def merge(self, other: RuleRun) -> None:
        """Add ``other``'s fires (a later run of the pass); keep the deeper miss, the later one on a tie."""
        self.fired += other.fired
        if other.miss is not None and (self.miss is None or other.miss.depth >= self.miss.depth):
            self.miss = other.miss


@dataclass
class PassResult:
    """What a pass did: the (possibly new) graph, how many changes it made, and its rules' runs."""

    graph: Graph
    changed: bool
    changes: int = 0
    details: dict[str, int] = field(default_factory=dict)  # e.g. rule name -> fire count
    rules: dict[str, RuleRun] = field(default_factory=dict)  # every rule the pass tried

    @staticmethod
    def of(graph: Graph, changes: int, details: dict[str, int] | None = None,
           rules: dict[str, RuleRun] | None = None) -> PassResult:
        """A result that changed the graph iff ``changes`` > 0."""
        return PassResult(graph, changes > 0, changes, dict(details or {}), dict(rules or {}))


# =========================================================================== passes and specs


class Pass:
    """Base class of kiln passes: set ``name``, implement ``run``."""

    name: ClassVar[str] = ""

    def run(self, graph: Graph) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def rule_names(self) -> list[str]:
        """The rewrite rules this pass applies (for ``PipelineReport.explain``); none by default."""
        return []

    def __repr__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        """The pass as a spec item: ``name{field=value,...}`` with its settable fields, or just ``name``."""
        params = ",".join(f"{k}={_format_value(getattr(self, k))}" for k in spec_fields(self))
        return f"{self.name}{{{params}}}" if params else self.name


#: Registered passes: name -> a factory that builds the pass with default parameters.
PASSES: dict[str, Callable[[], Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name`` (``--passes NAME``)."""
    if not cls.name:
        raise ValueError(f"pass class {cls.__name__} has no name")
    register_pass_factory(cls.name, cls)
    return cls


def register_pass_factory(name: str, factory: Callable[[], Pass]) -> None:
    """Register a pass built by ``factory`` (for passes that are configured instances, like rule sets)."""
    if name in PASSES and PASSES[name] is not factory:
        raise ValueError(f"a pass named '{name}' is already registered")
    PASSES[name] = factory


def get_pass(spec: str) -> Pass:
    """One pass by spec item: a registered name, optionally with fields (``layout{block=8}``)."""
    passes = parse_passes(spec)
    if len(passes) != 1:
        raise PassError(f"pass spec '{spec}' names {len(passes)} passes, not one")
    return passes[0]


_SCALARS: dict[type, str] = {bool: "bool", int: "int", float: "float", str: "str"}
_ITEM = re.compile(r"\s*([^\s{},=]+)\s*(?:\{([^{}]*)\})?\s*")


def spec_fields(p: Pass) -> dict[str, type]:
    """The fields a spec may set on ``p``: its init dataclass fields of type bool, int, float or str."""
    if not dataclasses.is_dataclass(p):
        return {}
    try:
        hints = typing.get_type_hints(type(p))
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: fall back to the default's type
        hints = {}
    out: dict[str, type] = {}
    for f in dataclasses.fields(p):
        t = hints.get(f.name, type(getattr(p, f.name)))
        if f.init and t in _SCALARS:
            out[f.name] = t
    return out


def parse_passes(spec: str) -> list[Pass]:
    """The passes of a spec: comma-separated ``name`` or ``name{field=value,...}`` items.

    Values take the field's type: int, float, bool (true/false/1/0) or str. An unknown
    pass, an unknown field or a bad value raises :class:`PassError` naming the spec.
    """
    return [_build_pass(spec, item) for item in _split_items(spec) if item.strip()]


def _split_items(spec: str) -> list[str]:
    """``spec`` split at its top-level commas (not those inside ``{...}``)."""
    items, start, depth = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "{":
            depth += 1
            if depth > 1:
                raise PassError(f"pass spec '{spec}': braces do not nest; write name{{field=value,...}}")
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PassError(f"pass spec '{spec}': '}}' without '{{'")
        elif ch == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    if depth:
        raise PassError(f"pass spec '{spec}': '{{' without '}}'")
    items.append(spec[start:])
    return items


def _build_pass(spec: str, item: str) -> Pass:
    m = _ITEM.fullmatch(item)
    if m is None:
        raise PassError(f"pass spec '{spec}': cannot read '{item.strip()}'; write name or name{{field=value,...}}")
    name, body = m.group(1), m.group(2)
    factory = PASSES.get(name)
    if factory is None:
        known = ", ".join(sorted(PASSES)) or "none"
        raise PassError(f"pass spec '{spec}': no pass named '{name}'; known passes: {known}")
    p = factory()
    if body is None or not body.strip():
        return p
    fields = spec_fields(p)
    takes = "it takes " + (", ".join(f"{k} ({_SCALARS[t]})" for k, t in fields.items()) or "no fields")
    values: dict[str, Any] = {}
    for param in body.split(","):
        if not param.strip():
            continue
        key, eq, raw = (s.strip() for s in param.partition("="))
        if not eq or not key:
            raise PassError(f"pass spec '{spec}': expected field=value in '{param.strip()}' for pass '{name}'; "
                            f"{takes}")
        if key not in fields:
            raise PassError(f"pass spec '{spec}': pass '{name}' has no field '{key}'; {takes}")
        try:
            values[key] = _parse_value(raw, fields[key])
        except ValueError:
            raise PassError(f"pass spec '{spec}': {key}={raw!r} is not a valid {_SCALARS[fields[key]]} for pass "
                            f"'{name}'; {takes}") from None
    return dataclasses.replace(p, **values)  # type: ignore[type-var]


def _parse_value(raw: str, t: type) -> Any:
    if t is bool:
        low = raw.lower()
        if low in ("true", "1"):
            return True
        if low in ("false", "0"):
            return False
        raise ValueError(raw)
    if t is str:
        return raw
    return t(raw)


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


# =========================================================================== the pass manager


@dataclass
class PassStats:
    """Per-pass accounting across a pipeline run: runs, changes, time, counts and each rule's run."""

    name: str
    runs: int = 0
    changes: int = 0
    seconds: float = 0.0
    details: dict[str, int] = field(default_factory=dict)
    rules: dict[str, RuleRun] = field(default_factory=dict)


@dataclass
class PipelineReport:
    """What a pipeline run did: iterations to the fixed point, and per-pass stats."""

    iterations: int
    stats: dict[str, PassStats]
    nodes_before: int
    nodes_after: int

    def rule_counts(self) -> dict[str, int]:
        """Every rule's fire count, summed over the passes."""
        total: dict[str, int] = {}
        for s in self.stats.values():
            for k, v in s.details.items():
                total[k] = total.get(k, 0) + v
        return total

    def explain(self, rule_name: str) -> str:
        """Why ``rule_name`` did or did not fire in this run: per pass, its fire count and nearest miss.

        Raises :class:`PassError` for a rule no pass of this run or of the registry applies.
        """
        ran = [(name, s.rules[rule_name]) for name, s in self.stats.items() if rule_name in s.rules]
        if not ran:
            holders = [name for name, rules in _registered_rules().items() if rule_name in rules]
            if not holders:
                known = sorted({r for s in self.stats.values() for r in s.rules}
                               | {r for rules in _registered_rules().values() for r in rules})
                raise PassError(f"no rule named '{rule_name}'; known rules: {', '.join(known) or 'none'}")
            here = ", ".join(f"'{n}'" for n in self.stats) or "none"
            there = ", ".join(f"'{n}'" for n in holders)
            return (f"rule '{rule_name}' did not run: no pass of this pipeline ({here}) applies it; "
                    f"it runs in pass{'es' if len(holders) > 1 else ''} {there}")
        clauses = []
        for name, run in ran:
            clause = f"fired {run.fired} time(s) in pass '{name}'" if run.fired else f"did not fire in pass '{name}'"
            if run.miss is not None:
                clause += f"; nearest miss in pass '{name}' at {run.miss.node}: {run.miss.reason}"
            elif not run.fired:
                clause += f"; never came close: no {run.root_op} node was there when pass '{name}' ran"
            clauses.append(clause)
        return f"rule '{rule_name}' " + "; ".join(clauses)


def _registered_rules() -> dict[str, list[str]]:
    """Registered pass name -> the rules it applies."""
    return {name: factory().rule_names() for name, factory in PASSES.items()}


class PassManager:
    """Runs passes to a fixed point, with timing, change counts and optional checks."""

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        max_iterations: int = 10,
        verify_each: bool = False,
        print_after: Iterable[str] = (),
        printer: Callable[[str], None] = print,
        on_pass: Callable[[Pass, int, Graph, PassResult], None] | None = None,
    ):
        self.passes = list(passes)
        self.max_iterations = max_iterations
        self.verify_each = verify_each
        self.print_after = set(print_after)
        self.printer = printer
        self.on_pass = on_pass  # told (pass, iteration, graph after it, result) after every pass run: bisection

    def run(self, graph: Graph) -> tuple[Graph, PipelineReport]:
        """Run the passes until none changes the graph; return the graph and a report."""
        stats = {p.name: PassStats(p.name) for p in self.passes}
        ran: list[str] = []
        before = _count_nodes(graph)
        iterations = 0
        for iterations in range(1, self.max_iterations + 1):
            changed = False
            for p in self.passes:
                start = time.perf_counter()
                try:
                    result = p.run(graph)
                except KilnError as e:
                    raise PassError(f"pass '{p.name}' failed{_after(ran)}: {e}") from e
                except Exception as e:  # noqa: BLE001 - a bug in a pass: still name it
                    raise PassError(f"pass '{p.name}' failed{_after(ran)}: {type(e).__name__}: {e}") from e
                s = stats[p.name]
                s.seconds += time.perf_counter() - start
                s.runs += 1
                s.changes += result.changes
                for k, v in result.details.items():
                    s.details[k] = s.details.get(k, 0) + v
                for rule, run in result.rules.items():
                    miss = dataclasses.replace(run.miss, iteration=iterations) if run.miss else None
                    s.rules.setdefault(rule, RuleRun(run.root_op)).merge(RuleRun(run.root_op, run.fired, miss))
                graph = result.graph
                ran.append(p.name)
                if self.verify_each:
                    try:
                        graph.verify()
                    except VerifyError as e:
                        raise PassError(f"graph is invalid after pass '{p.name}'{_after(ran[:-1])}: {e}") from e
                if p.name in self.print_after:
                    self.printer(f"# after {p.name} (iteration {iterations})\n{graph}")
                if self.on_pass is not None:
                    self.on_pass(p, iterations, graph, result)
                changed |= result.changed
            if not changed:
                break
        return graph, PipelineReport(iterations, stats, before, _count_nodes(graph))


def _after(ran: list[str]) -> str:
    if not ran:
        return " (it ran first)"
    shown = ran[-8:]
    more = f"{len(ran) - len(shown)} more, " if len(ran) > len(shown) else ""
    return f" (after {more}{', '.join(shown)})"


def _count_nodes(graph: Graph) -> int:
    return sum(1 for _ in graph.walk_nodes())
