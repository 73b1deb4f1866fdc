"""Run the real daemon as a separate process for end-to-end tests.

Readiness and shutdown are observed, not waited for: the daemon's sd_notify datagrams arrive on
a real unix socket, and its JSON log lines on a pipe. Every wait has a deadline and blocks on
I/O; nothing sleeps.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

DEADLINE = 60.0


class DaemonProcess:
    def __init__(self, config: Path, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.notify_path = tmp / f"notify-{os.getpid()}-{id(self)}.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(DEADLINE)
        self.datagrams: list[str] = []
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.log: list[dict[str, Any]] = []
        full_env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corespond.daemon.cli", "run", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        self.stderr = b""

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            try:
                self.lines.put(json.loads(raw))
            except ValueError:
                self.lines.put({"event": "<not json>", "raw": raw.decode(errors="replace")})
        self.lines.put(None)

    def next_datagram(self) -> str:
        data = self.notify.recv(4096).decode()
        self.datagrams.append(data)
        return data

    def wait_datagram(self, text: str) -> None:
        while True:
            if text in self.next_datagram().split("\n"):
                return

    def wait_log(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        while True:
            line = self.lines.get(timeout=DEADLINE)
            if line is None:
                raise AssertionError(f"daemon output ended; stderr: {self._stderr()}")
            self.log.append(line)
            if predicate(line):
                return line

    def wait_event(self, event: str, **fields: Any) -> dict[str, Any]:
        return self.wait_log(
            lambda e: e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        )

    def send_signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.finish()

    def finish(self) -> int:
        code = self.proc.wait(timeout=DEADLINE)
        self._reader.join(timeout=DEADLINE)
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.log.append(line)
        self.stderr = self._stderr()
        self.notify.setblocking(False)
        while True:
            try:
                self.datagrams.append(self.notify.recv(4096).decode())
            except BlockingIOError:
                break
        self.notify.close()
        return code

    def _stderr(self) -> bytes:
        assert self.proc.stderr is not None
        if self.proc.poll() is None:
            return b"<still running>"
        return self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=DEADLINE)
        self.notify.close()
