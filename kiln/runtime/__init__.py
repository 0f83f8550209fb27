"""The artifact runtime: load a ``.kiln`` file and run it.

    import kiln.runtime
    model = kiln.runtime.load("model.kiln")
    outputs = model.run({"input": array})

It imports numpy, safetensors and the TVM runtime (``tvm_ffi`` plus
``libtvm_runtime.so``) only: never onnx, never the TVM compiler. Before any
native code loads, the artifact's member hashes, schema, TVM version and the
host's CPU features are checked (:mod:`kiln.runtime.artifact`). Every call
checks input names, dtypes and shapes against the signature. ``run`` is safe to
call from several threads: each runner thread gets its own VM over the one library, and the
runs of all loaded models share the process's cores (:mod:`kiln.runtime.cores`).

Loading a ``.so`` runs its code: only load artifacts from sources you trust.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from kiln.errors import RUNTIME_CHECK, InputError, KilnError
from kiln.runtime.artifact import LIBRARY, ArtifactError, read_artifact
from kiln.runtime.cores import CORES, run_on_cores

__all__ = ["CompiledModel", "Signature", "load"]

_ALIGN = 64  # TVM's kernels assume 64-byte-aligned buffers
_runtime_lock = threading.Lock()
_runtime_ready = False


@dataclass(frozen=True)
class Signature:
    """One input or output: name, numpy dtype name, and dims (ints or symbol names)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    sequence: bool = False  # a sequence of tensors: a list of arrays (dtype and shape are its elements')
    elements: tuple[tuple[int | str, ...], ...] | None = None  # a sequence input's elements' dims, fixed when compiling
    least: tuple[tuple[int, int], ...] = ()  # (dim index, least size) of symbolic dims a conv's window needs

    def __str__(self) -> str:
        text = f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"
        if not self.sequence:
            return f"{self.name}: {text}"
        if self.elements is None:
            return f"{self.name}: seq({text})"
        return f"{self.name}: [" + ", ".join(f"{self.dtype}[{','.join(str(d) for d in e)}]" for e in self.elements) + "]"


def _ensure_tvm_runtime() -> Any:
    """Load libtvm_runtime.so (unless the full TVM is already in this process) and return tvm_ffi."""
    global _runtime_ready
    import tvm_ffi  # first: it loads libtvm_ffi.so, which libtvm_runtime.so links against

    with _runtime_lock:
        if not _runtime_ready:
            if "tvm" not in sys.modules:  # the compiler's libtvm already carries the runtime
                # apache-tvm's copy where the compiler is installed; else the one the deploy-only
                # kiln-runtime wheel vendors beside this file (packaging/runtime/)
                spec = importlib.util.find_spec("tvm")  # finds the package without importing it
                vendored = Path(__file__).parent / "lib" / "libtvm_runtime.so"
                if spec is not None and spec.origin is not None:
                    lib = Path(spec.origin).parent / "lib" / "libtvm_runtime.so"
                elif vendored.exists():
                    lib = vendored
                else:
                    raise KilnError("the TVM runtime is not installed (pip install kiln-runtime, or apache-tvm)")
                if not lib.exists():
                    raise KilnError(f"the TVM runtime library is missing: {lib}")
                ctypes.CDLL(str(lib), ctypes.RTLD_GLOBAL)
            _runtime_ready = True
    return tvm_ffi


def _aligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``a`` whose data starts on a 64-byte boundary (or ``a`` if it is one).

    Empty arrays are rebuilt too: numpy gives them arbitrary strides and data pointers, and the
    VM checks both.
    """
    if a.size and a.flags.c_contiguous and a.flags.writeable and a.__array_interface__["data"][0] % _ALIGN == 0:
        return a  # (DLPack cannot export a read-only array)
    buf = np.empty(a.nbytes + _ALIGN, dtype=np.uint8)
    offset = (-buf.__array_interface__["data"][0]) % _ALIGN
    strides, step = [], a.itemsize
    for d in reversed(a.shape):  # C order, spelled out: an empty array's numpy strides are arbitrary
        strides.append(step)
        step *= int(d)
    out = np.ndarray(a.shape, a.dtype, buffer=buf, offset=offset, strides=tuple(reversed(strides)))
    out[...] = a
    return out


class _Signature:
    """A model's inputs as ``name: dtype[dims], ...`` when formatted (a run's checks format it only to fail)."""

    __slots__ = ("inputs",)

    def __init__(self, inputs: Any):
        self.inputs = inputs

    def __str__(self) -> str:
        return ", ".join(str(s) for s in self.inputs)


def _configure_tvm_pool(width: int, cpus: list[int]) -> None:
    """Size this runner thread's TVM pool to ``width`` threads, one on each of ``cpus``."""
    ffi = _ensure_tvm_runtime()
    config = ffi.get_global_func("runtime.config_threadpool", allow_missing=True)
    if config is not None:
        config(-2, width, [str(c) for c in cpus])  # -2: one core per thread, from the list


@dataclass(frozen=True)
class KernelTime:
    """One kernel's share of a model run, from :meth:`CompiledModel.profile`."""

    name: str
    calls: int  # per run
    ms: float  # per run, all calls together


class CompiledModel:
    """A loaded artifact. ``run({name: array}) -> {name: array}``; thread-safe."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None,
                 trusted_keys: Iterable[str | os.PathLike | bytes] | str | os.PathLike | None = None):
        artifact = read_artifact(path, trusted=trusted_keys)  # refuses before anything native loads
        m = artifact.manifest
        target = m.get("target") or {}
        if target.get("kind") == "cuda":
            raise ArtifactError(f"{path}: a CUDA artifact ({target.get('arch')}); this runtime runs CPU artifacts only so far")
        self.path = Path(path)
        self.manifest = m
        self.signer = artifact.signer
        self.inputs = [Signature(s["name"], s["dtype"], tuple(s["shape"]), bool(s.get("sequence")),
                                 None if s.get("elements") is None else tuple(tuple(e) for e in s["elements"]),
                                 tuple(sorted((int(i), int(n)) for i, n in (s.get("min") or {}).items())))
                       for s in m["inputs"]]
        self.outputs = [Signature(s["name"], s["dtype"], tuple(s["shape"] or ()), bool(s.get("sequence")))
                        for s in m["outputs"]]
        self._ffi = _ensure_tvm_runtime()
        self._weights_np = [_aligned(np.ascontiguousarray(artifact.weights[n])) for n in m.get("params", [])]
        self._weights = [self._ffi.from_dlpack(w, require_alignment=_ALIGN) for w in self._weights_np]
        self._tmp = tempfile.TemporaryDirectory(prefix="kiln-")
        lib_path = os.path.join(self._tmp.name, LIBRARY)
        Path(lib_path).write_bytes(artifact.member(LIBRARY))
        self._module = self._ffi.load_module(lib_path)
        self._local = threading.local()
        self.threads = int(threads or (m.get("target") or {}).get("threads") or CORES.count)

    def _vm(self) -> Any:
        """This runner thread's VM over the one loaded library."""
        vm = getattr(self._local, "vm", None)
        if vm is None:
            vm = self._module["vm_load_executable"]()
            vm["vm_initialization"](1, 0, 2)  # CPU device 0, pooled allocator
            self._local.vm = vm
        return vm

    def _invoke(self, args: list[Any]) -> Any:
        try:
            return run_on_cores(self.threads, lambda: self._vm()["main"](*args, *self._weights), _configure_tvm_pool)
        except Exception as e:  # a check compiled into the kernels refused the inputs' values
            message = str(e)
            if RUNTIME_CHECK not in message:
                raise
            raise InputError(message.split(RUNTIME_CHECK, 1)[1].splitlines()[0]) from None

    def _check(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        sig = _Signature(self.inputs)  # the expected inputs, spelled out only in an error
        names = {s.name for s in self.inputs}
        unknown = sorted(set(feeds) - names)
        missing = [s.name for s in self.inputs if s.name not in feeds]
        if unknown or missing:
            what = "; ".join(x for x in (f"missing {', '.join(missing)}" if missing else "",
                                         f"unexpected {', '.join(unknown)}" if unknown else "") if x)
            raise InputError(f"inputs do not match the model ({what}); expected {sig}")
        bound: dict[str, int] = {}
        arrays = []
        for s in self.inputs:
            if s.sequence:  # a list of arrays, each checked as one input; they go to the library one by one
                given = feeds[s.name]
                n = len(s.elements or ())
                if not isinstance(given, (list, tuple)) or len(given) != n:
                    what = f"a list of {len(given)}" if isinstance(given, (list, tuple)) else type(given).__name__
                    raise InputError(f"input '{s.name}' is {what}; expected {sig}")
                elements = [(f"{s.name}[{i}]", a, dims) for i, (a, dims) in enumerate(zip(given, s.elements or ()))]
            else:
                elements = [(s.name, feeds[s.name], s.shape)]
            for label, given, shape in elements:
                a = np.asarray(given)
                if a.dtype.name != s.dtype:
                    raise InputError(f"input '{label}' has dtype {a.dtype.name}; expected {sig}")
                ok = len(a.shape) == len(shape)
                for d, actual in zip(shape, a.shape):
                    if isinstance(d, int):
                        ok &= d == actual
                    elif bound.setdefault(d, actual) != actual:
                        ok = False
                if not ok:
                    raise InputError(f"input '{label}' has shape {list(a.shape)}; expected {sig}")
                for i, least in s.least:
                    if a.shape[i] < least:
                        raise InputError(f"input '{label}' has shape {list(a.shape)}: its dim {i} ({shape[i]}) must be "
                                         f"at least {least} for the model's conv and pool windows; expected {sig}")
                arrays.append(a)
        return arrays

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on one set of inputs (keyed by input name); returns outputs by name."""
        arrays = self._check(inputs)
        keep = [_aligned(a) for a in arrays]  # (np.ascontiguousarray would make a 0-d array 1-d)
        args = [self._ffi.from_dlpack(a, require_alignment=_ALIGN) for a in keep]
        result = self._invoke(args)
        outs = [result] if len(self.outputs) == 1 else list(result) if result is not None else []
        if len(outs) != len(self.outputs) or any(o is None for o in outs):
            raise ArtifactError(f"{self.path}: the library returned {len(outs)} outputs; the manifest lists "
                                f"{len(self.outputs)}; the artifact is broken, recompile it")
        return {s.name: [np.array(np.from_dlpack(e), copy=True) for e in o] if s.sequence else
                np.array(np.from_dlpack(o), copy=True) for s, o in zip(self.outputs, outs)}

    def profile(self, inputs: Mapping[str, np.ndarray], runs: int = 10) -> list[KernelTime]:
        """Per-kernel times over ``runs`` runs, from the VM's instrument hook; slowest first.

        The VM's own builtins (allocation, shape checks) are summed into one row. The hook
        costs a little per call, so the rows add up to slightly more than a plain run.
        """
        arrays = [_aligned(a) for a in self._check(inputs)]
        args = [self._ffi.from_dlpack(a, require_alignment=_ALIGN) for a in arrays]
        seconds: dict[str, float] = {}
        calls: dict[str, int] = {}
        started: dict[str, float] = {}

        def hook(_func: Any, symbol: str, before: bool, _ret: Any, *_args: Any) -> int:
            name = "(vm builtins)" if str(symbol).startswith("vm.builtin.") else str(symbol)
            if before:
                started[name] = time.perf_counter()
            else:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started.pop(name, time.perf_counter())
                calls[name] = calls.get(name, 0) + 1
            return 0  # carry on as usual

        def profiled() -> None:  # on a runner thread, as run() is: its TVM pool has the run's width
            vm = self._module["vm_load_executable"]()  # its own VM: the runner's keeps no hook
            vm["vm_initialization"](1, 0, 2)
            vm["main"](*args, *self._weights)  # warm up before the hook goes in
            vm["set_instrument"](hook)
            for _ in range(runs):
                vm["main"](*args, *self._weights)

        run_on_cores(self.threads, profiled, _configure_tvm_pool)
        rows = [KernelTime(n, calls[n] // runs, s / runs * 1e3) for n, s in seconds.items()]
        return sorted(rows, key=lambda r: -r.ms)

    def run_batch(self, batch: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Run the model on each input set in turn."""
        return [self.run(feeds) for feeds in batch]

    def __repr__(self) -> str:
        ins = ", ".join(str(s) for s in self.inputs)
        outs = ", ".join(str(s) for s in self.outputs)
        return f"<CompiledModel {self.path.name}: ({ins}) -> ({outs})>"


def load(path: str | os.PathLike, *, threads: int | None = None,
         trusted_keys: Iterable[str | os.PathLike | bytes] | str | os.PathLike | None = None) -> CompiledModel:
    """Verify and load a ``.kiln`` artifact.

    ``trusted_keys`` (public key files, folders of them, or raw ed25519 keys; default: the
    ``KILN_TRUSTED_KEYS`` environment variable) is a trust policy: with one, only an artifact
    signed by one of those keys loads.
    """
    return CompiledModel(path, threads=threads, trusted_keys=trusted_keys)
