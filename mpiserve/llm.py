"""The offline Python API: `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

import sys
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from .engine.engine import Engine
from .engine.engine_config import EngineConfig
from .engine.sampling_params import SamplingParams
from .engine.sequence import Sequence
from .engine.stopping import visible_text
from .errors import MpiserveError


@dataclass
class RequestOutput:
    index: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None           # set instead of an output when the request was refused


class LLM:
    """`tensor_parallel_size=N` splits the model over the N ranks of an `mpiexec -n N` job:
    every rank makes the same calls and gets the same outputs; rank 0 schedules."""

    def __init__(self, model: str | None = None, tensor_parallel_size: int = 1,
                 **engine_options):
        config = EngineConfig(model=model, **engine_options)
        self.plans = None
        if tensor_parallel_size == 1:
            self.engine = Engine(config)
        else:
            from .cluster.tensor_group import join_world_group
            tp, self.plans = join_world_group(tensor_parallel_size)
            self.engine = Engine(config, tp, self.plans if self.plans.is_lead else None)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Seq[str] | Seq[list[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 progress: bool | None = None) -> list[RequestOutput]:
        """One output per prompt, in order. A prompt the engine refuses gets `.error`."""
        if self.plans is None:
            return self._generate(prompts, params, progress)
        if not self.plans.is_lead:
            from .cluster.tp_follower import Follower
            Follower(self.engine, self.plans).run()
            outputs = self.plans.comm.bcast(None, root=0)
            if outputs is None:
                raise MpiserveError("generate failed on the lead rank (rank 0); see its error")
            return outputs
        outputs = None
        try:
            outputs = self._generate(prompts, params, progress)
        finally:
            self.plans.publish(None)
            self.plans.comm.bcast(outputs, root=0)
        return outputs

    def _generate(self, prompts, params, progress) -> list[RequestOutput]:
        params_list = self._params_per_prompt(prompts, params)
        outputs, running = [], {}
        for index, (prompt, p) in enumerate(zip(prompts, params_list)):
            out, seq = self._submit(index, prompt, p)
            outputs.append(out)
            if seq is not None:
                running[id(seq)] = (seq, out)
        self._run(running, progress)
        return outputs

    def _params_per_prompt(self, prompts, params) -> list[SamplingParams]:
        if params is None or isinstance(params, SamplingParams):
            return [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        return list(params)

    def _submit(self, index, prompt, params) -> tuple[RequestOutput, Sequence | None]:
        try:
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            out = RequestOutput(index, ids)
            return out, self.engine.add_request(index, ids, params)
        except (MpiserveError, TypeError, ValueError) as exc:
            return RequestOutput(index, [], error=f"prompt {index}: {exc}"), None

    def _run(self, running: dict, progress: bool | None) -> None:
        show = sys.stdout.isatty() if progress is None else progress
        with _progress_bar(show, len(running)) as advance:
            while self.engine.has_work:
                for event in self.engine.step():
                    if event.finished:
                        seq, out = running.pop(id(event.seq))
                        self._fill(out, seq)
                        advance()

    def _fill(self, out: RequestOutput, seq: Sequence) -> None:
        out.token_ids = list(seq.output)
        out.finish_reason = seq.finish_reason
        out.text = visible_text(self.tokenizer.decode(seq.output), seq.params.stop)


class _progress_bar:
    """A rich progress bar over finished requests, or nothing when not shown."""

    def __init__(self, show: bool, total: int):
        self.show, self.total = show and total > 1, total

    def __enter__(self):
        if not self.show:
            return lambda: None
        from rich.progress import Progress
        self.progress = Progress(transient=True)
        self.progress.start()
        task = self.progress.add_task("generating", total=self.total)
        return lambda: self.progress.advance(task)

    def __exit__(self, *exc):
        if self.show:
            self.progress.stop()
