"""Build: lower a graph, compile it with TVM, and write a ``.kiln`` artifact."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

from kiln import __version__
from kiln.codegen.lower import CodegenError, lower
from kiln.codegen.target import Target, cpu_target
from kiln.ir import Graph, is_unknown_dim
from kiln.runtime.artifact import write_artifact

LIBRARY = "model.so"
WEIGHTS = "weights.safetensors"


@dataclass
class BuildReport:
    """What a build did and how long each stage took."""

    path: Path
    target: Target
    seconds: dict[str, float] = field(default_factory=dict)
    num_kernels: int = 0


def signature(graph: Graph) -> tuple[list[dict], list[dict]]:
    """The graph's input and output signature as manifest entries (symbolic dims by name)."""

    def entry(v) -> dict:
        return {"name": v.name, "dtype": v.dtype.numpy.name if v.dtype else None,
                "shape": None if v.shape is None else list(v.shape)}

    return [entry(v) for v in graph.inputs], [entry(v) for v in graph.outputs]


def check_compilable_signature(graph: Graph) -> None:
    """Unknown input dims need a size or a name before code can be generated."""
    for v in graph.inputs:
        if v.shape is None:
            raise CodegenError(f"input '{v.name}' has an unknown rank; give its shape with --input-shape {v.name}=...")
        unknown = [i for i, d in enumerate(v.shape) if is_unknown_dim(d)]
        if unknown:
            example = "x".join(str(d) if isinstance(d, int) else "1" for d in v.shape)
            raise CodegenError(
                f"input '{v.name}' is {v.type_str()}: dims {unknown} are unknown; give them sizes with "
                f"--input-shape {v.name}={example}"
            )


def build(
    graph: Graph,
    out: str | os.PathLike,
    *,
    target: Target | None = None,
    source_sha256: str | None = None,
    source_name: str | None = None,
    passes: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> BuildReport:
    """Compile ``graph`` for ``target`` (the host CPU by default) into the artifact ``out``."""
    import tvm
    from safetensors.numpy import save as save_safetensors

    target = target or cpu_target()
    if target.kind != "cpu":
        raise CodegenError("only the cpu target builds artifacts yet")
    say = progress or (lambda _: None)
    report = BuildReport(Path(out), target)
    check_compilable_signature(graph)

    t = time.perf_counter()
    say("lowering")
    lowered = lower(graph)
    report.seconds["lower"] = time.perf_counter() - t
    report.num_kernels = sum(1 for gv in lowered.module.get_global_vars() if gv.name_hint != "main")

    t = time.perf_counter()
    say("compiling")
    executable = tvm.compile(lowered.module, target=tvm.target.Target(dict(target.tvm)))
    with tempfile.TemporaryDirectory() as tmp:
        lib_path = os.path.join(tmp, LIBRARY)
        executable.export_library(lib_path)
        library = Path(lib_path).read_bytes()
    report.seconds["compile"] = time.perf_counter() - t

    t = time.perf_counter()
    say("writing artifact")
    weights = save_safetensors({name: np.ascontiguousarray(arr) for name, arr in lowered.weights.items()})
    inputs, outputs = signature(graph)
    manifest = {
        "kiln_version": __version__,
        "tvm_version": metadata.version("apache-tvm"),
        "target": target.manifest(),
        "inputs": inputs,
        "outputs": outputs,
        "params": list(lowered.weights),  # weight parameters of main, in order after the inputs
        "source": {"name": source_name, "sha256": source_sha256},
        "passes": list(passes or []),
        "tuning_db": None,
        "quantization": None,
    }
    write_artifact(out, manifest, {LIBRARY: library, WEIGHTS: weights})
    report.seconds["write"] = time.perf_counter() - t
    return report


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
