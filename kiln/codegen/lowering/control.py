"""Lowering of ``If`` on a run-time condition to ``relax.If``, and of the Optional ops.

(An ``If`` on a constant never gets here: the ``inline-if`` pass replaces it by
its taken branch.) Each branch becomes a ``SeqExpr`` with its own binding block,
and may read any value of the enclosing graphs. A branch that would fail at run
time at the pinned shapes (see ``RUN_TIME_FAILURES``) compiles to an assertion
with the reason, so taking it fails as it does in onnxruntime. (Loop and Scan are
in ``loop.py``.)

An optional holding a plain tensor is present or absent when compiling, so
Optional is its tensor (or nothing), OptionalHasElement a constant and
OptionalGetElement the tensor itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.codegen.lowering.registry import CodegenError, branch_failure, lowers
from kiln.codegen.lowering.te import get_topi
from kiln.errors import RUNTIME_CHECK
from kiln.ir import Graph, Node, Value, is_static

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


def _failing_branch(lw: Lowerer, node: Node, reason: str, like: Graph, name: str) -> Any:
    """A branch that raises ``reason`` when taken, typed like the outputs of the branch ``like``."""
    from tvm import relax

    for v in like.outputs:
        if not is_static(v.shape) or v.dtype is None:
            raise CodegenError(f"node {node.label()}: a branch fails at run time ({reason}), and the other "
                               f"branch's output '{v.name}' is {v.type_str()}, not a static shape")

    message = RUNTIME_CHECK + f"If {node.label()} took a branch that cannot run at the compiled shapes: {reason}"

    def fail() -> Any:  # a TIR assertion: relax's assert_op lives in the compiler library, not the runtime
        import tvm
        from tvm import te, tirx

        # AssertStmt's Python wrapper names its first two parameters (kind, condition) but passes them on
        # in the order the constructor takes, (condition, kind)
        return te.extern((1,), [], lambda ins, outs: tirx.AssertStmt(
            tirx.const(False), tvm.ir.StringImm("RuntimeError"), [tvm.ir.StringImm(message)]), dtype="int32",
            name="fail")

    def zeros_after(failed: Any, v: Any) -> Any:  # reads the assertion's result, so no pass drops the assertion
        from tvm import te, tirx

        return te.compute(list(v.shape), lambda *i: tirx.Cast(v.dtype.numpy.name, failed[0] * 0), name="zeros")

    def body() -> Any:
        failed = lw.emit(fail, name="kiln_fail")
        outs = [lw.emit(lambda f, v=v: zeros_after(f, v), failed, name="zeros") for v in like.outputs]
        return outs[0] if len(outs) == 1 else relax.Tuple(outs)

    return lw.call_function(name, [], [], body)


@lowers("If")
def _if(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import relax

    c = node.input(0)
    cond = lw.get(c)
    if c.shape != ():  # ONNX allows a one-element tensor; relax.If takes a scalar
        cond = lw.emit(lambda t: get_topi().reshape(t, ()), cond, name="if_cond")
    branches: list[Graph] = [node.attr("then_branch"), node.attr("else_branch")]
    failures = [branch_failure(b) for b in branches]
    if all(failures):
        raise CodegenError(f"node {node.label()}: neither branch can run at the compiled shapes: {failures[0]}")
    names = [f"{node.name or 'if'}_{side}" for side in ("then", "else")]
    bodies = [None if f else lw.lower_branch(b, n) for b, f, n in zip(branches, failures, names)]
    good = branches[failures.index(None)]
    bodies = [body if body is not None else _failing_branch(lw, node, f, good, n)
              for body, f, n in zip(bodies, failures, names)]
    result = lw.bb.emit(relax.If(cond, bodies[0], bodies[1]))
    n = len([o for o in node.outputs if o.name])
    outs = [result] if len(good.outputs) == 1 else [lw.bb.emit(relax.TupleGetItem(result, i)) for i in range(n)]
    return [_with_dims(lw, node, r, k, branches) for k, r in enumerate(outs)]


def _with_dims(lw: Lowerer, node: Node, r: Any, k: int, branches: list[Graph]) -> Any:
    """An If result whose branches give different shapes has a rank but no dims: it is matched to
    fresh dims, read at run time, so the kernels after it can be sized by them. Branches of
    different ranks are refused: the kernels after the If are compiled for one rank."""
    from tvm import relax, tirx

    ty = getattr(r, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is not None:
        return r
    if ty.ndim < 0:
        ranks = [len(b.outputs[k].shape) if k < len(b.outputs) and b.outputs[k].shape is not None else "unknown"
                 for b in branches]
        raise CodegenError(f"node {node.label()}: the branches give output {k} different ranks (then {ranks[0]}, "
                           f"else {ranks[1]}); kiln compiles the ops after an If for one rank")
    dims = [tirx.Var(f"if{k}_d{j}", "int64") for j in range(ty.ndim)]
    lw.fresh_dims = True
    return lw.bb.match_cast(r, relax.TensorType(dims, ty.dtype))


def _empty_optional(v: Value | None) -> bool:
    """An absent input, or an ``Optional`` made without a value."""
    return v is None or (v.producer is not None and v.producer.op_type == "Optional" and v.producer.input(0) is None)


@lowers("Optional")
def _optional(lw: Lowerer, node: Node) -> list[Any]:
    """An optional is lowered away: one made from a tensor is that tensor; an empty one has no value,
    and the ops that read it know so when compiling (see :func:`_empty_optional`)."""
    if node.input(0) is None:
        return [None]
    return [lw.get(node.input(0))]


@lowers("OptionalHasElement", reads=())
def _optional_has_element(lw: Lowerer, node: Node) -> list[Any]:
    """An optional holding a plain tensor: whether it is present is known when compiling."""
    from tvm import te, tirx

    present = not _empty_optional(node.input(0))
    return [lw.emit(lambda: te.compute((), lambda: tirx.const(present, "bool"), name="has_element"),
                    name="optional_has_element")]


@lowers("OptionalGetElement")
def _optional_get_element(lw: Lowerer, node: Node) -> list[Any]:
    if _empty_optional(node.input(0)):
        raise CodegenError(f"node {node.label()}: OptionalGetElement of an empty optional")
    return [lw.get(node.input(0))]
