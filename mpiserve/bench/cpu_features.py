"""Which half-precision matrix units this CPU offers, for benchmark reports.

Half-precision figures on a CPU hang on these: with AMX or AVX-512-BF16 a bfloat16 product runs
several times faster than float32, without them oneDNN emulates it and runs several times
slower (mpiserve then multiplies in float32, see `model.matmul_dtype`; other engines may not).
A virtual machine can hide the units of the host CPU, so the same instance type can report
either; a report records what the machine it ran on had.
"""

from __future__ import annotations

from pathlib import Path

HALF_PRECISION_FLAGS = ("amx_bf16", "amx_fp16", "avx512_bf16", "avx512_fp16")


def half_precision_units(cpuinfo: str | None = None) -> list[str] | None:
    """The flags of `HALF_PRECISION_FLAGS` the first CPU lists (in that order); None where
    there is no /proc/cpuinfo to read (not Linux)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if not path.is_file():
            return None
        cpuinfo = path.read_text()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            present = set(value.split())
            return [flag for flag in HALF_PRECISION_FLAGS if flag in present]
    return None


def describe(units: list[str] | None) -> str:
    if units is None:
        return "half-precision units unknown"
    if not units:
        return "no AMX or AVX-512 half-precision units (bfloat16 products are emulated)"
    return "half-precision units: " + ", ".join(units)
