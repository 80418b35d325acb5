"""`mpiserve profile`: measure this machine's engine for the simulator.

    mpiserve profile --model DIR --out profile.json
    mpiserve profile --from-run RUN_DIR... --base profile.json [--fit scale|split|terms] --out F

Builds the real engine in-process (as `mpiserve.LLM` does), times short steps of known shape
— prefill-only steps of several lengths, decode steps of several batch sizes and context
lengths — and fits the simulator's step model by least squares:

    step_s = intercept + a * prefill_tokens + b * decode_seqs + c * context_tokens
             + d * attention_pairs

(a coefficient the fit makes negative is dropped and the rest refitted). The KV transfer fit
times packing KV pages of several sizes into a contiguous buffer and unpacking it into other
pages, the device-side copies of a transfer; the link between engines is not in it (on one
host with gloo it adds a comparable copy, see results/kv_path.md).

On a CPU it then times the same steps again beside a second engine that steps without pause
in another process (neighbour_load), and fits how much longer the prefill terms and the rest
take there (the profile's co_run factors): what `mpiserve simulate --engines-per-host` charges
engines that share a host. Takes a few minutes on the built-in demo model on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

from ..engine.step_shape import StepShape
from .profiled_cost import (PREFILL_TERMS, STEP_TERMS, CoRunFit, ProfiledCost, ProfileError,
                            StepFit, TransferFit)
from .run_steps import run_step_samples

# Prompts prefilled in one step, as mpiserve run's default budget (1024 tokens) cuts them; the
# longest is also prefilled in chunks of half its length, so the later chunk reads earlier KV.
PREFILL_LENGTHS = (16, 128, 512, 1024)
# Decode steps: (sequences, context each). Batches of 1 and 16 at a short and a long context
# fit the context term; the batches between, at a short context, follow a step time that is
# not linear in the sequences (with float32 panels, which compute rows in tiles of 6, a
# 7-sequence step took 1.6x a 6-sequence one on an AVX2 CPU), so a fit on 1 and 16 alone was
# 10-27% high for the batches of 2-6 sequences that chat's jobs ran most.
DECODE_SHAPES = ((1, 64), (1, 1024), (16, 64), (16, 1024),
                 *((batch, 64) for batch in (2, 4, 6, 7, 8, 12)))
DECODE_STEPS = 4
COPY_TOKENS = (16, 128, 512, 2048)
CO_RUN_SEED = 20250306    # other prompts than the first pass's
OUTLIER_FACTOR = 2.0      # a timed step this many times its fitted time is left out of the fit


def say(message: str) -> None:
    print(f"mpiserve profile: {message}", file=sys.stderr, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory (default: the built-in demo "
                        "model)")
    parser.add_argument("--from-run", nargs="+", metavar="RUN_DIR",
                        help="fit the step model to the steps real jobs timed (their run "
                             "directories' steps.json) instead of timing steps alone; the rest "
                             "of the profile (KV copy, pages, model) comes from --base")
    parser.add_argument("--base", help="with --from-run: a profile from `mpiserve profile "
                        "--model` of the same model and machine")
    parser.add_argument("--fit", choices=["scale", "split", "terms"], default="scale",
                        help="with --from-run: scale the base step model by one factor, the "
                             "jobs' total step time over what it predicts for their steps; "
                             "split: one factor for its prefill terms (per prefill token, per "
                             "attention pair) and one for the rest, fitted by least squares "
                             "(inside jobs, large prefills slow down more than decode steps); "
                             "or refit every term to the jobs' steps (only as good as the range "
                             "of step shapes the jobs ran: it extrapolates badly) "
                             "(default scale)")
    parser.add_argument("--out", required=True, help="the JSON profile to write")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads, as each engine rank of a job uses (default 1)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="times each step shape is measured (default 2)")
    parser.add_argument("--no-co-run", action="store_true",
                        help="skip timing steps beside a second engine on the same host "
                             "(the profile's co-run factors stay 1.0)")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5,
                        help="KV page pool the profile records for simulated engines "
                             "(default 0.5, as mpiserve run's)")


def run_profile(args) -> int:
    if args.from_run:
        return _profile_from_runs(args)
    try:
        return _profile_engine(args)
    except ProfileError as exc:
        say(f"error: {exc}")
        return 2


def _profile_engine(args) -> int:
    from ..engine.engine import Engine
    from ..engine.engine_config import EngineConfig
    started = time.perf_counter()
    config = EngineConfig(model=args.model, device=args.device, torch_threads=args.torch_threads,
                          kv_cache_gib=args.kv_cache_gib, max_batch_tokens=max(PREFILL_LENGTHS))
    engine = Engine(config)
    if engine.max_model_len <= max(PREFILL_LENGTHS) + DECODE_STEPS + 2:
        say(f"error: the model's context of {engine.max_model_len} tokens is too short to "
            f"profile (it needs more than {max(PREFILL_LENGTHS) + DECODE_STEPS + 2})")
        return 2
    say(f"engine ready on {engine.device} ({time.perf_counter() - started:.1f} s); timing steps")
    samples = step_samples(engine, max(1, args.repeats))
    step = fit_step(samples)
    co_samples = [] if args.no_co_run or engine.device.type != "cpu" else \
        _co_run_samples(engine, config, max(1, args.repeats))
    co_run = CoRunFit(*in_job_split_factors(step, co_samples)) if co_samples else CoRunFit()
    transfer = fit_transfer(copy_samples(engine, max(1, args.repeats)))
    kv = engine.kv
    profile = ProfiledCost(step, transfer, kv_bytes_per_token=kv.layer_bytes(1) * kv.num_layers,
                           tp=1, page_size=engine.pool.page_size, pages=engine.pool.num_pages,
                           vocab_size=engine.model_config.vocab_size,
                           max_model_len=engine.max_model_len,
                           source=f"{Path(engine.model_dir).name} on {engine.device}",
                           co_run=co_run)
    data = {**profile.to_json(), "samples": samples, "co_run_samples": co_samples,
            "measured_s": round(time.perf_counter() - started, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    say(f"wrote {args.out}: step = {_step_text(step)}; KV copy "
        f"{transfer.latency_s * 1e6:.0f} us + {transfer.per_byte_s * 1e12:.1f} ps/byte; "
        f"beside a stepping neighbour, prefill terms x {co_run.prefill:.3f}, the rest x "
        f"{co_run.rest:.3f} ({data['measured_s']} s)")
    return 0


def _co_run_samples(engine, config, repeats: int) -> list[dict]:
    """`step_samples` again while a second engine of `config` steps in another process."""
    from .neighbour_load import neighbour_engine
    say("timing the steps again beside a second engine stepping on this host")
    with neighbour_engine(config):
        return step_samples(engine, repeats, seed=CO_RUN_SEED)


def _profile_from_runs(args) -> int:
    if not args.base:
        say("error: --from-run needs --base, a profile of the same model and machine")
        return 2
    try:
        base = ProfiledCost.load(args.base)
        samples = run_step_samples(args.from_run, base.tp)
        return _write_from_runs(args, base, samples)
    except ProfileError as exc:
        say(f"error: {exc}")
        return 2


def _write_from_runs(args, base: ProfiledCost, samples: list[dict]) -> int:
    if args.fit == "scale":
        factor = in_job_factor(base.step, samples)
        step = scaled(base.step, factor)
        how = f"the base step model x {factor:.3f}"
    elif args.fit == "split":
        prefill, rest = in_job_split_factors(base.step, samples)
        step = scaled(base.step, rest, prefill)
        how = f"the base step model's prefill terms x {prefill:.3f}, the rest x {rest:.3f}"
    else:
        step = fit_step(samples)
        how = "every term refitted"
    runs = ", ".join(Path(run).name for run in args.from_run)
    source = f"{base.source}; {how}, from {len(samples)} steps of jobs ({runs})"
    # the jobs' steps already took what their neighbours cost them, on average
    profile = dataclasses.replace(base, step=step, source=source, co_run=CoRunFit())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**profile.to_json(), "samples": samples},
                                         indent=1) + "\n")
    say(f"wrote {args.out}: step = {_step_text(step)} ({how}, {len(samples)} steps)")
    return 0


def in_job_factor(step: StepFit, samples: list[dict]) -> float:
    """How much longer the jobs' steps took than `step` predicts for their shapes, in total."""
    predicted = sum(step(_shape_of(s)) for s in samples)
    if predicted <= 0:
        raise ProfileError("the base profile predicts no time for the jobs' steps")
    return sum(s["seconds"] for s in samples) / predicted


def in_job_split_factors(step: StepFit, samples: list[dict]) -> tuple[float, float]:
    """Factors for the prefill terms and for the rest of `step` that fit the jobs' step times
    best (least squares); one factor for both (`in_job_factor`) when either comes out not
    positive, as when the jobs ran too few prefill steps to tell."""
    rows = []
    for s in samples:
        shape = _shape_of(s)
        prefill = step.prefill_part(shape)
        rows.append([prefill, step(shape) - prefill])
    prefill, rest = _least_squares(rows, [s["seconds"] for s in samples])
    if prefill > 0 and rest > 0:
        return prefill, rest
    factor = in_job_factor(step, samples)
    return factor, factor


def _shape_of(sample: dict) -> StepShape:
    """The shape of a job's timed step (a `samples_of` row)."""
    return StepShape(**{k: sample[k] for k in StepShape._fields})


def scaled(step: StepFit, factor: float, prefill_factor: float | None = None) -> StepFit:
    """`step` with every term times `factor` (the prefill terms times `prefill_factor`, if
    given)."""
    prefill_factor = factor if prefill_factor is None else prefill_factor
    return StepFit(**{term: getattr(step, term) * (prefill_factor if term in PREFILL_TERMS
                                                    else factor) for term in STEP_TERMS})


def _step_text(step: StepFit) -> str:
    return (f"{step.intercept_s * 1e3:.2f} ms + "
            f"{step.per_prefill_token_s * 1e6:.1f} us/prefill token + "
            f"{step.per_decode_seq_s * 1e6:.1f} us/decode seq + "
            f"{step.per_context_token_s * 1e9:.1f} ns/context token + "
            f"{step.per_attention_pair_s * 1e12:.1f} ps/attention pair")


# ---- measuring ---------------------------------------------------------------------------------
def _timed_steps(engine, count: int | None = None) -> list[dict]:
    """Step the engine (`count` times, or until idle); the shape and seconds of each step."""
    scheduler, original = engine.scheduler, engine.scheduler.schedule
    shapes = []

    def schedule():
        chunks = original()
        shapes.append(StepShape.of(chunks))
        return chunks
    scheduler.schedule = schedule
    samples = []
    try:
        while engine.has_work and (count is None or len(samples) < count):
            begun = time.perf_counter()
            engine.step()
            seconds = time.perf_counter() - begun
            samples.append({**shapes[-1]._asdict(), "seconds": seconds})
    finally:
        del scheduler.schedule
    return samples


def _prompt(rng: random.Random, engine, length: int) -> list[int]:
    return [rng.randrange(5, engine.model_config.vocab_size) for _ in range(length)]


def step_samples(engine, repeats: int, seed: int = 20250305) -> list[dict]:
    """Timed steps of every shape the fit needs, on prompts drawn with `seed` (prompts seen
    before would hit the prefix cache and change the steps' shapes)."""
    from ..engine.sampling_params import SamplingParams
    rng = random.Random(seed)
    samples, names = [], iter(range(1 << 30))
    for _ in range(repeats):
        one_token = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        for length in PREFILL_LENGTHS:       # one prefill step, then its sequence finishes
            engine.add_request(f"p{next(names)}", _prompt(rng, engine, length), one_token)
            samples += _timed_steps(engine, 1)
            _timed_steps(engine)
        samples += _chunked_prefill(engine, _prompt(rng, engine, max(PREFILL_LENGTHS)),
                                    f"c{next(names)}", one_token)
        for batch, context in DECODE_SHAPES:
            params = SamplingParams(max_tokens=DECODE_STEPS + 2, temperature=0, ignore_eos=True)
            context = _fitting_context(engine, batch, context)
            for _ in range(batch):
                engine.add_request(f"d{next(names)}", _prompt(rng, engine, context), params)
            while any(s.in_prefill or not s.output for s in engine.scheduler.running) \
                    or engine.scheduler.waiting:
                _timed_steps(engine, 1)          # prefills: not decode samples
            samples += _timed_steps(engine, DECODE_STEPS)
            _timed_steps(engine)
    return samples


def _chunked_prefill(engine, prompt: list[int], name: str, params) -> list[dict]:
    """Prefill `prompt` in two steps of half its length each: the second reads the KV the
    first wrote, as a long prompt's later chunks do."""
    scheduler = engine.scheduler
    budget, scheduler.max_batch_tokens = scheduler.max_batch_tokens, len(prompt) // 2
    try:
        engine.add_request(name, prompt, params)
        samples = _timed_steps(engine, 2)
    finally:
        scheduler.max_batch_tokens = budget
    _timed_steps(engine)
    return samples


def _fitting_context(engine, batch: int, context: int) -> int:
    """`context`, or less where `batch` sequences of it would not fit the context length or
    the page pool with the decode steps' tokens."""
    room = DECODE_STEPS + 2 + engine.pool.page_size
    per_sequence = engine.pool.num_pages * engine.pool.page_size // batch
    return max(1, min(context, engine.max_model_len - room, per_sequence - room))


def copy_samples(engine, repeats: int) -> list[tuple[int, float]]:
    """(bytes, seconds) of packing a range of KV and unpacking it into other pages."""
    kv, pages = engine.kv, engine.pool.num_pages
    results = []
    for tokens in COPY_TOKENS:
        tokens = min(tokens, pages * kv.page_size // 2)
        need = -(-tokens // kv.page_size)
        source, target = list(range(need)), list(range(need, 2 * need))
        for _ in range(repeats + 1):
            begun = time.perf_counter()
            src, dst = kv.slots(source, 0, tokens), kv.slots(target, 0, tokens)
            for layer in range(kv.num_layers):
                kv.write(layer, dst, kv.read(layer, src))
            results.append((kv.layer_bytes(tokens) * kv.num_layers,
                            time.perf_counter() - begun))
        del results[-repeats - 1]                     # the first of each size warms up
    return results


# ---- fitting -----------------------------------------------------------------------------------
def fit_step(samples: list[dict]) -> StepFit:
    """`_fit_terms` of the samples, refitted once without those that took more than
    OUTLIER_FACTOR times what the first fit predicts for them: a pause not of the step's making
    (the process descheduled, a page fault storm) would otherwise pull every term, the
    intercept most (one 93 ms step among 6.5 ms ones raised it from 5.4 to 10.5 ms)."""
    fit = _fit_terms(samples)
    kept = [s for s in samples if s["seconds"] <= OUTLIER_FACTOR * fit(_shape_of(s))]
    return fit if len(kept) == len(samples) or not kept else _fit_terms(kept)


def _fit_terms(samples: list[dict]) -> StepFit:
    """Least squares of seconds on (1, prefill_tokens, decode_seqs, context_tokens,
    attention_pairs); terms whose coefficient comes out negative are dropped and the rest
    refitted."""
    columns = {"intercept_s": lambda s: 1.0,
               "per_prefill_token_s": lambda s: s["prefill_tokens"],
               "per_decode_seq_s": lambda s: s["decode_seqs"],
               "per_context_token_s": lambda s: s["context_tokens"],
               "per_attention_pair_s": lambda s: s["attention_pairs"]}
    kept = list(STEP_TERMS)
    while True:
        coefficients = _least_squares([[columns[k](s) for k in kept] for s in samples],
                                      [s["seconds"] for s in samples])
        negative = [k for k, c in zip(kept, coefficients) if c < 0]
        if not negative:
            break
        kept.remove(negative[0])
    values = dict.fromkeys(STEP_TERMS, 0.0) | dict(zip(kept, coefficients))
    return StepFit(**values)


def fit_transfer(samples: list[tuple[int, float]]) -> TransferFit:
    latency, per_byte = _least_squares([[1.0, b] for b, _ in samples], [s for _, s in samples])
    if latency < 0:
        return TransferFit(0.0, _least_squares([[b] for b, _ in samples],
                                               [s for _, s in samples])[0])
    return TransferFit(latency, max(0.0, per_byte))


def _least_squares(rows: list[list[float]], targets: list[float]) -> list[float]:
    import numpy as np
    solution, *_ = np.linalg.lstsq(np.array(rows, dtype=float), np.array(targets, dtype=float),
                                   rcond=None)
    return [float(x) for x in solution]
