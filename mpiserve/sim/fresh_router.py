"""Routers for the simulator, as `router.loader.load_router` finds them, except that a built-in
router comes from a fresh copy of its module: module-level state (round_robin's turn counter)
then starts anew in every simulation, so a run with the same seed repeats exactly."""

from __future__ import annotations

import importlib.util
import sys

from ..router.loader import load_router
from ..routers import BUILTIN_ROUTERS


def fresh_router(spec: str):
    route = load_router(spec)
    if spec not in BUILTIN_ROUTERS:
        return route                      # a user's file is imported anew on every load
    module = sys.modules[route.__module__]
    found = importlib.util.spec_from_file_location(module.__name__, module.__file__)
    copy = importlib.util.module_from_spec(found)       # not put in sys.modules
    found.loader.exec_module(copy)
    return getattr(copy, route.__name__)
