"""What the processor offers for reduced precision: a bfloat16 network is fast only on CPUs with
bfloat16 units (x86 AVX512-BF16 or AMX, Arm BF16); elsewhere oneDNN emulates it, slower than
float32. The training (``--mixed-precision``) and certification (``--precision bfloat16``) options
warn in that case instead of silently running slower.
"""

from __future__ import annotations

import platform
import warnings
from pathlib import Path

BFLOAT16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 / x86 / Arm (Features)


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU feature flags of the first processor in ``cpuinfo``; None when unreadable (not
    Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return None


def cpu_has_bfloat16_units(flags: frozenset[str] | None = None) -> bool | None:
    """True/False from the CPU flags (``cpu_flags()`` by default); None when they are unknown."""
    flags = cpu_flags() if flags is None else flags
    return None if flags is None else bool(flags & BFLOAT16_CPU_FLAGS)


def warn_if_bfloat16_is_emulated(what: str, flags: frozenset[str] | None = None) -> bool:
    """Warn (and return True) when ``what`` will compute in bfloat16 on a CPU known to lack
    bfloat16 units."""
    if cpu_has_bfloat16_units(flags) is not False:
        return False
    warnings.warn(
        f"{what} computes in bfloat16, but this CPU ({platform.processor() or platform.machine()}) "
        "has no bfloat16 units (no avx512_bf16/amx_bf16/bf16 flag), so it is emulated and likely "
        "slower than float32. Leave the option off on this machine.", RuntimeWarning, stacklevel=3)
    return True
