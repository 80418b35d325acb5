"""Find the router a user named: a built-in name, or `path/to/file.py:function`."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

from ..errors import MpiserveError
from ..routers import BUILTIN_ROUTERS


class RouterLoadError(MpiserveError):
    pass


def load_router(spec: str):
    if spec in BUILTIN_ROUTERS:
        return BUILTIN_ROUTERS[spec]
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise RouterLoadError(f"--router {spec!r}: not a built-in router "
                              f"({', '.join(BUILTIN_ROUTERS)}) nor path/to/file.py:function")
    if not Path(path).is_file():
        raise RouterLoadError(f"--router {spec!r}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"mpiserve_user_router_{Path(path).stem}",
                                                         path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise RouterLoadError(f"--router {spec!r}: importing {path} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
    route = getattr(module, name, None)
    if route is None:
        raise RouterLoadError(f"--router {spec!r}: {path} defines no {name!r}")
    if not inspect.isasyncgenfunction(route):
        raise RouterLoadError(f"--router {spec!r}: {name} must be an async generator "
                              "function: async def route(request, cluster): ... yield tokens")
    return route
