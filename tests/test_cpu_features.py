"""The CPU-feature line of benchmark reports, parsed from /proc/cpuinfo text."""

from pathlib import Path

from mpiserve.cpu_features import describe, half_precision_units, has_matrix_units

AMX_HOST = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1
"""
NO_HALF_UNITS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"


def test_lists_the_half_precision_units_in_a_fixed_order():
    assert half_precision_units(AMX_HOST) == ["amx_bf16", "avx512_bf16"]
    assert describe(half_precision_units(AMX_HOST)) == \
        "half-precision units: amx_bf16, avx512_bf16"


def test_a_cpu_without_them_says_bfloat16_is_emulated():
    assert half_precision_units(NO_HALF_UNITS) == []
    assert "emulated" in describe([])


def test_text_without_a_flags_line_is_unknown():
    assert half_precision_units("processor\t: 0\n") is None
    assert describe(None) == "half-precision units unknown"


def test_this_machine_has_a_flags_line_on_linux():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        assert half_precision_units() is None
        return
    flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
    units = half_precision_units()
    assert isinstance(units, list) and all(f" {unit}" in flags for unit in units)


def test_matrix_units_are_amx_of_the_dtype():
    assert has_matrix_units("bfloat16", AMX_HOST)
    assert not has_matrix_units("float16", AMX_HOST)        # amx_fp16 not listed
    avx512_bf16_only = "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n"
    assert not has_matrix_units("bfloat16", avx512_bf16_only)
    assert not has_matrix_units("float32", AMX_HOST)
    assert not has_matrix_units("bfloat16", "processor\t: 0\n")
