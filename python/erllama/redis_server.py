"""A throwaway ``redis-server`` for the remote tier's tests and benchmark.

:class:`RedisServer` starts Debian's ``redis-server`` (or
``$ERLLAMA_REDIS_SERVER``, e.g. ``valkey-server``) on a free loopback port,
without persistence, in a directory of the caller's, and stops it. It is
not a client: :meth:`RedisServer.command` sends one small command in RESP
for checks and fault injection.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["RedisServer"]


class RedisServer:
    """A redis-server child on 127.0.0.1; :meth:`stop` kills it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port: int = s.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Starts the server (again, after :meth:`stop`) and waits for PONG."""
        binary = os.environ.get("ERLLAMA_REDIS_SERVER", "redis-server")
        args = ["--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.directory)]
        try:
            self.proc = subprocess.Popen(
                [binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{binary} not found: install redis-server (./dev does) or set ERLLAMA_REDIS_SERVER"
            ) from e
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.command(b"PING").startswith(b"+PONG"):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{binary} did not start on port {self.port}")

    def command(self, *args: bytes) -> bytes:
        """Sends one command; returns the raw reply (small replies only)."""
        req = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as c:
            c.sendall(req)
            return c.recv(1 << 16)

    def stop(self) -> None:
        """Kills the server (no persistence: its data is gone)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
