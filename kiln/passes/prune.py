"""Channel removal: dead channels exactly (a pass at O2), and structured pruning by importance.

Both stand on :mod:`kiln.passes.channels`, which groups the tensors that share a channel index.

``dead-channels`` removes a channel when that changes no output:

- nobody reads it: every conv or dense layer that reads it has zero weights there; or
- it is a constant (its producers' weights are all zero there, so it holds their bias, carried
  through BatchNorm, activations and the like) that its readers take into their biases: dense
  layers and unpadded convs always can, and any conv can when the constant is zero.

A channel a concat places in a wider tensor goes from both, and a group keeps at least one
channel. Pinned groups (graph inputs and outputs, reshapes, grouped convs, ...) are left whole.

:func:`prune_channels` removes the least important output channels of every prunable group
(the L1 or L2 norm of their producers' filters, summed over the group; run it after BatchNorm
is folded, so that gammas scale the filters), as many as make the model's MACs fall by the
ratio asked. Kept counts are multiples of ``block`` (the target's vector lanes), so that the
blocked layout does not pad them back. A removed channel's constant part (its bias, carried
through) is folded into its readers, also where padding makes that approximate at the borders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kiln.errors import KilnError
from kiln.ir import Graph, Node
from kiln.ir.summary import node_macs
from kiln.passes.channels import ChannelGraph, Space, foldable, producer_importance, reader_weights, remove_channels
from kiln.passes.manager import Pass, PassResult, register_pass

#: Passes over one graph before the dead-channel pass stops (each removal can free channels upstream).
MAX_ROUNDS = 8
#: Halvings of the pruner's bisection on the fraction of each group's channels removed.
_BISECT_STEPS = 30


class PruneError(KilnError):
    """A pruning request kiln cannot carry out (a bad ratio, nothing prunable)."""


def _dead_mask(cg: ChannelGraph, consts: dict[int, np.ndarray]) -> tuple[dict[int, np.ndarray], int]:
    """Per space: the channels removing which changes no output (``consts``: ``cg.constants()``);
    and how many channels that is (one through a concat counts once)."""
    removable: dict[int, np.ndarray] = {}
    for s in cg.spaces:
        if s.pinned or s.size < 2:
            removable[id(s)] = np.zeros(s.size, bool)
            continue
        ok = np.ones(s.size, bool)
        read = np.zeros(s.size, bool)
        for node, i in s.readers:
            rows = reader_weights(node)
            value = consts.get(id(node.input(i)), np.full(s.size, np.nan))
            fold = np.array([foldable(node, float(v)) for v in value])
            ok &= (rows == 0) | fold
            read |= rows != 0
        removable[id(s)] = ok
    # a channel is one atom across concats: removable only where every part of it is
    drop = {id(s): np.zeros(s.size, bool) for s in cg.spaces}
    for members in cg.atoms().values():
        if all(removable[id(s)][c] for s, c in members):
            for s, c in members:
                drop[id(s)][c] = True
    _keep_one(cg, drop)
    atoms = sum(1 for members in cg.atoms().values() if all(drop[id(s)][c] for s, c in members))
    return drop, atoms


def _keep_one(cg: ChannelGraph, drop: dict[int, np.ndarray]) -> None:
    """Un-drop one channel (its whole atom) of every space that would lose them all."""
    atoms = cg.atoms()
    where = {(id(s), c): root for root, members in atoms.items() for s, c in members}
    changed = True
    while changed:
        changed = False
        for s in cg.spaces:
            mask = drop[id(s)]
            if s.size and mask.all():
                for t, c in atoms[where[(id(s), 0)]]:
                    drop[id(t)][c] = False
                changed = True


@register_pass
@dataclass
class DeadChannels(Pass):
    """Removes channels whose weights are all zero or that nobody reads; folds constant ones into biases."""

    name = "dead-channels"

    def run(self, graph: Graph) -> PassResult:
        removed = 0
        for _ in range(MAX_ROUNDS):
            cg = ChannelGraph(graph)
            consts = cg.constants()
            drop, atoms = _dead_mask(cg, consts)
            if not atoms:
                break
            remove_channels(cg, drop, consts)
            removed += atoms
        return PassResult.of(graph, removed, {"channels": removed} if removed else None)


# --------------------------------------------------------------------------- pruning


@dataclass
class PruneReport:
    """What :func:`prune_channels` did: channels removed per group, and the MACs it planned for."""

    ratio: float
    norm: str
    block: int
    groups: int = 0
    removed_channels: int = 0
    macs_before: int = 0
    macs_planned: int = 0
    fraction: float = 0.0  # of each pruned group's channels removed
    skipped: dict[str, str] = field(default_factory=dict)  # a group's first value -> why it was left whole

    def to_json(self) -> dict:
        return {"ratio": self.ratio, "norm": self.norm, "block": self.block, "groups": self.groups,
                "removed_channels": self.removed_channels, "fraction": round(self.fraction, 4),
                "planned_mac_rate": round(1 - self.macs_planned / self.macs_before, 4) if self.macs_before else None}


def _macs(node: Node) -> int:
    p = node_macs(node)
    return 0 if p is None else sum(p.terms.values())


def _prunable(cg: ChannelGraph, block: int) -> tuple[list[Space], dict[str, str]]:
    spaces, skipped = [], {}
    linked = {id(s) for members in cg.atoms().values() if len({id(s) for s, _ in members}) > 1
              for s, _ in members}
    for s in cg.spaces:
        name = _group_name(s)
        if s.pinned:
            skipped[name] = s.pinned
        elif not s.producers:
            skipped[name] = "no conv or dense layer makes its channels"
        elif id(s) in linked:
            skipped[name] = "a concat ties its channels to others (pruning leaves concats whole)"
        elif s.size < 2 * block:
            skipped[name] = f"{s.size} channels: fewer than two blocks of {block}"
        else:
            spaces.append(s)
    return spaces, skipped


def _kept(size: int, fraction: float, block: int) -> int:
    """Channels a group of ``size`` keeps when ``fraction`` of them go: a multiple of ``block``, at least one."""
    keep = int(round(size * (1 - fraction) / block)) * block
    return min(size, max(block, keep))


def _planned_macs(cg: ChannelGraph, spaces: list[Space], fraction: float, block: int) -> int:
    keep = {id(s): _kept(s.size, fraction, block) / s.size for s in spaces}
    total = 0
    for node in cg.graph.nodes:
        m = _macs(node)
        if not m:
            continue
        scale = 1.0
        y, x = node.outputs[0], node.input(0)
        out_space = cg.space_of.get(id(y))
        in_space = cg.space_of.get(id(x)) if x is not None else None
        if out_space is not None and id(out_space) in keep:
            scale *= keep[id(out_space)]
        if in_space is not None and in_space is not out_space and id(in_space) in keep and any(
                r is node for r, _ in in_space.readers):
            scale *= keep[id(in_space)]
        total += int(m * scale)
    return total


#: why a group the caller keeps whole (``exclude``) was left whole
KEPT_FOR_ACCURACY = "kept whole for the accuracy budget (a sensitive group)"


def prunable_groups(graph: Graph, block: int = 16) -> list[str]:
    """The names of the channel groups :func:`prune_channels` may prune (each group's first value)."""
    spaces, _ = _prunable(ChannelGraph(graph), block)
    return [_group_name(s) for s in spaces]


def _group_name(s: Space) -> str:
    return s.values[0].name if s.values else "?"


def prune_channels(graph: Graph, ratio: float, *, norm: str = "l1", block: int = 16,
                   exclude: frozenset[str] = frozenset(), fraction: float | None = None) -> PruneReport:
    """Remove the least important output channels so that the model's MACs fall by about ``ratio``.

    Every prunable group loses the same fraction of its channels (found by bisection on the MAC
    count, or ``fraction`` when given), rounded so that it keeps a multiple of ``block``. The groups
    named in ``exclude`` (see :func:`prunable_groups`) stay whole, so the others lose more. Modifies
    ``graph``; returns what it did.
    """
    if not 0 < ratio < 1:
        raise PruneError(f"--prune-channels takes a ratio between 0 and 1 (the share of MACs to remove), not {ratio}")
    if norm not in ("l1", "l2"):
        raise PruneError(f"--prune-norm is l1 or l2, not {norm!r}")
    report = PruneReport(ratio, norm, block)
    cg = ChannelGraph(graph)
    spaces, report.skipped = _prunable(cg, block)
    report.macs_before = _planned_macs(cg, [], 0.0, block)
    if not spaces:
        raise PruneError("no channel group can be pruned: " + "; ".join(
            f"{k}: {v}" for k, v in list(report.skipped.items())[:3]))
    report.skipped.update({_group_name(s): KEPT_FOR_ACCURACY for s in spaces if _group_name(s) in exclude})
    spaces = [s for s in spaces if _group_name(s) not in exclude]
    if fraction is None:
        target = report.macs_before * (1 - ratio)
        lo, hi = 0.0, 1.0
        for _ in range(_BISECT_STEPS):
            mid = (lo + hi) / 2
            if _planned_macs(cg, spaces, mid, block) > target:
                lo = mid
            else:
                hi = mid
        fraction = hi if abs(_planned_macs(cg, spaces, hi, block) - target) <= abs(
            _planned_macs(cg, spaces, lo, block) - target) else lo
    report.fraction, report.macs_planned = fraction, _planned_macs(cg, spaces, fraction, block)
    drop: dict[int, np.ndarray] = {}
    for s in spaces:
        keep = _kept(s.size, fraction, block)
        if keep == s.size:
            continue
        order = np.argsort(producer_importance(s, norm), kind="stable")
        mask = np.zeros(s.size, bool)
        mask[order[: s.size - keep]] = True
        drop[id(s)] = mask
        _zero_rows(graph, s, mask)
    # with the dropped rows zeroed, each dropped channel holds its bias (carried through): what readers fold
    removed = remove_channels(cg, drop, cg.constants())
    report.groups, report.removed_channels = len(drop), removed
    return report


def _zero_rows(graph: Graph, space: Space, mask: np.ndarray) -> None:
    for node in space.producers:
        w = node.input(1).numpy().copy()
        if node.op_type == "Conv":
            w[mask] = 0
        elif node.op_type == "Gemm" and node.attr("transB", 0):
            w[mask, :] = 0
        else:
            w[:, mask] = 0
        node.set_input(1, graph.add_constant(w, f"{node.name}_w"))
