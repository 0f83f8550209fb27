"""The host CPU as the runtime sees it: its feature flags, and what each LLVM CPU name assumes.

The compiler names an LLVM ``mcpu`` for the host (``kiln.codegen.target``) from the table
below; an artifact's manifest records that mcpu and the features it needs, and the runtime
refuses an artifact whose features this host lacks. The table lives here, with the reader
of the format, so that the runtime can also tell when a manifest's features were edited to
say less than its mcpu needs.
"""

from __future__ import annotations

import platform
from pathlib import Path

#: LLVM CPU names, most capable first, with the /proc/cpuinfo flags each one assumes.
#: An LLVM CPU name also implies features that no flag here names (``znver4`` implies AMD's SSE4A
#: and CLZERO, for one), so an entry applies only to its vendor's CPUs (:data:`CPU_VENDORS`): an
#: Intel Xeon whose hypervisor hides AMX has every flag ``znver4`` lists, and code built for
#: ``znver4`` dies of an illegal instruction there.
CPU_MODELS: list[tuple[str, tuple[str, ...]]] = [
    ("sapphirerapids", ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8")),
    ("znver4", ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16")),
    ("cooperlake", ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16")),
    ("icelake-server", ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")),
    ("skylake-avx512", ("avx512f", "avx512bw", "avx512vl")),
    ("haswell", ("avx2", "fma")),
    ("x86-64", ()),
]

#: The vendor (``vendor_id`` in /proc/cpuinfo) an LLVM CPU name is for; names not listed suit any x86 CPU.
CPU_VENDORS: dict[str, str] = {
    "sapphirerapids": "GenuineIntel", "cooperlake": "GenuineIntel", "icelake-server": "GenuineIntel",
    "skylake-avx512": "GenuineIntel", "znver4": "AuthenticAMD",
}


def mcpu_features(mcpu: str | None) -> tuple[str, ...] | None:
    """The flags an artifact built for ``mcpu`` needs, or None for a CPU name not in the table."""
    for name, needed in CPU_MODELS:
        if name == mcpu:
            return needed
    return None


def _cpuinfo(key: str) -> str | None:
    """The first ``key`` field of /proc/cpuinfo (None if unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.split(":", 1)[0].strip() == key:
            return line.split(":", 1)[1].strip() or None
    return None


def host_cpu_name() -> str:
    """The CPU's model name, with its family and model numbers when the name alone is generic
    (a hypervisor may say just "AMD EPYC"; family 25 model 17 is Zen 4)."""
    name = _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"
    family, model = _cpuinfo("cpu family"), _cpuinfo("model")
    if family and model and not any(ch.isdigit() for ch in name):
        name = f"{name} (family {family}, model {model})"
    return name


def host_cpu_vendor() -> str | None:
    """This machine's CPU vendor (``GenuineIntel``, ``AuthenticAMD``), or None if unknown."""
    return _cpuinfo("vendor_id")


def host_cpu_features() -> set[str]:
    """The CPU feature flags of this machine (``/proc/cpuinfo`` flags; empty if unknown)."""
    return set((_cpuinfo("flags") or "").split())
