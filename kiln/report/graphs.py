"""Pictures of a graph: Graphviz DOT with long linear chains collapsed, rendered to SVG by ``dot``.

A chain is a run of nodes where each feeds only the next and the next reads only it (constants
aside): ``Conv -> Sigmoid -> Mul``. Chains of at least :data:`MIN_CHAIN` nodes become one box
that lists their ops, so a 500-node CNN draws as a few hundred boxes whose branches and joins
(residual adds, concats) stay visible. Every box says its op (or ops) and output shape; hovering
it shows the node names.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from kiln.errors import KilnError
from kiln.ir import Graph, Node, Value

MIN_CHAIN = 3  # chains at least this long become one box
MAX_REGION = 4  # the most nodes a single-entry single-exit region may hold to count as one link of a chain
SHOWN_OPS = 4  # a collapsed box lists this many ops (the first ones, then the last)
DOT_TIMEOUT = 120

#: Fill colours by op family (the legend in the report uses the same).
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "conv": ("#f6c28b", ("Conv", "ConvTranspose", "FusedConv", "BlockedConv", "BF16BlockedConv", "QBlockedConv",
                         "QLinearConv", "ConvInteger")),
    "matmul": ("#f4a3a3", ("Gemm", "MatMul", "FusedGemm", "Attention", "QDense", "MatMulInteger")),
    "norm": ("#d7b8f0", ("BatchNormalization", "LayerNormalization", "LayerNorm", "InstanceNormalization",
                         "Softmax", "LogSoftmax")),
    "pool": ("#b9e3b0", ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax",
                         "ReduceSum", "Resize")),
    "layout": ("#dddddd", ("ToBlocked", "FromBlocked", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
                           "Concat", "Split", "Slice", "Gather", "Expand", "Identity", "Cast")),
}
ELEMENTWISE = "#cfe3f7"


def group_colour(group: list[Node]) -> str:
    """The fill colour of a box: its heaviest op's family (conv, matmul, norm, pool, elementwise, layout)."""
    families = {_family(n) for n in group}
    for name in ("conv", "matmul", "norm", "pool"):
        if name in families:
            return FAMILIES[name][0]
    return ELEMENTWISE if None in families else FAMILIES["layout"][0]


@dataclass
class GraphPicture:
    """One rendered graph: the SVG (or why there is none), and what was drawn."""

    svg: str | None
    nodes: int  # graph nodes
    boxes: int  # boxes drawn (collapsed chains count once)
    chains: int  # chains collapsed
    error: str = ""


def _esc(text: str) -> str:
    """A DOT double-quoted string's contents: backslashes and quotes escaped."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def _lines(lines: list[str]) -> str:
    """Lines of a DOT label: each escaped, joined by DOT's centred line break."""
    return "\\n".join(_esc(line) for line in lines)


def _shape(v: Value | None) -> str:
    if v is None or v.shape is None:
        return "?"
    return "x".join(str(d) for d in v.shape) or "scalar"


def groups(graph: Graph, *, min_nodes: int = MIN_CHAIN, max_region: int = MAX_REGION) -> list[list[Node]]:
    """The graph's nodes in boxes: collapsed chains (of at least ``min_nodes`` nodes), and single nodes.

    First, small single-entry single-exit regions become units: a node and its immediate
    post-dominator, when the node also dominates it, with what lies between (at most
    ``max_region`` nodes: a SiLU's ``x, Sigmoid(x), Mul``). Then chains of units, each feeding
    only the next, which reads only it, merge. A node whose value is a graph output ends a unit.
    """
    import networkx as nx

    dg = graph.to_networkx()
    by_name = {n.name: n for n in graph.nodes}
    position = {n.name: i for i, n in enumerate(graph.nodes)}
    emits = {n.name for n in graph.nodes if any(o.is_graph_output for o in n.outputs)}
    folded = constant_nodes(graph) - emits  # they go into the box of a node that reads them
    dg.remove_nodes_from(folded)
    src, sink = object(), object()
    full = dg.copy()
    full.add_edges_from((src, n) for n in dg.nodes if dg.in_degree(n) == 0)
    full.add_edges_from((n, sink) for n in dg.nodes if dg.out_degree(n) == 0 or n in emits)
    idom = nx.immediate_dominators(full, src)
    ipdom = nx.immediate_dominators(full.reverse(copy=False), sink)

    unit: dict[str, int] = {}
    members: list[list[str]] = []
    for n in graph.nodes:
        if n.name in unit or n.name in folded:
            continue
        region = _region(n.name, full, idom, ipdom, sink, max_region)
        if region is None or any(m in unit for m in region) or any(m in emits for m in region[:-1]):
            region = [n.name]
        for m in region:
            unit[m] = len(members)
        members.append(region)
    succ: dict[int, set[int]] = {i: set() for i in range(len(members))}
    pred: dict[int, set[int]] = {i: set() for i in range(len(members))}
    for a, b in dg.edges:
        if unit[a] != unit[b]:
            succ[unit[a]].add(unit[b])
            pred[unit[b]].add(unit[a])
    for n in reversed(graph.nodes):  # a constant computation joins the unit of its first reader
        if n.name in folded:
            readers = sorted((unit[u.node.name] for o in n.outputs for u in o.uses if u.node.name in unit))
            if readers:
                unit[n.name] = readers[0]
                members[readers[0]].append(n.name)
    out: list[list[Node]] = []
    done: set[int] = set()
    for i in range(len(members)):
        if i in done:
            continue
        if len(pred[i]) == 1 and _links(next(iter(pred[i])), i, succ, pred, members, emits):
            continue  # inside a chain whose head comes earlier
        chain = [i]
        while len(succ[chain[-1]]) == 1:
            nxt = next(iter(succ[chain[-1]]))
            if nxt in done or not _links(chain[-1], nxt, succ, pred, members, emits):
                break
            chain.append(nxt)
        done.update(chain)
        names = sorted((m for u in chain for m in members[u]), key=position.__getitem__)
        if len(names) >= min_nodes:
            out.append([by_name[m] for m in names])
        else:
            out.extend([by_name[m]] for m in names)
    return out


def summarise(ops: list[str]) -> str:
    """A chain's ops in a few words: ``Conv > Sigmoid > Mul``, ``(Conv > Sigmoid > Mul) x3``, or ``A > B > ... > Z``."""
    for size in range(1, SHOWN_OPS + 1):
        if len(ops) > size and len(ops) % size == 0 and ops == ops[:size] * (len(ops) // size):
            unit = " > ".join(ops[:size])
            return f"({unit}) x{len(ops) // size}" if size > 1 else f"{unit} x{len(ops)}"
    if len(ops) <= SHOWN_OPS:
        return " > ".join(ops)
    return " > ".join([*ops[:SHOWN_OPS - 1], "...", ops[-1]])


def constant_nodes(graph: Graph) -> set[str]:
    """The nodes that compute only from constants (before folding: a weight's Unsqueeze), by name."""
    out: set[str] = set()
    for n in graph.nodes:
        if not any(n.subgraphs()) and all(v is None or v.is_constant or (v.producer is not None and v.producer.name in out)
                                          for v in n.inputs):
            out.add(n.name)
    return out


def _links(a: int, b: int, succ: dict[int, set[int]], pred: dict[int, set[int]], members: list[list[str]],
           emits: set[str]) -> bool:
    """Unit ``a`` feeds only ``b``, ``b`` reads only ``a``, and no value of ``a`` is a graph output."""
    return succ[a] == {b} and pred[b] == {a} and not any(m in emits for m in members[a])


def _region(a: str, g: object, idom: dict, ipdom: dict, sink: object, limit: int) -> list[str] | None:
    """``a`` (which branches), its immediate post-dominator and what lies between, if ``a`` dominates it and they
    are few; else None."""
    p = ipdom.get(a)
    if p is None or p is sink or g.out_degree(a) < 2:  # type: ignore[attr-defined]  # a plain link: chains take it
        return None
    d = p
    while d != a and d in idom and idom[d] != d:
        d = idom[d]
    if d != a:
        return None
    seen, stack = {a}, [a]
    while stack:
        for nxt in g.successors(stack.pop()):  # type: ignore[attr-defined]
            if nxt != p and nxt not in seen:
                if nxt is sink or len(seen) >= limit:
                    return None
                seen.add(nxt)
                stack.append(nxt)
    return [a, *sorted(seen - {a}), p]  # p last: only it may hold a graph output


def to_dot(graph: Graph, prefix: str, *, min_chain: int = MIN_CHAIN) -> tuple[str, int, int]:
    """DOT text for ``graph`` (element ids start with ``prefix``); returns (dot, boxes, chains collapsed)."""
    boxes = groups(graph, min_nodes=min_chain)
    consts = constant_nodes(graph)
    box_of: dict[str, str] = {}
    lines = [f'digraph "{_esc(graph.name)}" {{', f'  id="{prefix}";', "  rankdir=TB; nodesep=0.25; ranksep=0.3;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, margin="0.08,0.03", '
             'height=0.3, penwidth=0.8];',
             '  edge [color="#777777", arrowsize=0.5, penwidth=0.8];']
    collapsed = 0
    for i, group in enumerate(boxes):
        box = f"{prefix}_n{i}"
        for n in group:
            box_of[n.name] = box
        last = group[-1]
        shape = _shape(last.outputs[0] if last.outputs else None)
        if len(group) == 1:
            op = last.qualified_op.replace("kiln::", "kiln:")
            label, tip = [op, shape], f"{last.name} ({last.qualified_op}) -> {shape}"
            extra = ', penwidth=1.6, color="#9a3412"' if last.domain == "kiln" else ""
        else:
            collapsed += 1
            ops = [n.op_type for n in group if n.name not in consts] or [n.op_type for n in group]
            label = [f"{len(ops)} ops: {summarise(ops)}", shape]
            tip = " > ".join(f"{n.name} ({n.qualified_op})" for n in group)
            extra = ', peripheries=2'
        colour = group_colour(group)
        lines.append(f'  {box} [id="{box}", label="{_lines(label)}", tooltip="{_esc(tip)}", fillcolor="{colour}"{extra}];')
    inputs = [v for v in graph.inputs]
    for k, v in enumerate(inputs):
        lines.append(f'  {prefix}_in{k} [id="{prefix}_in{k}", label="{_esc(v.name)}\\n{_esc(_shape(v))}", '
                     'shape=ellipse, fillcolor="#ffffff"];')
    for k, v in enumerate(graph.outputs):
        lines.append(f'  {prefix}_out{k} [id="{prefix}_out{k}", label="{_esc(v.name)}\\n{_esc(_shape(v))}", '
                     'shape=ellipse, fillcolor="#ffffff"];')
    edges: set[tuple[str, str]] = set()
    input_ids = {id(v): f"{prefix}_in{k}" for k, v in enumerate(inputs)}
    for n in graph.nodes:
        for v in _reads(n):
            src = input_ids.get(id(v)) if v.producer is None else box_of.get(v.producer.name)
            dst = box_of[n.name]
            if src is not None and src != dst:
                edges.add((src, dst))
    for k, v in enumerate(graph.outputs):
        src = input_ids.get(id(v)) if v.producer is None else box_of.get(v.producer.name)
        if src is not None:
            edges.add((src, f"{prefix}_out{k}"))
    order = {name: i for i, name in enumerate(dict.fromkeys([*box_of.values()]))}
    for e, (a, b) in enumerate(sorted(edges, key=lambda ab: (order.get(ab[0], -1), order.get(ab[1], 10**9)))):
        lines.append(f'  {a} -> {b} [id="{prefix}_e{e}"];')
    lines.append("}")
    return "\n".join(lines), len(boxes), collapsed


def _family(n: Node) -> str | None:
    return next((f for f, (_, ops) in FAMILIES.items() if n.op_type in ops), None)


def _reads(n: Node) -> list[Value]:
    """The non-constant values ``n`` reads (its inputs, and what its subgraphs read from outside)."""
    out = [v for v in n.inputs if v is not None and not v.is_constant]
    for sub in n.subgraphs():
        own = {id(v) for v in sub.values()}
        out.extend(v for m in sub.walk_nodes() for v in m.inputs
                   if v is not None and not v.is_constant and id(v) not in own and v.graph is n.graph)
    return out


_PROLOG = re.compile(r"^.*?(?=<svg\b)", re.S)


def render(graph: Graph, prefix: str, *, min_chain: int = MIN_CHAIN) -> GraphPicture:
    """``graph`` as inline SVG, drawn by Graphviz's ``dot`` (a GraphPicture with an error when it is missing)."""
    dot_text, boxes, collapsed = to_dot(graph, prefix, min_chain=min_chain)
    nodes = len(graph.nodes)
    exe = shutil.which("dot")
    if exe is None:
        return GraphPicture(None, nodes, boxes, collapsed, "Graphviz is not installed (apt install graphviz)")
    try:
        proc = subprocess.run([exe, "-Tsvg"], input=dot_text, capture_output=True, text=True, timeout=DOT_TIMEOUT)
    except subprocess.TimeoutExpired:
        return GraphPicture(None, nodes, boxes, collapsed, f"dot took over {DOT_TIMEOUT} s")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise KilnError(f"graphviz failed to draw graph '{graph.name}': {last}")
    return GraphPicture(_PROLOG.sub("", proc.stdout, count=1), nodes, boxes, collapsed)
