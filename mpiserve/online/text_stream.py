"""The text a streaming client receives for one sample, piece by piece (pure logic).

A piece is sent only once it can no longer change: a trailing U+FFFD (a character whose
bytes have not all arrived) and a trailing start of a stop string are held back until the
next tokens settle them, so the pieces always add up to the text of the whole answer.
"""

from __future__ import annotations

from collections.abc import Callable

from ..engine.stopping import visible_text


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...]):
        self.decode, self.stops = decode, stops
        self.sent = ""

    def advance(self, tokens: list[int], finished: bool) -> str:
        """The new piece of text, given every token of the sample so far."""
        text = visible_text(self.decode(tokens), self.stops)
        if not finished:
            text = text[:len(text) - self._unsettled(text)]
        if not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def _unsettled(self, text: str) -> int:
        """How many trailing characters the next tokens may still change."""
        if text.endswith("\ufffd"):
            return len(text) - len(text.rstrip("\ufffd"))
        return max((k for stop in self.stops for k in range(1, len(stop))
                    if text.endswith(stop[:k])), default=0)
