"""mpiserve: serve large language models as one MPI job.

`LLM` and `RequestOutput` load lazily, so that importing the package (as the router rank and
the pure bookkeeping modules do) does not pull in torch.
"""

from .engine.sampling_params import SamplingParams
from .errors import CapacityError, CheckpointError, InvalidRequestError, MpiserveError

__all__ = ["LLM", "RequestOutput", "SamplingParams", "MpiserveError", "CheckpointError",
           "InvalidRequestError", "CapacityError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("LLM", "RequestOutput"):
        from . import llm
        return getattr(llm, name)
    raise AttributeError(f"module 'mpiserve' has no attribute {name!r}")
