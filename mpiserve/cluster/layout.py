"""Which rank does what (pure logic): rank 0 routes; then come the prefill engines, then the
decode engines, each a group of consecutive ranks (its tensor-parallel size, 1 by default)
whose first rank, the lead, is the engine the router talks to."""

from __future__ import annotations

from dataclasses import dataclass

ROUTER_RANK = 0


@dataclass(frozen=True)
class EngineGroup:
    lead: int
    size: int
    role: str

    @property
    def ranks(self) -> range:
        return range(self.lead, self.lead + self.size)


@dataclass(frozen=True)
class JobLayout:
    world_size: int
    num_prefill: int
    num_decode: int
    prefill_tp: int = 1
    decode_tp: int = 1

    @classmethod
    def infer(cls, world_size: int, prefill: int | None, decode: int | None,
              prefill_tp: int = 1, decode_tp: int = 1) -> JobLayout:
        """Fill in whichever of --prefill/--decode is missing from the world size (both
        missing: as many prefill as decode engines, one more decode engine if odd)."""
        ranks = world_size - 1
        if prefill_tp < 1 or decode_tp < 1:          # refused by problem(), named there
            return cls(world_size, prefill or 0, decode or 0, prefill_tp, decode_tp)
        if prefill is None and decode is None:
            if prefill_tp == decode_tp:
                engines = ranks // prefill_tp
                prefill = engines // 2
                decode = engines - prefill
            else:
                prefill = decode = ranks // (prefill_tp + decode_tp)
        if prefill is None:
            prefill = (ranks - decode * decode_tp) // prefill_tp
        if decode is None:
            decode = (ranks - prefill * prefill_tp) // decode_tp
        return cls(world_size, prefill, decode, prefill_tp, decode_tp)

    @property
    def needed_ranks(self) -> int:
        return 1 + self.num_prefill * self.prefill_tp + self.num_decode * self.decode_tp

    def problem(self) -> str | None:
        """Why this layout cannot run, or None."""
        if self.prefill_tp < 1 or self.decode_tp < 1:
            return (f"tensor-parallel sizes must be >= 1 (prefill {self.prefill_tp}, decode "
                    f"{self.decode_tp})")
        if self.num_prefill < 0 or self.num_decode < 0:
            return f"--prefill {self.num_prefill} and --decode {self.num_decode} must be >= 0"
        if self.num_prefill + self.num_decode < 1:
            return (f"the job has {self.world_size} rank(s): it needs rank 0 for the router "
                    "and at least one engine rank (mpiexec -n 1+P+D)")
        if self.needed_ranks != self.world_size:
            return (f"world size {self.world_size} does not match 1 router + {self.arithmetic()}"
                    f" = {self.needed_ranks} ranks; start with mpiexec -n {self.needed_ranks} "
                    "or change --prefill/--decode" + ("/--tp" if self.is_parallel else ""))
        return None

    def arithmetic(self) -> str:
        if not self.is_parallel:
            return f"{self.num_prefill} prefill + {self.num_decode} decode"
        return (f"{self.num_prefill} prefill x TP {self.prefill_tp} + {self.num_decode} decode "
                f"x TP {self.decode_tp}")

    @property
    def is_parallel(self) -> bool:
        return self.prefill_tp > 1 or self.decode_tp > 1

    @property
    def groups(self) -> list[EngineGroup]:
        groups, lead = [], 1
        for count, size, role in ((self.num_prefill, self.prefill_tp, "prefill"),
                                  (self.num_decode, self.decode_tp, "decode")):
            for _ in range(count):
                groups.append(EngineGroup(lead, size, role))
                lead += size
        return groups

    @property
    def engine_ranks(self) -> list[int]:
        """The engines' lead ranks: the ranks the router calls."""
        return [group.lead for group in self.groups]

    def group_of(self, rank: int) -> EngineGroup | None:
        """The engine `rank` belongs to (None for the router)."""
        return next((g for g in self.groups if rank in g.ranks), None)

    def role(self, rank: int) -> str:
        group = self.group_of(rank)
        return "router" if group is None else group.role
