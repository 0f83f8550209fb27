"""The reference evaluator: runs a kiln ``Graph``, or one ``Node``, on numpy inputs.

Standard ONNX ops run through onnx's own reference implementation
(``onnx.reference.ReferenceEvaluator``); kiln-domain ops run through the numpy
functions they were registered with (:func:`kiln.ir.schemas.register_kiln_op`).
Constant folding, calibration and the tests all use it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import onnx.defs
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops import load_op
from onnx.reference.ops.op_loop import Loop as _ReferenceLoop

from kiln.errors import EvaluationError, InputError
from kiln.ir import schemas
from kiln.ir.core import KILN_DOMAIN, Graph, Node, Value, _free_inputs
from kiln.ir.dtypes import DType
from kiln.ir.serde import node_proto, tensor_proto, to_onnx, value_info


class BatchNormalization(OpRun):
    """Overrides onnx's reference BatchNormalization.

    onnx 1.23's ``BatchNormalization_9`` runs in training mode (batch
    statistics) whenever ``momentum`` is set, and the schema gives ``momentum``
    a default, so every single-output inference BN is computed wrongly. The spec
    (and onnxruntime) use the running statistics when the node asks for one
    output (opsets 9-13) or ``training_mode`` is 0 (opset 14+).
    """

    op_domain = ""

    def _run(self, x, scale, bias, mean, var, epsilon=1e-5, momentum=0.9, training_mode=0, is_test=0, spatial=1):
        outputs = [o for o in self.onnx_node.output if o]
        if training_mode or (len(outputs) > 1 and not is_test):
            axes = tuple(i for i in range(x.ndim) if i != 1)
            batch_mean, batch_var = x.mean(axis=axes), x.var(axis=axes)
            y = _bn_inference(x, scale, bias, batch_mean, batch_var, epsilon)
            running_mean = mean * momentum + batch_mean * (1 - momentum)
            running_var = var * momentum + batch_var * (1 - momentum)
            if training_mode:  # opset 14+: Y, running_mean, running_var
                return (y, running_mean.astype(x.dtype), running_var.astype(x.dtype))[: len(self.onnx_node.output)]
            extra = (running_mean, running_var, batch_mean, batch_var)
            return (y, *(e.astype(x.dtype) for e in extra))[: len(self.onnx_node.output)]
        return (_bn_inference(x, scale, bias, mean, var, epsilon),)


def _bn_inference(x, scale, bias, mean, var, epsilon):
    shape = (-1,) + (1,) * (x.ndim - 2)
    inv = scale.reshape(shape) / np.sqrt(var.reshape(shape) + epsilon)
    return ((x - mean.reshape(shape)) * inv + bias.reshape(shape)).astype(x.dtype)


class _SoftmaxFamily(OpRun):
    """Overrides onnx's reference Softmax, LogSoftmax and Hardmax for every opset.

    The reference implements only opset 13's semantics (normalise along
    ``axis``, default -1). Before opset 13 the default axis is 1 and the input
    is first coerced to 2-D, ``[prod(dims[:axis]), prod(dims[axis:])]``, and
    normalised along the second dimension, as onnxruntime does.
    """

    op_domain = ""

    def _run(self, x, axis=None):
        # OpRun fills in the newest schema's default; only an explicit attribute counts
        if x.size == 0:
            return (x,)
        given = {a.name: a.i for a in self.onnx_node.attribute}
        version = self.run_params["opsets"].get("", 13)
        if version >= 13:
            axis = given.get("axis", -1)
            return (self._normalise(x, axis).astype(x.dtype),)
        axis = given.get("axis", 1)
        axis = axis + x.ndim if axis < 0 else axis
        flat = x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
        return (self._normalise(flat, 1).reshape(x.shape).astype(x.dtype),)

    @staticmethod
    def _normalise(x: np.ndarray, axis: int) -> np.ndarray:
        raise NotImplementedError


class Softmax(_SoftmaxFamily):
    __doc__ = _SoftmaxFamily.__doc__

    @staticmethod
    def _normalise(x, axis):
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)


class LogSoftmax(_SoftmaxFamily):
    __doc__ = _SoftmaxFamily.__doc__

    @staticmethod
    def _normalise(x, axis):
        shifted = x - x.max(axis=axis, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


class Hardmax(_SoftmaxFamily):
    __doc__ = _SoftmaxFamily.__doc__

    @staticmethod
    def _normalise(x, axis):
        idx = np.expand_dims(np.argmax(x, axis=axis), axis)
        out = np.zeros_like(x)
        np.put_along_axis(out, idx, 1, axis=axis)
        return out


class _WideAccumulation(OpRun):
    """Runs onnx's reference kernel for this op with float32/float16 inputs widened to float64.

    Conv, ConvTranspose, Gemm and MatMul sum thousands of products. In float32
    two correct engines (onnx's reference, onnxruntime) then differ by the
    rounding of their summation orders, and in deep networks those differences
    exceed a 1e-4 relative tolerance on outputs near zero. The evaluator is
    kiln's oracle, so it accumulates in float64 and rounds once per op: its
    results are closer to the exact answer than either float32 engine.
    """

    op_domain = ""

    def __init__(self, onnx_node, run_params, schema=None):
        super().__init__(onnx_node, run_params, schema)
        version = run_params["opsets"].get("", onnx.defs.onnx_opset_version())
        self._impl = load_op("", onnx_node.op_type, version)(onnx_node, run_params)

    def run(self, *args, **kwargs):
        narrow = {a.dtype for a in args if isinstance(a, np.ndarray) and a.dtype in _NARROW_FLOATS}
        if len(narrow) != 1:
            return self._impl.run(*args, **kwargs)
        dtype = narrow.pop()
        wide = [a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype == dtype else a for a in args]
        results = self._impl.run(*wide, **kwargs)
        return tuple(np.asarray(r).astype(dtype) for r in results)

    def _run(self, *args, **kwargs):  # run() is overridden; OpRun requires the method to exist
        return self._impl._run(*args, **kwargs)


_NARROW_FLOATS = (np.dtype(np.float32), np.dtype(np.float16))


class Loop(_ReferenceLoop):
    """Fixes two departures of onnx's reference Loop from the spec.

    - The reference joins the per-iteration scan outputs with ``np.vstack``: a
      scalar output comes out ``(N, 1)`` instead of ``(N,)``, and a ``(d0, d1)``
      output comes out ``(N·d0, d1)`` instead of ``(N, d0, d1)``. The elements
      are in the right order, so kiln reshapes them to ``(N, *per_iteration)``.
    - An absent ``cond`` input means "true" (run ``M`` times); the reference
      runs no iteration at all.
    """

    op_domain = ""

    def __init__(self, onnx_node, run_params, *args, **kwargs):
        super().__init__(onnx_node, run_params, *args, **kwargs)
        run_body = self._run_body  # an instance attribute OpRun makes for the 'body' graph

        def recording(*a, **k):
            outputs = run_body(*a, **k)
            if self.K:
                self._iteration_shapes = [np.shape(o) for o in outputs[-self.K:]]
            return outputs

        self._run_body = recording
        self._iteration_shapes = None

    def _run(self, M, cond, *args, **kwargs):
        self._iteration_shapes = None
        if cond is None:
            cond = np.array(True)
        results = tuple(super()._run(M, cond, *args, **kwargs))
        if not self.K or self._iteration_shapes is None:
            return results
        head, scans = results[: -self.K], results[-self.K:]
        fixed = tuple(np.asarray(a).reshape(-1, *shape) for a, shape in zip(scans, self._iteration_shapes))
        return head + fixed


class GatherElements(OpRun):
    """Replaces onnx's reference GatherElements.

    The reference gathers with ``np.choose``, which takes at most 32 choices,
    so any gathered axis longer than 32 fails (BERT's position ids gather from
    64). Per the spec (torch.gather semantics), the output has the indices'
    shape, negative indices count from the end, and the indices may be
    smaller than the data in the other dims.
    """

    op_domain = ""

    def _run(self, data, indices, axis=0):
        axis = axis + data.ndim if axis < 0 else axis
        idx = np.where(indices < 0, indices + data.shape[axis], indices)
        window = tuple(slice(None) if d == axis else slice(0, idx.shape[d]) for d in range(data.ndim))
        return (np.take_along_axis(data[window], idx.astype(np.int64), axis=axis),)


class Squeeze(OpRun):
    """Replaces onnx's reference Squeeze, which fails on unsorted axes before opset 13.

    Before opset 13 the axes are an attribute; the reference removes them one
    by one in the given order, so ``axes=[2, 0]`` on ``(1, 2, 1, 4)`` fails.
    Axes are a set: kiln squeezes them all at once, as onnxruntime does.
    """

    op_domain = ""

    def _run(self, data, axes=None):
        given = {a.name: list(a.ints) for a in self.onnx_node.attribute}
        if axes is None:
            axes = given.get("axes")
        if axes is None or len(axes) == 0:
            return (np.squeeze(data),)
        norm = tuple(sorted(int(a) + data.ndim if int(a) < 0 else int(a) for a in np.asarray(axes).reshape(-1)))
        return (np.squeeze(data, axis=norm),)


class DequantizeLinear(OpRun):
    """DequantizeLinear below opset 19 runs opset 19's kernel (see ``schemas.REFERENCE_FROM``)."""

    op_domain = ""

    def __init__(self, onnx_node, run_params, schema=None):
        super().__init__(onnx_node, run_params, schema)
        version = run_params["opsets"].get("", onnx.defs.onnx_opset_version())
        self._impl = load_op("", "DequantizeLinear", schemas.reference_version("", "DequantizeLinear", version))(
            onnx_node, run_params)

    def run(self, *args, **kwargs):
        return self._impl.run(*args, **kwargs)

    def _run(self, *args, **kwargs):  # run() is overridden; OpRun requires the method to exist
        return self._impl._run(*args, **kwargs)


class Clip(OpRun):
    """Replaces onnx's reference Clip (every opset): NaN as onnxruntime treats it.

    The spec is silent on NaN, and the reference (``np.clip``) gives NaN everywhere for a NaN
    bound. onnxruntime, which users compare with, clips with ``x < lo ? lo : x`` and then
    ``hi < x ? hi : x``: a NaN bound is no bound, and a NaN input stays NaN; an absent float bound
    is the dtype's lowest or highest value. kiln's compiled Clip does the same, so folding a
    constant Clip keeps the numbers the compiled op gives.
    """

    op_domain = ""

    def _run(self, data, *bounds, min=None, max=None):  # noqa: A002 - ONNX's attribute names (opset < 11)
        lo = bounds[0] if len(bounds) > 0 else min
        hi = bounds[1] if len(bounds) > 1 else max
        if data.dtype.kind == "f":  # an absent bound is the dtype's lowest or highest value (-inf clips to -FLT_MAX)
            info = np.finfo(data.dtype)
            lo, hi = info.min if lo is None else lo, info.max if hi is None else hi
        out = data
        if lo is not None:
            out = np.where(out < lo, np.asarray(lo, data.dtype), out)
        if hi is not None:
            out = np.where(hi < out, np.asarray(hi, data.dtype), out)
        return (np.asarray(out, dtype=data.dtype),)


class GlobalLpPool(OpRun):
    """GlobalLpPool, which onnx's reference lacks: (sum over the spatial dims of |x|^p)^(1/p), per (N, C)."""

    op_domain = ""

    def _run(self, x, p=2):
        axes = tuple(range(2, x.ndim))
        return ((np.sum(np.abs(x) ** p, axis=axes, keepdims=True)) ** (1.0 / p)).astype(x.dtype),


class MaxRoiPool(OpRun):
    """MaxRoiPool, which onnx's reference lacks, as onnxruntime computes it.

    Each roi ``[batch, x1, y1, x2, y2]`` is scaled by ``spatial_scale`` and rounded (half away from
    zero), at least one pixel high and wide, and split into ``pooled_shape`` bins of fractional size;
    bin (ph, pw) takes the max over rows ``floor(ph * h) .. ceil((ph + 1) * h)`` (and likewise columns)
    of the roi, clipped to the image; an empty bin is 0.
    """

    op_domain = ""

    def _run(self, x, rois, pooled_shape=None, spatial_scale=1.0):
        ph_n, pw_n = pooled_shape
        _, c, height, width = x.shape
        out = np.zeros((rois.shape[0], c, ph_n, pw_n), x.dtype)
        for n, roi in enumerate(rois):
            b = int(roi[0])
            x1, y1, x2, y2 = (int(np.sign(v) * np.floor(abs(v) + 0.5)) for v in np.float32(roi[1:]) * np.float32(spatial_scale))
            bin_h = np.float32(max(y2 - y1 + 1, 1)) / np.float32(ph_n)
            bin_w = np.float32(max(x2 - x1 + 1, 1)) / np.float32(pw_n)
            for ph in range(ph_n):
                h0 = min(max(int(np.floor(ph * bin_h)) + y1, 0), height)
                h1 = min(max(int(np.ceil((ph + 1) * bin_h)) + y1, 0), height)
                for pw in range(pw_n):
                    w0 = min(max(int(np.floor(pw * bin_w)) + x1, 0), width)
                    w1 = min(max(int(np.ceil((pw + 1) * bin_w)) + x1, 0), width)
                    if h1 > h0 and w1 > w0:
                        out[n, :, ph, pw] = x[b, :, h0:h1, w0:w1].max(axis=(1, 2))
        return (out,)


#: Standard ops whose onnx reference implementation kiln replaces or wraps, each with its reason.
STANDARD_OVERRIDES: list[type[OpRun]] = [
    BatchNormalization, Softmax, LogSoftmax, Hardmax, Loop, GatherElements, Squeeze, DequantizeLinear, Clip,
    GlobalLpPool, MaxRoiPool,
    *(type(op, (_WideAccumulation,), {"__doc__": _WideAccumulation.__doc__}) for op in ("Conv", "ConvTranspose", "Gemm", "MatMul")),
]


def _kiln_op_classes() -> list[type[OpRun]]:
    """The evaluator's extra ops: the standard-op overrides, and one class per kiln op."""
    classes: list[type[OpRun]] = list(STANDARD_OVERRIDES)
    for name, op in schemas.KILN_OPS.items():
        classes.append(type(name, (_KilnOpRun,), {"impl": staticmethod(op.impl)}))
    return classes


class _KilnOpRun(OpRun):
    """Runs a kiln-domain op through its registered numpy function (``impl``)."""

    op_domain = KILN_DOMAIN
    op_schema = None  # never borrow a standard op's schema (kiln::Attention is not ai.onnx Attention)
    impl: Any = None

    def _run(self, *inputs: Any, **attrs: Any) -> tuple:
        # OpRun passes the node's attributes as keyword arguments
        return tuple(type(self).impl(*inputs, **attrs))


class Evaluator:
    """Evaluates one graph many times; build once, call :meth:`run` per input set."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._model = to_onnx(graph, kiln_functions=False)  # kiln ops run through their numpy definitions
        try:
            self._ref = ReferenceEvaluator(self._model, new_ops=_kiln_op_classes())
        except Exception as e:  # noqa: BLE001 - onnx raises many types while preparing ops
            raise EvaluationError(f"cannot prepare graph '{graph.name}' for evaluation: {e}") from None

    def run(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Evaluate the graph; ``outputs`` may name any value, intermediate ones included."""
        feeds = check_inputs(self.graph, inputs)
        wanted = [v.name for v in self.graph.outputs] if outputs is None else list(outputs)
        graph_outs = {v.name for v in self.graph.outputs}
        try:
            if set(wanted) <= graph_outs:
                results = self._ref.run(None, feeds)
                named = dict(zip([v.name for v in self.graph.outputs], results))
            else:
                named = self._ref.run(None, feeds, intermediate=True)
        except Exception as e:  # noqa: BLE001 - the reference evaluator raises anything
            raise EvaluationError(f"evaluating graph '{self.graph.name}' failed: {type(e).__name__}: {e}") from None
        missing = [n for n in wanted if n not in named]
        if missing:
            raise EvaluationError(f"no value named {', '.join(repr(m) for m in missing)} in graph '{self.graph.name}'")
        return {n: np.asarray(named[n]) for n in wanted}


def check_inputs(graph: Graph, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Match ``inputs`` to the graph's inputs: names, dtypes and static dims; raise ``InputError``."""
    expected = {v.name: v for v in graph.inputs}
    unknown = sorted(set(inputs) - set(expected))
    missing = [n for n in expected if n not in inputs]
    if unknown or missing:
        sig = ", ".join(f"{v.name}: {v.type_str()}" for v in graph.inputs)
        what = []
        if missing:
            what.append(f"missing {', '.join(missing)}")
        if unknown:
            what.append(f"unexpected {', '.join(unknown)}")
        raise InputError(f"inputs do not match the graph ({'; '.join(what)}); expected {sig}")
    feeds = {}
    for name, v in expected.items():
        arr = np.asarray(inputs[name])
        if v.dtype is not None and arr.dtype != v.dtype.numpy:
            raise InputError(f"input '{name}' has dtype {arr.dtype}, expected {v.type_str()}")
        if v.shape is not None:
            bad = len(arr.shape) != len(v.shape) or any(
                isinstance(d, int) and d != a for d, a in zip(v.shape, arr.shape)
            )
            if bad:
                raise InputError(f"input '{name}' has shape {list(arr.shape)}, expected {v.type_str()}")
        feeds[name] = arr
    return feeds


def evaluate(
    graph: Graph,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Evaluate ``graph`` on ``inputs`` once; see :class:`Evaluator` for repeated runs."""
    return Evaluator(graph).run(inputs, outputs)


def evaluate_node(node: Node, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Evaluate one node; returns one array per output the node produces.

    ``inputs`` maps value names to arrays for every non-constant value the node
    reads (its own inputs and outer values its subgraphs read); constants are
    taken from the graph.
    """
    if node.domain == KILN_DOMAIN:
        op = schemas.KILN_OPS.get(node.op_type)
        if op is None:
            raise EvaluationError(f"node {node.label()}: no kiln op named '{node.op_type}'")
        args = [None if v is None else _feed(v, inputs, node) for v in node.inputs]
        attrs = {k: a.value for k, a in node.attrs.items()}
        return [np.asarray(r) for r in op.impl(*args, **attrs)]

    free: dict[str, Value] = {}
    for v in _free_inputs(node):
        free.setdefault(v.name, v)
    graph_inputs, inits, feeds = [], [], {}
    for name, v in free.items():
        if v.is_constant:
            assert v.const is not None
            inits.append(tensor_proto(v.const, name))
        else:
            arr = _feed(v, inputs, node)
            feeds[name] = arr
            graph_inputs.append(helper.make_tensor_value_info(name, _code(arr, v), list(arr.shape)))
    outs = [o for o in node.outputs if o.name]
    out_infos = [value_info(o) if o.dtype is not None else helper.make_empty_tensor_value_info(o.name) for o in outs]
    gp = helper.make_graph([node_proto(node, True)], "node", graph_inputs, out_infos, initializer=inits)
    opset = node.graph.model_opset if node.graph is not None else {"": 21}
    model = helper.make_model(gp, opset_imports=[helper.make_opsetid(d, v) for d, v in opset.items()])
    try:
        ref = ReferenceEvaluator(model, new_ops=_kiln_op_classes())
        results = ref.run(None, feeds)
    except Exception as e:  # noqa: BLE001 - the reference evaluator raises anything
        raise EvaluationError(f"evaluating node {node.label()} failed: {type(e).__name__}: {e}") from None
    return [np.asarray(r) for r in results]


def _feed(v: Value, inputs: Mapping[str, np.ndarray], node: Node) -> np.ndarray:
    if v.is_constant:
        return v.numpy()
    if v.name not in inputs:
        raise EvaluationError(f"node {node.label()} needs a value for '{v.name}'")
    return np.asarray(inputs[v.name])


def _code(arr: np.ndarray, v: Value) -> int:
    try:
        return DType.from_numpy(arr.dtype).onnx_code
    except KeyError:
        return v.dtype.onnx_code if v.dtype is not None else TensorProto.FLOAT
