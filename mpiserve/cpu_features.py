"""Which half-precision matrix units this CPU offers: for benchmark reports, and for the
engine's choice of prefill attention in half precision (`has_matrix_units`).

Half-precision figures on a CPU hang on these: with AMX or AVX-512-BF16 a bfloat16 product runs
several times faster than float32, without them oneDNN emulates it and runs several times
slower (mpiserve then multiplies in float32, see `model.matmul_dtype`; other engines may not).
A virtual machine can hide the units of the host CPU, so the same instance type can report
either; a report records what the machine it ran on had.
"""

from __future__ import annotations

from pathlib import Path

HALF_PRECISION_FLAGS = ("amx_bf16", "amx_fp16", "avx512_bf16", "avx512_fp16")


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The flags the first CPU of `cpuinfo` (default: /proc/cpuinfo) lists; None where there
    is no such text (not Linux) or it has no flags line."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if not path.is_file():
            return None
        cpuinfo = path.read_text()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return set(value.split())
    return None


def half_precision_units(cpuinfo: str | None = None) -> list[str] | None:
    """The flags of `HALF_PRECISION_FLAGS` the first CPU lists (in that order); None where
    there is no /proc/cpuinfo to read (not Linux)."""
    present = cpu_flags(cpuinfo)
    if present is None:
        return None
    return [flag for flag in HALF_PRECISION_FLAGS if flag in present]


def has_avx512(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has AVX-512's 32 vector registers of 16 floats (`avx512f`): what the
    float32 panel kernel's tiles are cut for (`model.linear_weight`)."""
    return "avx512f" in (cpu_flags(cpuinfo) or ())


def describe(units: list[str] | None) -> str:
    if units is None:
        return "half-precision units unknown"
    if not units:
        return "no AMX or AVX-512 half-precision units (bfloat16 products are emulated)"
    return "half-precision units: " + ", ".join(units)


MATRIX_UNITS = {"bfloat16": "amx_bf16", "float16": "amx_fp16"}


def has_matrix_units(dtype_name: str, cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies `dtype_name` ("bfloat16", "float16") in AMX tiles. Torch's
    SDPA in half precision wins there (6.0 ms for a 1,024-token SmolLM2 layer on an AMX Xeon,
    about half the numba kernel's time); with AVX-512-BF16 alone (an AMD EPYC) it took 2.5x
    the kernel's time (``results/README.md``). A fact of the CPU, not a timing, so every
    engine of a job on one kind of host takes the same path, and the same roundings."""
    unit = MATRIX_UNITS.get(dtype_name)
    return unit is not None and unit in (half_precision_units(cpuinfo) or [])
