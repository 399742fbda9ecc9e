"""Waiting on actors and finding a port: small helpers every role shares."""

from __future__ import annotations

import socket

import ray


def get_with_timeout(refs, timeout_s: float, what: str):
    """`ray.get` that fails with a message naming what was awaited instead of hanging."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"{what} did not finish within {timeout_s:g}s; an actor may be waiting for resources "
                           f"(`ray status` lists pending demands) or stuck (see its log in the Ray dashboard or "
                           f"/tmp/ray/session_latest/logs)") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
