"""Shared fixtures of the Ray runtime tests: a real deployment on a local multi-node Ray."""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("ray.serve", reason="the Ray runtime tests need ray[serve]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()
