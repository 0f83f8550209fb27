"""Dynamic int8 as a compile job: int8 weights, the activations quantized on every call.

``kiln compile MODEL --quantize int8-dynamic [--eval SAMPLES.npz]`` runs :func:`compile_int8_dynamic`:

1. the model is imported and folded with the float passes;
2. the ``quantize-dynamic`` pass rewrites every MatMul and Gemm with constant 2-D weights into
   onnxruntime's dynamic form (DynamicQuantizeLinear, MatMulInteger by int8 weights per output
   column, the two scales), which the layout pass turns into ``kiln::DynQDense`` kernels. Products of
   two activations (attention's) stay float. An LSTM, GRU or RNN with constant weights gets the same
   for its input projection, and a ``kiln::DynQRecurrence`` whose hidden-state products are int8, the
   state quantized per batch row at every step. No calibration samples are needed;
3. on a CPU without VNNI the dense layers' weights get 7 bits of magnitude, so that AVX2's ``vpmaddubsw``
   multiplies them exactly (with 8 it saturates); with VNNI they get 8. Recurrent layers get 8 bits on
   every CPU: their error compounds over the steps (the 8-bit AVX2 kernel is exact, if slower);
4. with ``--eval``, the artifact runs on the samples against onnxruntime running the float model
   (cosine, max abs error and argmax agreement per output), as static int8 reports.

Models that onnxruntime's ``quantize_dynamic`` already quantized need no job: ``kiln compile`` puts
their DynamicQuantizeLinear + MatMulInteger pairs on the same kernels.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from kiln.quantize.accuracy import accuracy_record
from kiln.quantize.calibration import read_samples
from kiln.quantize.options import DynamicQuantizeOptions, QuantizeError

if TYPE_CHECKING:
    from kiln.driver import CompileResult

#: kiln's dynamic int8 kernels: dense layers (and recurrent input projections), and the recurrences
INT8_KERNELS = ("DynQDense", "DynQRecurrence")
#: ops whose presence means the model is already quantized
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                 "QLinearConv", "QLinearMatMul")


def compile_int8_dynamic(model: str | os.PathLike, output: str | os.PathLike, options: DynamicQuantizeOptions, *,
                         target: Any, level: str | None = None, input_shapes: dict[str, tuple] | None = None,
                         tuning_db: Any = None, progress: Callable[[str], None] | None = None) -> CompileResult:
    """Quantize ``model``'s dense layers to dynamic int8 and compile it into ``output``."""
    from kiln.codegen.build import file_sha256, set_manifest_entry
    from kiln.driver import compile_graph, load_model
    from kiln.ir.summary import summarize
    from kiln.passes import PassManager
    from kiln.passes.pipeline import FLOAT_PREP, passes_for
    from kiln.passes.quantize import QuantizeDynamic

    if target.kind != "cpu":
        raise QuantizeError("--quantize int8-dynamic builds CPU kernels; CUDA int8 is not built yet")
    say = progress or (lambda _: None)
    say("importing")
    graph = load_model(model, input_shapes)
    if any(n.op_type in QUANTIZED_OPS for n in graph.walk_nodes()):
        raise QuantizeError(f"{model} is already quantized (it has QuantizeLinear or MatMulInteger); compile it "
                            f"without --quantize")
    samples = read_samples(options.eval, graph.inputs) if options.eval else None
    prep = passes_for(names=FLOAT_PREP)
    graph, _ = PassManager(prep).run(graph)
    baseline = summarize(graph)  # "before": folded and exact, so every product's shapes are known
    bits = 8 if target.has_vnni else 7
    q = QuantizeDynamic(weight_bits=bits)
    graph, _ = PassManager([q], max_iterations=1).run(graph)
    if not q.layers:
        raise QuantizeError(f"{model}: no MatMul or Gemm with constant 2-D weights, and no LSTM, GRU or RNN with "
                            f"constant weights, to quantize")
    say(f"quantized {len(q.layers)} layers to dynamic int8 ({bits}-bit weights per output column)")
    result = compile_graph(graph, output, target=target, level=level, tuning_db=tuning_db,
                           source=(file_sha256(model), Path(model).name),
                           applied=[*(p.describe() for p in prep), q.describe()], progress=say, baseline=baseline)
    built = Counter(n.op_type for n in result.graph.walk_nodes() if n.domain == "kiln" and n.op_type in INT8_KERNELS)
    kernels, recurrent = sum(built.values()), built["DynQRecurrence"] > 0
    record: dict[str, Any] = {
        "scheme": {
            "activations": "uint8 per tensor, scale and zero point computed on every call (DynamicQuantizeLinear); "
                           "a recurrent layer's hidden state per batch row at every step",
            "weights": f"int8 symmetric per output column, {bits}-bit magnitude"
                       + ("" if bits == 8 else " (no VNNI: AVX2 multiplies 7-bit weights exactly)")
                       + ("; recurrent layers 8-bit" if recurrent and bits != 8 else ""),
        },
        "dynamic": True,
        "layers": {name: "int8" for name in q.layers} | {name: "fp32" for name in q.kept_float},
        "kept_float": dict(q.kept_float),
        "int8_kernels": kernels,
    }
    if samples is not None:
        say(f"measuring accuracy on {len(samples)} samples against the float model (onnxruntime)")
        record.update(accuracy_record(model, output, samples, target))
    set_manifest_entry(output, "quantization", record)
    result.quantization = record
    return result
