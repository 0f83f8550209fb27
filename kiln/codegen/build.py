"""Build: lower a graph, compile it with TVM, and write a ``.kiln`` artifact."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from kiln import __version__
from kiln.codegen.lowering import CodegenError, lower
from kiln.codegen.target import Target, cpu_target
from kiln.ir import Graph, Value, is_static, is_unknown_dim, shape_example, window_minimums
from kiln.runtime.artifact import CUDA_FATBIN, CUDA_SOURCE, LIBRARY, WEIGHTS, weight_signature, write_artifact

if TYPE_CHECKING:
    from kiln.codegen.tune import TuningDatabase



@dataclass
class BuildReport:
    """What a build did and how long each stage took."""

    path: Path
    target: Target
    seconds: dict[str, float] = field(default_factory=dict)
    num_kernels: int = 0


def signature(graph: Graph, minimums: dict[str, int] | None = None) -> tuple[list[dict], list[dict]]:
    """The graph's input and output signature as manifest entries (symbolic dims by name; an
    input's ``min`` holds the least size of a symbolic dim, by its index, where one is needed)."""

    def entry(v: Value) -> dict:
        out = {"name": v.name, "dtype": v.dtype.numpy.name if v.dtype else None,
               "shape": None if v.shape is None else list(v.shape)}
        least = {str(i): minimums[d] for i, d in enumerate(v.shape or ()) if isinstance(d, str) and d in (minimums or {})}
        if least and v in graph.inputs:
            out["min"] = least
        if v.sequence:  # a sequence of tensors: dtype and shape are its elements' (the runtime takes or returns a list)
            out.update(sequence=True, shape=out["shape"] or [])
            if v.seq_shapes is not None:  # an input's: its length and elements are fixed when compiling
                out["elements"] = [list(e) for e in v.seq_shapes]
        return out

    return [entry(v) for v in graph.inputs], [entry(v) for v in graph.outputs]


def check_compilable_signature(graph: Graph) -> None:
    """Unknown input dims need a size or a name before code can be generated."""
    for v in graph.inputs:
        if v.sequence and v.seq_shapes is None:
            example = shape_example(v.shape)
            raise CodegenError(f"input '{v.name}' is a sequence of tensors, whose length kiln fixes when compiling; "
                               f"give it with --input-shape '{v.name}=N*{example}' (N tensors of {example or 'rank 0'})")
        if v.sequence:
            continue  # its elements' pinned shapes hold ints and names only
        if v.shape is None:
            raise CodegenError(f"input '{v.name}' has an unknown rank; give its shape with --input-shape {v.name}=...")
        unknown = [i for i, d in enumerate(v.shape) if is_unknown_dim(d)]
        if unknown:
            example = shape_example(v.shape)
            raise CodegenError(
                f"input '{v.name}' is {v.type_str()}: dims {unknown} are unknown; give them sizes with "
                f"--input-shape {v.name}={example}"
            )


def _refuse_symbolic(graph: Graph, error: Exception) -> None:
    """Where TVM fails on a graph with symbolic input dims, say so in one line with the flags that pin them.

    TVM 0.27's VM cannot always order the run-time sizes of tensors whose dims an op computes
    from symbolic ones (seen: a detector's Resize chain); pinned, the same graph compiles.
    """
    symbolic = [v for v in graph.inputs if not v.sequence and not is_static(v.shape)]
    if not symbolic:
        return
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    raise CodegenError(f"TVM could not compile this model with symbolic dims ({first[:160]}); pin them with "
                       f"{pin_flags(symbolic)} (each ? a size)") from error


def pin_flags(inputs: list[Value]) -> str:
    """The ``--input-shape`` flags that would pin ``inputs``' symbolic dims, each as ``?``."""
    return " ".join(f"--input-shape {v.name}={shape_example(v.shape, '?')}" for v in inputs)


def build(
    graph: Graph,
    out: str | os.PathLike,
    *,
    target: Target | None = None,
    source_sha256: str | None = None,
    source_name: str | None = None,
    passes: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
    tuning_db: "TuningDatabase | None" = None,
    dim_minimums: dict[str, int] | None = None,
    compression: dict[str, Any] | None = None,
) -> BuildReport:
    """Compile ``graph`` for ``target`` (the host CPU by default) into the artifact ``out``.

    With ``tuning_db``, every kernel the database holds gets its best recorded schedule.
    ``dim_minimums`` (see :func:`kiln.ir.window_minimums`; by default, ``graph``'s own) go into
    the signature, so that the runtime refuses an input too small for a window. ``compression``
    is the manifest's compression entry (see :func:`kiln.ir.summary.compression_entry`).
    """
    import tvm
    from safetensors.numpy import save as save_safetensors

    target = target or cpu_target()
    say = progress or (lambda _: None)
    report = BuildReport(Path(out), target)
    check_compilable_signature(graph)

    t = time.perf_counter()
    say("lowering")
    lowered = lower(graph, target.layout_block or 16, int8_pairs=not target.has_vnni)
    report.seconds["lower"] = time.perf_counter() - t
    report.num_kernels = sum(1 for gv in lowered.module.get_global_vars() if gv.name_hint != "main")

    t = time.perf_counter()
    say("compiling")
    tvm_target = tvm.target.Target(dict(target.tvm))
    if target.kind != "cpu" and tuning_db is not None:
        raise CodegenError("--tune-db applies to CPU targets; kiln tunes only on this machine's CPU")
    try:
        if target.kind == "cpu":
            from kiln.codegen.schedule import cpu_pipeline

            tuned = tuning_db.lookup(tvm_target) if tuning_db is not None else None
            executable = tvm.compile(lowered.module, target=tvm_target, relax_pipeline=cpu_pipeline(tvm_target, tuned))
        else:
            executable = tvm.compile(lowered.module, target=tvm_target)
    except (RuntimeError, ValueError) as e:  # TVM's errors (InternalError is a RuntimeError)
        _refuse_symbolic(graph, e)
        raise
    members: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        lib_path = os.path.join(tmp, LIBRARY)
        executable.export_library(lib_path)
        members[LIBRARY] = Path(lib_path).read_bytes()
        if target.kind == "cuda":
            say("compiling CUDA kernels with nvcc")
            source = _cuda_source(executable)
            members[CUDA_SOURCE] = source.encode()
            members[CUDA_FATBIN] = _nvcc_fatbin(source, target.arch or "", tmp)
    report.seconds["compile"] = time.perf_counter() - t

    t = time.perf_counter()
    say("writing artifact")
    weights = save_safetensors({name: np.ascontiguousarray(arr) for name, arr in lowered.weights.items()})
    inputs, outputs = signature(graph, window_minimums(graph) if dim_minimums is None else dim_minimums)
    manifest = {
        "kiln_version": __version__,
        "tvm_version": metadata.version("apache-tvm"),
        "target": target.manifest(),
        "inputs": inputs,
        "outputs": outputs,
        "params": list(lowered.weights),  # weight parameters of main, in order after the inputs
        "weights": weight_signature(lowered.weights),
        "source": {"name": source_name, "sha256": source_sha256},
        "passes": list(passes or []),
        "tuning_db": tuning_db.manifest() if tuning_db is not None else None,
        "quantization": None,
        "compression": compression,
    }
    write_artifact(out, manifest, {**members, WEIGHTS: weights})
    report.seconds["write"] = time.perf_counter() - t
    return report


def set_manifest_entry(path: str | os.PathLike, key: str, value: Any) -> None:
    """Rewrite an artifact with one more manifest entry (its members unchanged, hashes rechecked)."""
    from kiln.runtime.artifact import read_artifact, write_artifact

    art = read_artifact(path, check_host=False, trusted=[])  # kiln's own artifact, just written
    write_artifact(path, {**art.manifest, key: value}, art.members)


def _cuda_source(executable: Any) -> str:
    """The CUDA C that TVM generated (without a CUDA driver, TVM keeps only the source)."""

    def find(mod: Any) -> Any:
        if mod.kind == "cuda":
            return mod
        for sub in mod.imports:
            found = find(sub)
            if found is not None:
                return found
        return None

    cuda = find(executable.mod)
    if cuda is None:
        raise CodegenError("the CUDA build produced no CUDA module")
    return cuda.inspect_source()


def _nvcc_fatbin(source: str, arch: str, workdir: str) -> bytes:
    """Compile CUDA C to a fatbin for ``arch`` (e.g. sm_90) with the installed nvcc."""
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        raise CodegenError("nvcc was not found; install the CUDA toolkit to build CUDA artifacts")
    if not arch.startswith("sm_") or not arch[3:].isdigit():
        raise CodegenError(f"CUDA arch '{arch}' should look like sm_90")
    cu, fatbin = os.path.join(workdir, CUDA_SOURCE), os.path.join(workdir, CUDA_FATBIN)
    Path(cu).write_text(source)
    proc = subprocess.run([nvcc, "--fatbin", "-O3", "-gencode", f"arch=compute_{arch[3:]},code={arch}", cu, "-o", fatbin],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CodegenError(f"nvcc failed for {arch}: {last}")
    return Path(fatbin).read_bytes()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
