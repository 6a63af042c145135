"""`dit-serve soak`: a chaos soak on loopback that checks no accepted job is lost.

It starts a Redis with an append-only file, an API and two workers, all on 127.0.0.1, and sends them a
Poisson load below capacity for `--minutes`. Meanwhile it kill -9's a random worker every
~`--kill-every` seconds and starts a fresh one, restarts Redis once (a third of the way in) and the
API once (two thirds of the way in), and sends cancels, duplicate idempotent POSTs, and jobs with a
webhook to a local receiver (on 127.0.0.1) that fails the first attempt of every delivery. Clients
retry a POST that got no answer, or a 503, with the same Idempotency-Key, as a careful client would.

When the load ends it waits for every accepted job to end, then reports:
- accepted, completed, failed by code, canceled;
- lost: accepted, but 404 or never final;
- duplicate outputs: outputs a worker wrote for a job that another execution had taken over (the
  workers log each one);
- webhooks: jobs sent with one, final events delivered (signature checked), missing, and delivered
  more than once (at-least-once delivery allows it; the receiver counts it);
- answers by status (5xx other than 503 while Redis was down count as errors);
- Redis memory and the workers' resident memory, sampled every minute.
"""

import argparse
import hmac
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from redis import Redis
from redis.exceptions import RedisError

from dit_serve.embedded_redis import EmbeddedRedis, free_port
from dit_serve.jobs import ENDED_STATUSES
from dit_serve.webhook_signing import new_secret, signature

log = logging.getLogger("dit-serve.soak")

START_TIMEOUT_S = 120.0
WAIT_S = 30  # one GET /v1/jobs/{id}?wait= while draining
POST_ATTEMPTS = 20  # a client retries a POST this often (same Idempotency-Key) before giving up
POST_RETRY_S = 1.0
SAMPLE_EVERY_S = 60.0
STEADY_WINDOW = 3  # samples averaged at each end of the steady-state comparison
TAKEN_BACK = "was taken back from this worker before it finished"  # worker/ledger.py's log line
CANCEL_SHARE, DUPLICATE_SHARE, WEBHOOK_SHARE = 0.1, 0.1, 0.1  # of the jobs sent: canceled soon after,
# posted twice at once, or sent with a webhook
WEBHOOK_BACKOFF_S = "0.5"  # the first retry of a failed delivery, so that deliveries end with the drain
WEBHOOK_MAX_ATTEMPTS = "5"  # retries over 42 s; the receiver fails only the first attempt
WATCH_EVERY_S = 2.0  # the watcher looks at every accepted job not yet seen ended this often
FINAL_EVENTS = frozenset({"job.completed", "job.failed", "job.canceled"})
MODEL_NAME = "soak"
WEBHOOK_WAIT_S = 60.0  # after the drain, for the last deliveries (retried 0.5-1 s after a failure)


@dataclass
class Sample:
    minute: float
    redis_used_memory: int | None
    workers_rss: int  # bytes, all live workers together
    largest_worker_rss: int  # bytes, the largest one (workers restarted by the kills start smaller)


@dataclass
class Report:
    minutes: float
    sent: int = 0
    accepted: int = 0
    completed: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # by error code
    canceled: int = 0
    lost: int = 0
    lost_ids: list[str] = field(default_factory=list)
    duplicate_outputs: int = 0
    webhook_jobs: int = 0  # accepted jobs sent with a webhook
    webhooks_delivered: int = 0  # ... whose final event the receiver accepted, correctly signed
    webhooks_missing: int = 0  # ... whose final event never arrived
    webhooks_duplicated: int = 0  # final events accepted more than once
    webhooks_bad_signature: int = 0
    duplicate_posts_consistent: int = 0  # duplicate POST pairs answered with one job
    duplicate_posts_split: int = 0  # ... answered with two different jobs (a failure)
    refused: int = 0  # POSTs that never got a 202 after every retry
    answers: dict[str, int] = field(default_factory=dict)  # HTTP status (or "connection") -> count
    server_errors: int = 0  # 5xx other than 503 (503 is expected while Redis is down)
    worker_kills: int = 0
    redis_restarts: int = 0
    api_restarts: int = 0
    samples: list[Sample] = field(default_factory=list)
    # Steady state: the change from the samples around a third of the run (minute 10 of 30) to the last
    # ones taken under load, in percent of their means (None: too short a run), and their middle minutes.
    steady_minutes: tuple[float, float] | None = None
    redis_memory_change_pct: float | None = None
    workers_rss_change_pct: float | None = None


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers 500 to the first attempt of every delivery, checks
    each signature, and records the final events it accepted, by job."""

    def __init__(self, secret: str):
        self.secret = secret
        self.lock = threading.Lock()
        self.attempted: set[str] = set()  # webhook-ids seen
        self.finals: Counter[str] = Counter()  # job id -> final events accepted
        self.bad_signatures = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(receiver.receive(dict(self.headers.items()), body))
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def receive(self, headers: dict[str, str], body: bytes) -> int:
        headers = {name.lower(): value for name, value in headers.items()}
        message_id = headers.get("webhook-id", "")
        expected = signature(self.secret, message_id, int(headers.get("webhook-timestamp", "0")), body)
        signed = headers.get("webhook-signature", "").split()
        with self.lock:
            if not any(hmac.compare_digest(expected, sent) for sent in signed):
                self.bad_signatures += 1
                return 400
            if message_id not in self.attempted:
                self.attempted.add(message_id)
                return 500  # every delivery must be retried once
            event = json.loads(body)
            if event.get("type") in FINAL_EVENTS:
                self.finals[event["data"]["id"]] += 1
            return 204

    def stop(self) -> None:
        self.server.shutdown()


class Cluster:
    """Redis (AOF), one API and the workers, as child processes on loopback."""

    def __init__(
        self, workdir: Path, model_dir: Path | None, workers: int, webhook_secret: str, retention_s: int
    ):
        self.workdir = workdir
        self.redis = EmbeddedRedis(workdir / "redis", persistent=True)
        self.port = free_port()
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.worker_count = workers
        self.started_workers = 0
        self.env = {
            **os.environ,
            "REDIS_URL": self.redis.url,
            "DIT_PORT": str(self.port),
            "DIT_HOST": "127.0.0.1",
            "DIT_AUTH": "off",
            "DIT_OUTPUT_DIR": str(workdir / "outputs"),
            "DIT_METRICS_PORT": "0",
            "DIT_LOG_LEVEL": "info",
            # A killed worker's jobs are back in the queue within about 12 s, not 35 s.
            "DIT_HEARTBEAT_INTERVAL_S": "2",
            "DIT_HEARTBEAT_TTL_S": "10",
            "DIT_REAP_INTERVAL_S": "2",
            "DIT_WEBHOOK_SECRET": webhook_secret,
            "DIT_WEBHOOK_ALLOW": "127.0.0.1",  # the receiver; nothing else is ever sent to
            "DIT_WEBHOOK_BACKOFF_S": WEBHOOK_BACKOFF_S,
            "DIT_WEBHOOK_MAX_ATTEMPTS": WEBHOOK_MAX_ATTEMPTS,
            # Every window that keeps state per job is shorter than the run, so that Redis reaches a
            # steady state its memory can be compared in (with the defaults it grows for 7 days).
            "DIT_JOB_TTL_S": str(retention_s),
            "DIT_EXPIRED_GRACE_S": str(retention_s),
            "DIT_IDEMPOTENCY_TTL_S": str(retention_s),
        }
        if model_dir is not None:
            self.env["DIT_MODELS"] = json.dumps([f"{MODEL_NAME}={model_dir}"])
            self.env["DIT_DEFAULT_MODEL"] = MODEL_NAME

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, command: str, log_name: str, **extra: str) -> subprocess.Popen[bytes]:
        out = open(self.workdir / log_name, "ab")  # noqa: SIM115 - the child owns it
        return subprocess.Popen(
            [sys.executable, "-m", "cli", command], env={**self.env, **extra}, stdout=out, stderr=out
        )

    def start(self) -> None:
        self.redis.start()
        self.start_api()
        for _ in range(self.worker_count):
            self.start_worker()
        self._wait(lambda: self._get("/readyz") == 200, "the service to be ready")

    def start_api(self) -> None:
        self.api = self._spawn("api", "api.log")
        self._wait(lambda: self._get("/healthz") == 200, "the API to answer")

    def restart_api(self) -> None:
        assert self.api is not None
        self.api.send_signal(signal.SIGTERM)
        self.api.wait(timeout=30)
        self.start_api()

    def start_worker(self) -> None:
        name = f"soak-worker-{self.started_workers}"
        self.started_workers += 1
        self.workers[name] = self._spawn("worker", f"{name}.log", DIT_WORKER_NAME=name)

    def kill_worker(self, rng: random.Random) -> str:
        name = rng.choice(sorted(self.workers))
        process = self.workers.pop(name)
        process.kill()  # SIGKILL: no chance to settle or release anything
        process.wait()
        self.start_worker()
        return name

    def restart_redis(self) -> None:
        self.redis.stop()  # SIGTERM: Redis writes its append-only file out before it exits
        self.redis.start()

    def workers_rss(self) -> list[int]:
        """Each live worker's resident memory, in bytes."""
        sizes = []
        for process in self.workers.values():
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
            except OSError:
                continue
            kib = next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), "0")
            sizes.append(int(kib) * 1024)
        return sizes

    def sample(self, minute: float) -> Sample:
        sizes = self.workers_rss()
        return Sample(minute, self.redis_memory(), sum(sizes), max(sizes, default=0))

    def redis_memory(self) -> int | None:
        try:
            return int(Redis.from_url(self.redis.url).info("memory")["used_memory"])  # type: ignore[index]
        except RedisError:
            return None

    def duplicate_outputs(self) -> int:
        return sum(
            path.read_text(errors="replace").count(TAKEN_BACK) for path in self.workdir.glob("soak-*.log")
        )

    def _get(self, path: str) -> int:
        try:
            return httpx.get(f"{self.url}{path}", timeout=2).status_code
        except httpx.HTTPError:
            return 0

    def _wait(self, predicate, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}; logs are in {self.workdir}")

    def stop(self) -> None:
        for process in [*self.workers.values(), self.api]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.workers.values(), self.api]:
            if process is not None:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        self.redis.stop()


class Load:
    """Poisson submissions with retries, duplicates and cancels; what each answer was."""

    def __init__(self, cluster: Cluster, report: Report, rng: random.Random, steps: int, webhook_url: str):
        self.cluster, self.report, self.rng, self.steps = cluster, report, rng, steps
        self.webhook_url = webhook_url
        self.accepted: set[str] = set()
        self.ended: dict[str, dict] = {}  # job id -> its first view in an ended state
        self.with_webhook: set[str] = set()
        self.answers: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.client = httpx.Client(base_url=cluster.url, timeout=30)

    def _count(self, answer: str) -> None:
        with self.lock:
            self.answers[answer] += 1

    def post(self, k: int, webhook: bool = False) -> str | None:
        """Post job k until it is accepted (same Idempotency-Key each time); its id, or None."""
        body: dict[str, object] = {"class_labels": [k % 4], "seed": k, "num_inference_steps": self.steps}
        if webhook:
            body["webhook_url"] = self.webhook_url
        headers = {"Idempotency-Key": f"soak-{k}"}
        for _ in range(POST_ATTEMPTS):
            try:
                response = self.client.post("/v1/images", json=body, headers=headers)
            except httpx.HTTPError:
                self._count("connection")
                time.sleep(POST_RETRY_S)
                continue
            self._count(str(response.status_code))
            if response.status_code == 202:
                job_id: str = response.json()["id"]
                with self.lock:
                    self.accepted.add(job_id)
                    if webhook:
                        self.with_webhook.add(job_id)
                return job_id
            if response.status_code not in (429, 503):
                return None  # a refusal no retry will change
            time.sleep(POST_RETRY_S)
        return None

    def send(self, k: int) -> None:
        roll = self.rng.random()
        if roll < DUPLICATE_SHARE:
            with ThreadPoolExecutor(2) as pool:
                first, second = pool.map(self.post, [k, k])
            with self.lock:
                if first and second and first != second:
                    self.report.duplicate_posts_split += 1
                elif first and second:
                    self.report.duplicate_posts_consistent += 1
            job_id = first or second
        else:
            job_id = self.post(k, webhook=roll > 1 - CANCEL_SHARE - WEBHOOK_SHARE)
        if job_id is None:
            with self.lock:
                self.report.refused += 1
        elif roll > 1 - CANCEL_SHARE:
            time.sleep(self.rng.uniform(0, 2))
            try:
                self._count(f"DELETE {self.client.delete(f'/v1/jobs/{job_id}').status_code}")
            except httpx.HTTPError:
                self._count("connection")

    def run(self, rate: float, seconds: float) -> int:
        sent, start, arrival = 0, time.monotonic(), 0.0
        with ThreadPoolExecutor(64) as pool:
            while True:
                arrival += self.rng.expovariate(rate)
                if arrival > seconds:
                    break
                time.sleep(max(0.0, start + arrival - time.monotonic()))
                pool.submit(self.send, sent)
                sent += 1
        return sent

    def watch(self, stop: threading.Event) -> None:
        """Record each accepted job's first ended view, well before retention deletes it."""
        while not stop.wait(WATCH_EVERY_S):
            with self.lock:
                open_ids = sorted(self.accepted - self.ended.keys())
            for job_id in open_ids:
                try:
                    response = self.client.get(f"/v1/jobs/{job_id}", timeout=5)
                except httpx.HTTPError:
                    continue
                job = response.json() if response.status_code == 200 else {}
                if job.get("status") in ENDED_STATUSES:
                    with self.lock:
                        self.ended[job_id] = job

    def drain(self, timeout_s: float) -> dict[str, dict]:
        """Wait for every accepted job to end; the first ended view of each (an empty dict: 404 or 410,
        gone before anyone saw it end)."""
        deadline = time.monotonic() + timeout_s
        final: dict[str, dict] = dict(self.ended)
        for job_id in sorted(self.accepted - final.keys()):
            while True:
                try:
                    response = self.client.get(
                        f"/v1/jobs/{job_id}", params={"wait": WAIT_S}, timeout=WAIT_S + 10
                    )
                except httpx.HTTPError:
                    response = None
                if response is not None and response.status_code in (404, 410):
                    final[job_id] = {}
                    break
                job = response.json() if response is not None and response.status_code == 200 else {}
                if job.get("status") in ENDED_STATUSES or time.monotonic() > deadline:
                    final[job_id] = job
                    break
        return final


def await_webhooks(receiver: Receiver, job_ids: set[str], timeout_s: float) -> None:
    """Wait until the receiver has accepted a final event for each of `job_ids`, or timeout_s passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(not receiver.finals[job_id] for job_id in job_ids):
        time.sleep(0.5)


def chaos(
    cluster: Cluster,
    report: Report,
    rng: random.Random,
    seconds: float,
    kill_every_s: float,
    stop: threading.Event,
) -> None:
    """Kill -9 a worker every ~kill_every_s; restart Redis at 1/3 of the run and the API at 2/3."""
    start = time.monotonic()
    events = [(seconds / 3, "redis"), (2 * seconds / 3, "api")]
    next_kill = start + kill_every_s * rng.uniform(0.7, 1.3)
    while not stop.wait(0.2):
        now = time.monotonic()
        if now - start > seconds:
            return
        if events and now - start >= events[0][0]:
            _, what = events.pop(0)
            log.info("restarting %s", what)
            if what == "redis":
                cluster.restart_redis()
                report.redis_restarts += 1
            else:
                cluster.restart_api()
                report.api_restarts += 1
        if now >= next_kill:
            log.info("kill -9 %s", cluster.kill_worker(rng))
            report.worker_kills += 1
            next_kill = now + kill_every_s * rng.uniform(0.7, 1.3)


def sample_forever(cluster: Cluster, report: Report, stop: threading.Event) -> None:
    start = time.monotonic()
    while True:
        report.samples.append(cluster.sample(round((time.monotonic() - start) / 60, 2)))
        if stop.wait(SAMPLE_EVERY_S):
            return


def run_soak(args: argparse.Namespace) -> Report:
    rng = random.Random(args.seed)
    report = Report(minutes=args.minutes)
    seconds = args.minutes * 60
    secret = new_secret()
    receiver = Receiver(secret)
    with tempfile.TemporaryDirectory(prefix="dit-soak-") as tmp:
        cluster = Cluster(Path(tmp), args.model_dir, args.workers, secret, args.retention)
        cluster.start()
        stop = threading.Event()
        load = Load(cluster, report, rng, args.steps, receiver.url)
        try:
            threads = [
                threading.Thread(
                    target=chaos,
                    args=(cluster, report, random.Random(args.seed + 1), seconds, args.kill_every, stop),
                    daemon=True,
                ),
                threading.Thread(target=sample_forever, args=(cluster, report, stop), daemon=True),
                threading.Thread(target=load.watch, args=(stop,), daemon=True),
            ]
            for thread in threads:
                thread.start()
            report.sent = load.run(args.rate, seconds)
            stop.set()
            steady_state(report)
            threads[0].join()
            final = load.drain(args.drain)
            await_webhooks(receiver, load.with_webhook & set(final), WEBHOOK_WAIT_S)
            report.samples.append(cluster.sample(round(args.minutes, 2)))
            report.duplicate_outputs = cluster.duplicate_outputs()
        finally:
            stop.set()
            cluster.stop()
            receiver.stop()
    webhook_jobs = load.with_webhook & set(final)
    report.webhook_jobs = len(webhook_jobs)
    report.webhooks_delivered = sum(1 for job_id in webhook_jobs if receiver.finals[job_id])
    report.webhooks_missing = report.webhook_jobs - report.webhooks_delivered
    report.webhooks_duplicated = sum(max(0, count - 1) for count in receiver.finals.values())
    report.webhooks_bad_signature = receiver.bad_signatures
    report.accepted = len(final)
    statuses = Counter(
        job.get("status", "lost") if job.get("status") in ENDED_STATUSES else "lost" for job in final.values()
    )
    report.completed, report.canceled, report.lost = (
        statuses["completed"],
        statuses["canceled"],
        statuses["lost"],
    )
    report.lost_ids = sorted(
        job_id for job_id, job in final.items() if job.get("status") not in ENDED_STATUSES
    )
    report.failed = dict(
        Counter(job["error"]["code"] for job in final.values() if job.get("status") == "failed")
    )
    report.answers = dict(sorted(load.answers.items()))
    report.server_errors = sum(
        count for answer, count in load.answers.items() if answer[:1] == "5" and answer != "503"
    )
    return report


def _change_pct(before: float, after: float) -> float | None:
    return None if not before else round(100 * (after - before) / before, 1)


def _window_means(samples: list[Sample]) -> tuple[float, float]:
    """Mean Redis memory and mean largest worker RSS of `samples`."""
    redis = [sample.redis_used_memory for sample in samples if sample.redis_used_memory is not None]
    return sum(redis) / max(1, len(redis)), sum(s.largest_worker_rss for s in samples) / len(samples)


def steady_state(report: Report) -> None:
    """Compare the samples around a third of the run (minute 10 of 30) with the last ones under load,
    STEADY_WINDOW samples (one a minute) each, by their means: one sample alone moves with the queue
    depth at that second, and with which worker a kill has just restarted."""
    under_load = list(report.samples)
    if len(under_load) < 2 * STEADY_WINDOW:
        return
    middle = min(range(len(under_load)), key=lambda k: abs(under_load[k].minute - report.minutes / 3))
    first = under_load[max(0, middle - STEADY_WINDOW // 2) :][:STEADY_WINDOW]
    last = under_load[-STEADY_WINDOW:]
    if last[0].minute <= first[-1].minute:
        return
    report.steady_minutes = (first[len(first) // 2].minute, last[len(last) // 2].minute)
    (redis_before, rss_before), (redis_after, rss_after) = _window_means(first), _window_means(last)
    report.redis_memory_change_pct = _change_pct(redis_before, redis_after)
    report.workers_rss_change_pct = _change_pct(rss_before, rss_after)


def format_report(report: Report) -> str:
    rows = [
        ("minutes", report.minutes),
        ("jobs sent", report.sent),
        ("accepted", report.accepted),
        ("completed", report.completed),
        ("failed", ", ".join(f"{code}: {n}" for code, n in report.failed.items()) or 0),
        ("canceled", report.canceled),
        ("lost (404 or never final)", report.lost),
        ("duplicate outputs", report.duplicate_outputs),
        ("jobs with a webhook", report.webhook_jobs),
        (
            "final webhooks delivered / missing / delivered twice / badly signed",
            f"{report.webhooks_delivered} / {report.webhooks_missing} / {report.webhooks_duplicated} / "
            f"{report.webhooks_bad_signature}",
        ),
        ("duplicate POSTs answered with one job", report.duplicate_posts_consistent),
        ("duplicate POSTs answered with two jobs", report.duplicate_posts_split),
        ("never accepted after retries", report.refused),
        ("answers", ", ".join(f"{k}: {v}" for k, v in report.answers.items())),
        ("5xx other than 503", report.server_errors),
        (
            "worker kill -9s / Redis restarts / API restarts",
            f"{report.worker_kills} / {report.redis_restarts} / {report.api_restarts}",
        ),
    ]
    if report.steady_minutes is not None:
        rows.append(
            (
                f"change from minute {report.steady_minutes[0]} to {report.steady_minutes[1]} (means of "
                f"{STEADY_WINDOW} samples): Redis memory, largest worker RSS",
                f"{report.redis_memory_change_pct}%, {report.workers_rss_change_pct}%",
            )
        )
    for sample in (report.samples[0], report.samples[-1]) if report.samples else ():
        rows.append(
            (
                f"Redis memory, largest worker RSS at minute {sample.minute}",
                f"{sample.redis_used_memory} B, {sample.largest_worker_rss} B",
            )
        )
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def add_soak_parser(commands: argparse._SubParsersAction) -> None:
    soak = commands.add_parser(
        "soak", help="a chaos soak on loopback: kills, restarts, and a count of lost jobs"
    )
    soak.add_argument("--minutes", type=float, default=10.0, help="how long the load runs")
    soak.add_argument(
        "--rate", type=float, default=1.0, help="jobs per second (Poisson); keep below capacity"
    )
    soak.add_argument(
        "--kill-every", type=float, default=30.0, help="seconds between worker kill -9s (±30%%)"
    )
    soak.add_argument("--workers", type=int, default=2)
    soak.add_argument("--steps", type=int, default=10, help="denoising steps per job")
    soak.add_argument(
        "--model-dir", type=Path, default=None, help="an image model (default: the bundled one)"
    )
    soak.add_argument("--drain", type=float, default=300.0, help="seconds to wait for accepted jobs to end")
    soak.add_argument(
        "--retention",
        type=int,
        default=180,
        help="DIT_JOB_TTL_S, DIT_EXPIRED_GRACE_S and DIT_IDEMPOTENCY_TTL_S of the soaked service (s)",
    )
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--json", type=Path, default=None, help="also write the report here")


def run_soak_command(args: argparse.Namespace) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    report = run_soak(args)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    failures = (
        report.lost,
        report.duplicate_outputs,
        report.duplicate_posts_split,
        report.server_errors,
        report.webhooks_missing,
        report.webhooks_bad_signature,
    )
    if any(failures):
        raise SystemExit(1)
