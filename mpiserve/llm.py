"""The offline Python API: `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

import sys
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from .engine.engine import Engine
from .engine.engine_config import EngineConfig
from .engine.sampling_params import SamplingParams
from .engine.sequence import Sequence, all_samples_finished
from .engine.stopping import visible_text
from .engine.token_logprobs import TokenLogprob
from .errors import MpiserveError


@dataclass
class SampleOutput:
    """One of a request's n samples. `logprobs` (when asked): one per token of `token_ids`."""
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    """A prompt's answer: `samples` (n of them, in order), whose first one the `token_ids`,
    `text`, `finish_reason` and `logprobs` properties read. `prompt_logprobs` (when asked)
    scores prompt tokens 1.. (token 0 has nothing before it)."""
    index: int
    prompt_token_ids: list[int]
    samples: list[SampleOutput] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    error: str | None = None           # set instead of an output when the request was refused

    @property
    def token_ids(self) -> list[int]:
        return self.samples[0].token_ids if self.samples else []

    @property
    def text(self) -> str:
        return self.samples[0].text if self.samples else ""

    @property
    def finish_reason(self) -> str | None:
        return self.samples[0].finish_reason if self.samples else None

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self.samples[0].logprobs if self.samples else None


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
                running[index] = (seq, out)
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
        """running: prompt index -> (its sample 0, its output); an output is filled once every
        sample of its request has finished."""
        show = sys.stdout.isatty() if progress is None else progress
        with _progress_bar(show, len(running)) as advance:
            while self.engine.has_work:
                for event in self.engine.step():
                    entry = running.get(event.seq.seq_id) if event.finished else None
                    if entry is not None and all_samples_finished(entry[0]):
                        del running[event.seq.seq_id]
                        self._fill(entry[1], entry[0])
                        advance()

    def _fill(self, out: RequestOutput, seq: Sequence) -> None:
        out.samples = [self._sample_output(s) for s in [seq, *seq.forks]]
        if seq.params.prompt_logprobs is not None:
            out.prompt_logprobs = list(seq.prompt_logprobs)

    def _sample_output(self, seq: Sequence) -> SampleOutput:
        text = visible_text(self.tokenizer.decode(seq.output), seq.params.stop)
        logprobs = list(seq.logprobs) if seq.params.logprobs is not None else None
        return SampleOutput(seq.sample_index, list(seq.output), text, seq.finish_reason, logprobs)


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
