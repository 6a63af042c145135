"""`dit-serve up`'s worker: started as a child process, restarted when it dies, stopped on request.

A worker that dies before it ever registered in Redis has a problem a restart will not fix (a bad
--model, a taken --metrics-port): `up` says why and stops. One that dies after serving (a crash,
an OOM kill) is restarted with exponential backoff, up to MAX_QUICK_FAILURES short-lived runs in a row.
"""

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from redis import Redis
from redis.exceptions import RedisError

from dit_serve.catalog import live_workers, retire_worker

log = logging.getLogger(__name__)

WORKER_COMMAND = [sys.executable, "-m", "cli", "worker"]
LIVE_POLL_S = 0.2  # how often a starting worker's registration is looked for
RESTART_BACKOFF_S = 1.0  # first restart delay, doubled after each quick failure ...
MAX_RESTART_BACKOFF_S = 30.0  # ... up to this
STABLE_RUN_S = 60.0  # a worker that ran this long before dying starts the failure count afresh
MAX_QUICK_FAILURES = 5  # this many short-lived workers in a row: give up
STDERR_JOIN_S = 2.0  # wait for the last words of a dead worker (a grandchild may hold its stderr)
REDIS_SOCKET_TIMEOUT_S = 5.0


def describe_exit(returncode: int) -> str:
    """A child's exit status in words: 'exit code 1' or 'killed by SIGKILL'."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class WorkerRun:
    """One start of the worker process; its stderr is copied to ours, and its last line kept."""

    def __init__(self, name: str, env: dict[str, str], command: Sequence[str]):
        self.name = name
        self.started = time.monotonic()
        # Its own process group: a Ctrl-C in the terminal reaches `up` alone, which stops the
        # worker after the API and before Redis, rather than everything at once.
        self.process = subprocess.Popen(
            list(command), env={**env, "DIT_WORKER_NAME": name}, stderr=subprocess.PIPE, process_group=0
        )
        self.last_line = ""
        self._copier = threading.Thread(target=self._copy_stderr, name=f"stderr-{name}", daemon=True)
        self._copier.start()

    def _copy_stderr(self) -> None:
        assert self.process.stderr is not None
        for raw in iter(self.process.stderr.readline, b""):
            line = raw.decode(errors="replace")
            if line.strip():
                self.last_line = line.strip()
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):  # our stderr is gone; keep draining the worker's
                pass

    def reason(self) -> str:
        """Why it stopped: its exit status and the last line it wrote (a SystemExit's advice, say)."""
        self._copier.join(STDERR_JOIN_S)
        status = describe_exit(self.process.returncode)
        # A signal leaves no last words: the last line is then whatever it was doing, not a reason.
        if self.process.returncode < 0 or not self.last_line:
            return status
        return f"{status}, its last line: {self.last_line}"


class WorkerSupervisor:
    """Keeps one worker running for `up`, from a thread; `failure` says why it gave up, if it did."""

    def __init__(
        self,
        env: dict[str, str],
        redis_url: str,
        name_base: str,
        on_failure: Callable[[], None],
        command: Sequence[str] | None = None,
    ):
        """Args:
        env: the worker's environment (the settings as DIT_* variables).
        redis_url: where the worker registers; its registration tells that it is serving.
        name_base: each start is named `{name_base}.{n}`: RQ refuses, for up to 90 s, the name
            of a worker that died without registering its death.
        on_failure: called from the supervising thread when it gives up (`up` stops its API).
        command: how to start a worker; WORKER_COMMAND (`dit-serve worker`) when None.
        """
        self.env = env
        self.command = command
        self.redis = Redis.from_url(redis_url, socket_timeout=REDIS_SOCKET_TIMEOUT_S)
        self.name_base = name_base
        self.on_failure = on_failure
        self.failure: str | None = None
        self.pids: list[int] = []  # every worker process started, for the record
        self._run: WorkerRun | None = None
        self._starts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a start and a stop never interleave
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """SIGTERM the worker, let it finish its batch for at most timeout_s, then kill it."""
        with self._lock:
            self._stopping.set()
            run = self._run
        if run and run.process.poll() is None:
            log.info("stopping the worker (pid %d) after its current batch", run.process.pid)
            run.process.terminate()
            try:
                run.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("the worker did not stop within %.0f s; killing it", timeout_s)
                run.process.kill()
                run.process.wait()
                self._retire(run.name)
            log.info("the worker stopped: %s", describe_exit(run.process.returncode))
        self._thread.join()

    def _supervise(self) -> None:
        quick_failures = 0
        while True:
            run = self._start_run()
            if run is None:
                return
            was_live = self._wait_until_live(run)
            run.process.wait()
            if self._stopping.is_set():
                return
            # It may have registered since the last look: a killed worker's registration outlives it.
            was_live = was_live or self._registered(run.name)
            self._retire(run.name)  # /readyz must not count a dead worker for heartbeat_ttl_s
            reason = run.reason()
            if not was_live and self._starts == 1:
                self._give_up(
                    f"the worker exited before it was ready ({reason}); fix what it says and run "
                    "`dit-serve up` again"
                )
                return
            ran_s = time.monotonic() - run.started
            quick_failures = 1 if ran_s >= STABLE_RUN_S else quick_failures + 1
            if quick_failures >= MAX_QUICK_FAILURES:
                self._give_up(
                    f"the worker died {quick_failures} times in a row within {STABLE_RUN_S:.0f} s of its "
                    f"start (last: {reason}); fix what it says and run `dit-serve up` again"
                )
                return
            delay_s = min(RESTART_BACKOFF_S * 2 ** (quick_failures - 1), MAX_RESTART_BACKOFF_S)
            log.warning(
                "the worker (pid %d) died after %.0f s: %s. Restarting it in %.0f s "
                "(%d of at most %d quick restarts in a row)",
                run.process.pid, ran_s, reason, delay_s, quick_failures, MAX_QUICK_FAILURES - 1,
            )  # fmt: skip
            if self._stopping.wait(delay_s):
                return

    def _start_run(self) -> WorkerRun | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            self._starts += 1
            command = WORKER_COMMAND if self.command is None else self.command
            self._run = WorkerRun(f"{self.name_base}.{self._starts}", self.env, command)
            self.pids.append(self._run.process.pid)
            if self._starts > 1:
                log.warning("restarted the worker: pid %d", self._run.process.pid)
            return self._run

    def _wait_until_live(self, run: WorkerRun) -> bool:
        """Until the worker registers (True), or exits or is stopped first (False)."""
        while run.process.poll() is None and not self._stopping.is_set():
            if self._registered(run.name):
                log.info("the worker (pid %d) is serving as %s", run.process.pid, run.name)
                return True
            self._stopping.wait(LIVE_POLL_S)
        return False

    def _registered(self, name: str) -> bool:
        try:
            return name in live_workers(self.redis)
        except RedisError:  # an outage of an external Redis: the worker reports it itself
            return False

    def _retire(self, name: str) -> None:
        try:
            retire_worker(self.redis, name)
        except RedisError as exc:
            log.warning("could not retire worker %s: %s", name, exc)

    def _give_up(self, failure: str) -> None:
        self.failure = failure
        log.error("%s. Stopping the API and Redis", failure)
        self.on_failure()
