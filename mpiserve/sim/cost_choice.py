"""The cost model and engine settings a `mpiserve simulate` run asks for: a profile measured by
`mpiserve profile`, or a roofline from a model config and a hardware spec."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import MpiserveError
from ..model.model_config import ModelConfig
from .hardware import load_hardware
from .profiled_cost import ProfiledCost
from .roofline_cost import RooflineCost
from .sim_engine import SimEngineConfig


@dataclass(frozen=True)
class SimSetup:
    cost: object                        # RooflineCost or ProfiledCost
    config: SimEngineConfig
    label: str                          # the model, as result rows name it

    def tokenizer_and_limits(self, tokenizer_dir: str | None) -> tuple:
        if tokenizer_dir is None:
            return None, None
        from ..model.tokenizer import Tokenizer
        from ..router.request_prompt import ModelLimits
        limits = ModelLimits(self.label, self.config.vocab_size, self.config.max_model_len)
        return Tokenizer.from_dir(tokenizer_dir), limits


def read_model_config(path: str | Path) -> ModelConfig:
    """A config.json (the file, or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        return ModelConfig.from_dir(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MpiserveError(f"--model-config {path}: cannot read ({exc})") from None
    return ModelConfig.from_dict(raw, source=str(path))


def sim_setup(args) -> SimSetup:
    """From the parsed `mpiserve simulate` arguments."""
    if bool(args.profile) == bool(args.hardware):
        raise MpiserveError("give either --profile FILE or --hardware NAME with --model-config")
    if args.prefill < 0 or args.decode < 0 or args.prefill + args.decode < 1 or args.tp < 1:
        raise MpiserveError("need --prefill, --decode >= 0 with at least one engine, --tp >= 1")
    if args.profile:
        cost = ProfiledCost.load(args.profile)
        pages = args.num_pages or cost.num_pages(args.page_size, args.tp)
        return SimSetup(cost, _config(args, pages, cost.vocab_size, cost.max_model_len),
                        cost.source or Path(args.profile).stem)
    if not args.model_config:
        raise MpiserveError("--hardware needs --model-config (the model's config.json)")
    model = read_model_config(args.model_config)
    cost = RooflineCost(model, load_hardware(args.hardware), args.dtype)
    pages = args.num_pages or cost.num_pages(args.page_size, args.tp)
    label = (f"{Path(args.model_config).parent.name or 'model'} {args.dtype} on {args.tp} x "
             f"{cost.hardware.name} per engine")
    return SimSetup(cost, _config(args, pages, model.vocab_size, model.context_limit), label)


def _config(args, pages: int, vocab_size: int, max_model_len: int) -> SimEngineConfig:
    return SimEngineConfig(page_size=args.page_size, num_pages=pages,
                           max_num_seqs=args.max_num_seqs,
                           max_batch_tokens=args.max_batch_tokens,
                           max_model_len=max_model_len, vocab_size=vocab_size,
                           control_latency_s=args.control_latency,
                           engines_per_host=args.engines_per_host)
