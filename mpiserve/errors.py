"""Exceptions mpiserve raises; each message names the thing at fault."""


class MpiserveError(Exception):
    """Base class of every error mpiserve raises on purpose."""


class CheckpointError(MpiserveError):
    """A model directory, config field or weight file cannot be used."""


class InvalidRequestError(MpiserveError, ValueError):
    """A prompt or sampling parameter is out of range."""


class CapacityError(MpiserveError):
    """A request can never fit in the engine's KV page pool."""


class RouterMisuseError(MpiserveError):
    """A router broke a rule of the router contract (what it yields, how it calls engines)."""
