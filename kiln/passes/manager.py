"""Passes, their registry, and the pass manager.

A pass is a class with a ``name`` and ``run(graph) -> PassResult``; register it
with :func:`register_pass`. Parameterised passes are dataclasses whose fields
are their parameters (``--passes fold-constants`` builds one with defaults).

The :class:`PassManager` runs a list of passes repeatedly until none of them
changes the graph (a fixed point), timing each pass and counting its changes.
With ``verify_each`` it runs ``Graph.verify()`` after every pass; when a pass
fails, the error names it and the passes that ran before it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Sequence

from kiln.errors import KilnError, VerifyError
from kiln.ir import Graph


class PassError(KilnError):
    """A pass failed; the message names the pass and the ones that ran before it."""


@dataclass
class PassResult:
    """What a pass did: the (possibly new) graph, and how many changes it made."""

    graph: Graph
    changed: bool
    changes: int = 0
    details: dict[str, int] = field(default_factory=dict)  # e.g. rule name -> fire count

    @staticmethod
    def of(graph: Graph, changes: int, details: dict[str, int] | None = None) -> PassResult:
        return PassResult(graph, changes > 0, changes, dict(details or {}))


class Pass:
    """Base class of kiln passes: set ``name``, implement ``run``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def run(self, graph: Graph) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        """``name(param=value, ...)`` with the pass's plain parameters, or just ``name``."""
        if dataclasses.is_dataclass(self):
            params = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                               if isinstance(getattr(self, f.name), int | float | str | bool))
            return f"{self.name}({params})" if params else self.name
        return self.name


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


def get_pass(name: str) -> Pass:
    """A pass instance with default parameters, by registered name."""
    _load_builtin_passes()
    factory = PASSES.get(name)
    if factory is None:
        known = ", ".join(sorted(PASSES)) or "none"
        raise PassError(f"no pass named '{name}'; known passes: {known}")
    return factory()


def _load_builtin_passes() -> None:
    """Import the modules that register kiln's own passes."""
    from kiln.passes import pipeline  # noqa: F401 - registration side effect


@dataclass
class PassStats:
    """Per-pass accounting across a pipeline run."""

    name: str
    runs: int = 0
    changes: int = 0
    seconds: float = 0.0
    details: dict[str, int] = field(default_factory=dict)


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
    ):
        self.passes = list(passes)
        self.max_iterations = max_iterations
        self.verify_each = verify_each
        self.print_after = set(print_after)
        self.printer = printer

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
                graph = result.graph
                ran.append(p.name)
                if self.verify_each:
                    try:
                        graph.verify()
                    except VerifyError as e:
                        raise PassError(f"graph is invalid after pass '{p.name}'{_after(ran[:-1])}: {e}") from e
                if p.name in self.print_after:
                    self.printer(f"# after {p.name} (iteration {iterations})\n{graph}")
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
