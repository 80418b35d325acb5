"""Doorbells (cluster.doorbell) between two real UDP sockets on loopback: a ring ends a wait
long before its timeout, a ring that came earlier ends the next wait at once, a wait nobody
rings ends at its timeout, and ringing a rank with no doorbell or no listener does nothing."""

from __future__ import annotations

import socket
import time

import pytest

from mpiserve.cluster.doorbell import SILENT, Doorbell

LONG_S = 30.0          # a wait's timeout that a ring must cut short


def _bound() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture
def pair():
    a, b = _bound(), _bound()
    peers = [a.getsockname(), b.getsockname(), None]        # rank 2 has no doorbell
    bells = Doorbell(a, peers), Doorbell(b, peers)
    yield bells
    for bell in bells:
        bell.close()


def test_a_ring_ends_the_wait_before_its_timeout(pair):
    rank0, rank1 = pair
    rank0.ring(1)
    started = time.monotonic()
    rank1.wait(LONG_S)
    assert time.monotonic() - started < LONG_S / 2


def test_rings_are_drained_so_the_next_wait_runs_to_its_timeout(pair):
    rank0, rank1 = pair
    for _ in range(5):
        rank0.ring(1)
    rank1.wait(LONG_S)
    started = time.monotonic()
    rank1.wait(0.05)
    assert time.monotonic() - started >= 0.04


def test_ringing_nobody_does_nothing(pair):
    rank0, rank1 = pair
    rank0.ring(2)                                   # no doorbell there
    rank1.close()
    rank0.ring(1)                                   # nobody listens any more
    started = time.monotonic()
    Doorbell(None, [None]).wait(0.05)               # a rank without one just sleeps
    assert time.monotonic() - started >= 0.04


def test_the_silent_doorbell_never_rings_and_its_wait_is_a_sleep():
    SILENT.ring(0)
    started = time.monotonic()
    assert SILENT.wait(0.05) is False
    assert time.monotonic() - started >= 0.04
