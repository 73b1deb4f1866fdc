"""The referral builder processes (daemon/referral_build.py): a Ctrl-C on the terminal reaches
the whole process group, and the builders must let the daemon stop them instead of dying of
it (a KeyboardInterrupt traceback per builder, and a broken pool for the next build)."""

from __future__ import annotations

import os
import signal
from datetime import UTC, datetime
from pathlib import Path

from twisted.internet.defer import Deferred

from corespond.daemon.referral_build import BuildPool
from corespond.daemon.referrals import new_control_id, new_referral_ref, referral_content
from tests.daemon.referral_rig import Loop, build_in_pid, config, provider, request


def built(loop: Loop, pool: BuildPool) -> bytes:
    """One message built by ``pool`` (the rig's builder marks it with the builder's pid)."""
    cfg = config()
    content = referral_content(cfg, provider(), request(), new_referral_ref(),
                               new_control_id(), datetime.now(UTC))  # fmt: skip
    d: Deferred[bytes] = pool.build(content, "ref-i12")
    loop.spin(lambda: d.called, turns=6000)
    result = d.result
    assert isinstance(result, bytes), result
    return result


def builder_pid(message: bytes) -> int:
    [segment] = [s for s in message.split(b"\r") if s.startswith(b"ZPD|")]
    return int(segment.split(b"|")[1])


def test_a_builder_survives_sigint_and_builds_again() -> None:
    loop = Loop()
    pool = BuildPool(loop.reactor, 1, build_in_pid)
    pool.start()
    try:
        pid = builder_pid(built(loop, pool))
        # The disposition itself: SIGINT ignored (bit 2 of SigIgn), not caught by Python.
        status = dict(
            line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        assert int(status["SigIgn"], 16) & (1 << (signal.SIGINT - 1))
        # A real SIGINT, as Ctrl-C sends it: the same process builds the next message.
        os.kill(pid, signal.SIGINT)
        assert builder_pid(built(loop, pool)) == pid
        assert pool.crashes == 0
    finally:
        pool.stop()
