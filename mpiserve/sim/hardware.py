"""Accelerator specs for the analytic cost model: built-in ones and a user's YAML/JSON file.

Peak figures are NVIDIA's datasheet numbers, dense: half the figures the datasheets give "with
sparsity" (H100 BF16: 1,979 with sparsity, so 989.5 dense):

- H100 SXM5 80GB — NVIDIA H100 Tensor Core GPU datasheet: BF16 989.5 TFLOPS, FP8 1,979 TFLOPS,
  HBM3 3.35 TB/s, 80 GB; NVLink 4 900 GB/s total, i.e. 450 GB/s each way.
- H200 SXM 141GB — NVIDIA H200 Tensor Core GPU datasheet: BF16 989.5 TFLOPS, FP8 1,979 TFLOPS,
  HBM3e 4.8 TB/s, 141 GB; NVLink 900 GB/s total (450 GB/s each way).
- A100 SXM4 80GB — NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS, no FP8 (FP8
  weights are then multiplied in BF16), HBM2e 2,039 GB/s, 80 GB; NVLink 3 600 GB/s total
  (300 GB/s each way).

Not from datasheets, and stated as assumptions: the collective and transfer latencies (a few
microseconds for an NVLink all-reduce step, tens for a KV transfer's setup) and the achieved
fractions of peak (`compute_efficiency`, `memory_efficiency`): dense GEMMs in serving engines
reach roughly half to two thirds of peak FLOP/s, streaming reads about 80% of peak bandwidth.
Set both to 1.0 for a pure roofline. KV moves between engines over the same NVLink.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path

from ..errors import MpiserveError

TERA, GIGA = 1e12, 1e9


class HardwareSpecError(MpiserveError):
    pass


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    bf16_flops: float                   # peak dense FLOP/s per device
    fp8_flops: float | None             # None: no FP8 tensor cores (BF16 math on FP8 weights)
    hbm_bytes_per_s: float
    hbm_bytes: float                    # device memory
    allreduce_bytes_per_s: float        # per device, one direction, for TP all-reduce
    allreduce_latency_s: float          # per all-reduce step (ring: 2 (tp - 1) steps)
    kv_bytes_per_s: float               # per device pair, one direction, for KV transfer
    kv_latency_s: float                 # per transfer
    compute_efficiency: float = 0.6     # achieved fraction of peak FLOP/s
    memory_efficiency: float = 0.8      # achieved fraction of peak HBM bandwidth
    step_overhead_s: float = 0.0        # per engine step: scheduling, launches

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "name" and value is not None and not value >= 0:
                raise HardwareSpecError(f"hardware {self.name}: {f.name}={value} must be >= 0")
        for name in ("bf16_flops", "hbm_bytes_per_s", "allreduce_bytes_per_s",
                     "kv_bytes_per_s", "compute_efficiency", "memory_efficiency"):
            if not getattr(self, name) > 0:
                raise HardwareSpecError(f"hardware {self.name}: {name} must be positive")

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for weights of `dtype` ("bf16" or "fp8")."""
        if dtype == "fp8" and self.fp8_flops:
            return self.fp8_flops
        return self.bf16_flops


H100 = HardwareSpec("h100", bf16_flops=989.5 * TERA, fp8_flops=1979 * TERA,
                    hbm_bytes_per_s=3.35e12, hbm_bytes=80 * GIGA,
                    allreduce_bytes_per_s=450 * GIGA, allreduce_latency_s=5e-6,
                    kv_bytes_per_s=450 * GIGA, kv_latency_s=20e-6)
H200 = replace(H100, name="h200", hbm_bytes_per_s=4.8e12, hbm_bytes=141 * GIGA)
A100 = HardwareSpec("a100", bf16_flops=312 * TERA, fp8_flops=None,
                    hbm_bytes_per_s=2.039e12, hbm_bytes=80 * GIGA,
                    allreduce_bytes_per_s=300 * GIGA, allreduce_latency_s=5e-6,
                    kv_bytes_per_s=300 * GIGA, kv_latency_s=20e-6)
BUILTIN_HARDWARE = {spec.name: spec for spec in (H100, H200, A100)}


def load_hardware(name_or_path: str) -> HardwareSpec:
    """A built-in spec by name, or a YAML/JSON file with HardwareSpec's fields (a `base`
    field names a built-in spec whose other fields it keeps)."""
    if name_or_path.lower() in BUILTIN_HARDWARE:
        return BUILTIN_HARDWARE[name_or_path.lower()]
    path = Path(name_or_path)
    if not path.is_file():
        raise HardwareSpecError(f"--hardware {name_or_path}: not a built-in spec "
                                f"({', '.join(BUILTIN_HARDWARE)}) nor a file")
    raw = _read_mapping(path)
    base = raw.pop("base", None)
    known = {f.name for f in fields(HardwareSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise HardwareSpecError(f"{path}: unknown field(s) {', '.join(unknown)} "
                                f"(known: {', '.join(sorted(known))})")
    raw.setdefault("name", path.stem)
    if base is not None:
        if str(base).lower() not in BUILTIN_HARDWARE:
            raise HardwareSpecError(f"{path}: base {base!r} is not a built-in spec")
        return replace(BUILTIN_HARDWARE[str(base).lower()], **raw)
    missing = sorted(f.name for f in fields(HardwareSpec)
                     if f.name not in raw and f.default is MISSING)
    if missing:
        raise HardwareSpecError(f"{path}: missing field(s) {', '.join(missing)} "
                                "(or give `base: h100`)")
    return HardwareSpec(**raw)


def _read_mapping(path: Path) -> dict:
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            raw = _yaml(path).safe_load(text)
        else:
            raw = json.loads(text)
    except HardwareSpecError:
        raise
    except Exception as exc:
        raise HardwareSpecError(f"{path}: cannot parse ({exc})") from None
    if not isinstance(raw, dict):
        raise HardwareSpecError(f"{path}: expected a mapping of field names to values")
    return dict(raw)


def _yaml(path: Path):
    try:
        import yaml
    except ImportError:
        raise HardwareSpecError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); "
                                "or write the spec as JSON") from None
    return yaml
