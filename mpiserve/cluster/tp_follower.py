"""The loop of a tensor-parallel engine's non-lead ranks: carry out the lead's step plans on
this rank's shard (forward passes and the KV they stream out, KV receives and writes) until
the lead says stop. Waits without spinning; the wait ends with the lead's next plan, its
stop, or (when the lead dies) the job ending."""

from __future__ import annotations

from .backoff import Backoff
from .kv_transfer import WorkWaiter, joined, post_receives, send_layer
from .step_plans import ReceivePlan, StepPlan, StepPlans, WritePlan


class Follower:
    def __init__(self, engine, plans: StepPlans, transfer_timeout_s: float = 60.0):
        self.engine = engine
        self.plans = plans
        self.timeout_s = transfer_timeout_s
        self.shard = engine.model.tp.shard
        self.sends: list[tuple[list, WorkWaiter]] = []     # buffers kept until sent
        self.receiving: dict[int, tuple[list, WorkWaiter, bool]] = {}  # key -> buffers, ...
        self.steps = 0

    def run(self) -> int:
        """Returns the number of forward passes run."""
        backoff = Backoff(first=0.0001)          # the next step usually follows within ms
        while True:
            arrived, plan = self.plans.poll()
            if arrived and plan is None:
                break
            if arrived:
                self._carry_out(plan)
            progressed = self._answer_landed()
            self.sends = [(b, w) for b, w in self.sends if not w.finished]
            if arrived or progressed:
                backoff.reset()
            else:
                backoff.sleep()
        for _, waiter in self.sends:             # bounded: each waiter has a deadline
            waiter.join()
        self.plans.flush()
        return self.steps

    def _carry_out(self, plan) -> None:
        if isinstance(plan, StepPlan):
            self._forward(plan)
        elif isinstance(plan, ReceivePlan):
            buffers, works = post_receives(plan.source, plan.announce, self.engine.device,
                                           self.shard)
            self.receiving[plan.key] = (buffers, WorkWaiter(works, self.timeout_s), False)
        elif isinstance(plan, WritePlan):
            self._write(plan)

    def _forward(self, plan: StepPlan) -> None:
        engine = self.engine
        streams = tuple(s.to(engine.device) for s in plan.streams)
        posted = []

        def after_layer(layer: int) -> None:
            posted.extend(send_layer(engine.kv, layer, streams, self.shard,
                                     engine.model_config.num_kv_heads))
        engine.model.forward(plan.batch.to(engine.device), engine.kv.layers,
                             after_layer if streams else None)
        if posted:
            self.sends.append(([p[2] for p in posted],
                               WorkWaiter([p[3] for p in posted], self.timeout_s)))
        self.steps += 1

    def _answer_landed(self) -> bool:
        answered = False
        for key, (buffers, waiter, told) in list(self.receiving.items()):
            if waiter.finished and not told:
                self.plans.answer(key, waiter.error)
                self.receiving[key] = (buffers, waiter, True)
                answered = True
        return answered

    def _write(self, plan: WritePlan) -> None:
        """The lead answered every rank's Landed first, so these receives are finished."""
        buffers, _, _ = self.receiving.pop(plan.key)
        kv = self.engine.kv
        for piece_buffers, write in zip(buffers, plan.writes):
            if write is None:
                continue
            offset, slots = write
            slots = slots.to(self.engine.device)
            for layer, routes in enumerate(piece_buffers):
                kv.write(layer, slots, joined(routes)[:, offset:])
