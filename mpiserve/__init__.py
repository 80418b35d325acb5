"""mpiserve: serve large language models as one MPI job.

`LLM` and `RequestOutput` load lazily, so that importing the package (as the router rank and
the pure bookkeeping modules do) does not pull in torch.
"""

import sys
from pathlib import Path

from .engine.sampling_params import SamplingParams
from .errors import CapacityError, CheckpointError, InvalidRequestError, MpiserveError

__all__ = ["LLM", "RequestOutput", "SamplingParams", "MpiserveError", "CheckpointError",
           "InvalidRequestError", "CapacityError"]
__version__ = "0.1.0"

# setup.cfg installs kernels/ as mpiserve.kernels. A checkout that was copied but not
# installed (a GPU machine given the working tree) has kernels/ beside this package instead:
# there the checkout's root joins the package path, so the same name resolves.
_CHECKOUT_ROOT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "kernels").is_dir() \
        and (_CHECKOUT_ROOT / "kernels" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT_ROOT))


def _off_sys_path(root: Path) -> None:
    """Take a checkout's root off `sys.path` (`python -m` run from it puts it first): there its
    kernels/ folder would shadow PyPI's `kernels` package, which transformers 5 imports.
    mpiserve's own modules resolve through the package's `__path__`, which keeps them."""
    if (root / "kernels" / "__init__.py").is_file():
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]


_off_sys_path(_CHECKOUT_ROOT)


def __getattr__(name: str):
    if name in ("LLM", "RequestOutput"):
        from . import llm
        return getattr(llm, name)
    raise AttributeError(f"module 'mpiserve' has no attribute {name!r}")
