"""Which rank does what: rank 0 routes, ranks 1..P prefill, the rest decode (pure logic)."""

from __future__ import annotations

from dataclasses import dataclass

ROUTER_RANK = 0


@dataclass(frozen=True)
class JobLayout:
    world_size: int
    num_prefill: int
    num_decode: int

    @classmethod
    def infer(cls, world_size: int, prefill: int | None, decode: int | None) -> JobLayout:
        """Fill in whichever of --prefill/--decode is missing from the world size."""
        engines = world_size - 1
        if prefill is None and decode is None:
            prefill = engines // 2
        if prefill is None:
            prefill = engines - decode
        if decode is None:
            decode = engines - prefill
        return cls(world_size, prefill, decode)

    def problem(self) -> str | None:
        """Why this layout cannot run, or None."""
        if self.num_prefill < 0 or self.num_decode < 0:
            return f"--prefill {self.num_prefill} and --decode {self.num_decode} must be >= 0"
        if self.num_prefill + self.num_decode < 1:
            return (f"the job has {self.world_size} rank(s): it needs rank 0 for the router "
                    "and at least one engine rank (mpiexec -n 1+P+D)")
        if 1 + self.num_prefill + self.num_decode != self.world_size:
            return (f"world size {self.world_size} does not match 1 router + "
                    f"{self.num_prefill} prefill + {self.num_decode} decode = "
                    f"{1 + self.num_prefill + self.num_decode} ranks; start with "
                    f"mpiexec -n {1 + self.num_prefill + self.num_decode} or change "
                    "--prefill/--decode")
        return None

    @property
    def engine_ranks(self) -> list[int]:
        return list(range(1, self.world_size))

    def role(self, rank: int) -> str:
        if rank == ROUTER_RANK:
            return "router"
        return "prefill" if rank <= self.num_prefill else "decode"
