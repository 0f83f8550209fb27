"""Compilation targets: the host CPU's features, a matching LLVM ``mcpu``, and target dicts.

``mcpu: native`` is refused by this TVM build, and an unknown mcpu silently
falls back to generic code, so kiln names the CPU itself: the most capable
entry of :data:`kiln.runtime.cpu.CPU_MODELS` whose required features the host has, checked
against LLVM's list of valid CPUs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

from kiln.errors import KilnError
from kiln.runtime.cpu import CPU_MODELS, CPU_VENDORS, host_cpu_features, host_cpu_vendor, mcpu_features

class TargetError(KilnError):
    """The requested target is unknown, invalid, or not buildable here."""


@dataclass
class Target:
    """What kiln compiles for: a TVM target dict, and what a host needs to run the result."""

    kind: str  # "cpu" or "cuda"
    tvm: dict[str, Any]
    cpu_features: list[str] = field(default_factory=list)
    arch: str | None = None
    threads: int | None = None
    precision: str = "fp32"  # float32 compute: "fp32", or "bf16" for convs (see with_bf16)

    @property
    def layout_block(self) -> int:
        """float32 lanes per vector, the layout pass's block (0: no blocked layout for this target)."""
        if self.kind != "cpu":
            return 0
        feats = set(self.cpu_features)
        return 16 if "avx512f" in feats else 8 if "avx2" in feats else 4

    @property
    def has_vnni(self) -> bool:
        """Whether the CPU this target builds for has AVX-512 VNNI (kiln's int8 kernels' instruction)."""
        return self.kind == "cpu" and "avx512_vnni" in self.cpu_features

    def manifest(self) -> dict[str, Any]:
        """The target as recorded in an artifact's manifest."""
        out: dict[str, Any] = {"kind": self.kind, "tvm": self.tvm}
        if self.kind == "cpu":
            out["cpu_features"] = self.cpu_features
            out["mcpu"] = self.tvm.get("mcpu")
        if self.arch:
            out["arch"] = self.arch
        if self.threads:
            out["threads"] = self.threads
        if self.precision != "fp32":
            out["precision"] = self.precision
        return out


#: LLVM CPU names whose code kiln builds as another name's. The second's instructions are a subset
#: of the first's (LLVM's own feature lists; a test checks them), so its code runs wherever the
#: first's does, and LLVM's scheduling model for it serves kiln's register tiles better: for
#: znver4, LLVM hoists an unrolled conv tile's input broadcasts ahead of their FMAs and spills
#: them to the stack. On an AMD EPYC (Zen 4, 2 threads) a 3x3 64-channel conv at 56x56 ran
#: 140 GFLOP/s as znver4 code and 211 as icelake-server code, a 1x1 256->64 one 170 and 219, and
#: the transformer GEMMs the same or up to 5% faster.
CODE_AS: dict[str, str] = {"znver4": "icelake-server"}


def choose_mcpu(features: set[str], valid: set[str] | None = None,
                vendor: str | None = None) -> tuple[str, list[str]]:
    """The LLVM CPU name kiln builds code as for a host with ``features`` (from ``vendor``, when
    known), and the features that code assumes. A vendor's CPU names are never chosen for another
    vendor's CPU, except as the :data:`CODE_AS` stand-in for one of its own."""
    for name, needed in CPU_MODELS:
        if vendor is not None and CPU_VENDORS.get(name, vendor) != vendor:
            continue
        if set(needed) <= features and (valid is None or name in valid):
            alias = CODE_AS.get(name)
            if alias is not None and (valid is None or alias in valid):
                return alias, list(mcpu_features(alias) or ())
            return name, list(needed)
    return "x86-64", []


def with_bf16(target: Target) -> Target:
    """``target`` computing its convs in bf16: the ``avx512bf16`` LLVM feature on top of its
    ``mcpu`` (the :data:`CODE_AS` stand-in for a Zen 4 lacks it), ``avx512_bf16`` among the
    features its artifacts require, and precision ``bf16`` (the pipeline adds the bf16 pass).
    Raises :class:`TargetError` for a target whose CPU has no AVX-512 BF16."""
    if target.kind != "cpu":
        raise TargetError(f"--precision bf16 builds CPU kernels; this target is {target.kind}")
    mcpu = target.tvm.get("mcpu")
    known = set(mcpu_features(mcpu) or ()) | set(target.cpu_features)
    if "avx512_bf16" not in known and not ("avx512_bf16" in host_cpu_features() and mcpu == cpu_target().tvm["mcpu"]):
        raise TargetError(f"--precision bf16 needs a CPU with AVX-512 BF16 (vdpbf16ps); this target builds as "
                          f"{mcpu or 'x86-64'}, without it: compile in float32, or with --quantize int8")
    tvm = dict(target.tvm)
    tvm["mattr"] = sorted(set(tvm.get("mattr", [])) | {"+avx512bf16"})
    features = sorted(set(target.cpu_features) | {"avx512_bf16"})
    return replace(target, tvm=tvm, cpu_features=features, precision="bf16")


def cpu_target(threads: int | None = None, features: set[str] | None = None) -> Target:
    """The host CPU as a target (LLVM, a detected mcpu, all cores or ``threads``)."""
    from kiln.codegen._tvm import valid_llvm_cpus

    feats = host_cpu_features() if features is None else features
    vendor = host_cpu_vendor() if features is None else None
    mcpu, needed = choose_mcpu(feats, set(valid_llvm_cpus(tuple(name for name, _ in CPU_MODELS))), vendor)
    cores = threads or os.cpu_count() or 1
    return Target("cpu", {"kind": "llvm", "mcpu": mcpu, "num-cores": cores}, needed, threads=threads)


def parse_target(spec: str | None, *, arch: str | None = None, threads: int | None = None) -> Target:
    """``cpu``, ``cuda`` (with ``arch``), or a JSON target dict for experts."""
    if spec in (None, "", "cpu", "llvm"):
        return cpu_target(threads)
    if spec == "cuda":
        if not arch:
            raise TargetError("--target cuda needs --arch, e.g. --arch sm_90 (no GPU here to detect one)")
        return Target("cuda", {"kind": "cuda", "arch": arch}, arch=arch, threads=threads)
    if spec.lstrip().startswith("{"):
        try:
            d = json.loads(spec)
        except json.JSONDecodeError as e:
            raise TargetError(f"--target is not valid JSON: {e}") from None
        kind = d.get("kind")
        if kind == "llvm":
            return Target("cpu", d, [], threads=threads)
        if kind == "cuda":
            return Target("cuda", d, arch=d.get("arch"), threads=threads)
        raise TargetError(f"--target kind {kind!r} is not supported; use llvm or cuda")
    raise TargetError(f"unknown target '{spec}'; use cpu, cuda or a JSON target dict")
