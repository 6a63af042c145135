"""Images and videos on one worker, Poisson arrivals: `dit-serve bench mixed`.

One service (`dit-serve api` + one `dit-serve worker` + an embedded Redis) serves both bundled models,
`dit-shapes-image` and `dit-shapes-video`. After a warm-up job of each, the image capacity is measured
with a short closed-loop run (`--requests` jobs from `--max-batch` clients), unless `--image-rate`
gives the rate outright. Then two phases of `--seconds` each, open loop (arrivals come whatever the
service does):
- A: images alone, Poisson at `--image-load` x the capacity (or `--image-rate`);
- B: the very same image arrivals (same seed, same rate, same times), plus videos, Poisson at
  `--video-rate`.

Latency is per request, from the client's POST to its output downloaded. Per phase: the images' p50,
p95 and p99, how long the images waited for a worker (p99 of acceptance to the worker's take), how
many worker executions ran them (static: one per batch; continuous: the first take and each join),
and the videos' count, p50, p99 and executions. The headline is image p99 B ÷ A, whose goal is ≤ 2:
how much an image user's tail suffers when video load shares the worker. When the ratio is high and
the images' wait is most of their p99, images queued behind video batches (the worker runs one
batch at a time, one model's at a time); when the wait is small, they ran slower instead (sampling
shares the processor with the video rows' encode and the clients).
"""

import argparse
import json
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx
from redis import Redis

from bench.service import (
    ServiceUnderTest,
    Settings,
    add_workload_flags,
    client_for,
    one_request,
    percentile,
    run_closed,
)
from dit_serve.jobs import RecordField, record_key
from models.bundled import IMAGE_MODEL_NAME, VIDEO_MODEL_DIR, VIDEO_MODEL_NAME

IMAGE, VIDEO = "image", "video"
GOAL_RATIO = 2.0  # the goal: image p99 with videos at most twice the p99 without
DEFAULT_IMAGE_LOAD = 0.5  # of the measured image capacity
# Videos/s. One bundled video of 25 steps holds the 2-core development machine's worker for about 5 s,
# so 0.05/s takes a quarter of its time: with images at half their capacity, a loaded but not an
# overloaded worker (0.25/s overloaded it: images waited a minute).
DEFAULT_VIDEO_RATE = 0.05
LABELS_PER_STREAM = 256  # request k asks for label k mod this many, drawn once from the seed
# Each stream's arrivals come from a generator of its own, so adding videos moves no image arrival.
STREAM_SEED_OFFSET = {IMAGE: 1, VIDEO: 2}


@dataclass(frozen=True)
class Arrival:
    at_s: float  # from the phase's start
    kind: str
    k: int  # the request's index in its stream: its label and seed


@dataclass
class Done:
    kind: str
    latency_s: float
    job_id: str


@dataclass
class PhaseResult:
    phase: str  # A (images alone) | B (images + videos)
    seconds: float  # from the first arrival's slot to the last output downloaded
    images: int
    image_p50_s: float
    image_p95_s: float
    image_p99_s: float
    image_wait_p99_s: float  # acceptance to the worker's take
    image_batches: int  # distinct worker executions that ran the images
    videos: int
    video_p50_s: float | None
    video_p99_s: float | None
    video_batches: int | None


def poisson_arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Arrival times in [0, seconds) at exponential intervals of mean 1/rate; none when rate is 0."""
    if rate <= 0:
        return []
    rng, times, at = random.Random(seed), [], 0.0
    while (at := at + rng.expovariate(rate)) < seconds:
        times.append(at)
    return times


def schedule(rates: dict[str, float], seconds: float, seed: int) -> list[Arrival]:
    """Every stream's arrivals, merged in time order."""
    arrivals = [
        Arrival(at, kind, k)
        for kind, rate in rates.items()
        for k, at in enumerate(poisson_arrivals(rate, seconds, seed + STREAM_SEED_OFFSET[kind]))
    ]
    return sorted(arrivals, key=lambda arrival: arrival.at_s)


def run_open_loop(
    service: ServiceUnderTest, streams: dict[str, Settings], arrivals: list[Arrival]
) -> list[Done]:
    """Post each arrival at its time from a thread of its own, wait for it, download its output."""
    done: list[Done] = []
    local = threading.local()
    clients: list[httpx.Client] = []

    def request(arrival: Arrival) -> None:
        if not hasattr(local, "client"):
            local.client = client_for(service.url)
            clients.append(local.client)
        latency, _, job_id = one_request(local.client, streams[arrival.kind], arrival.k)
        done.append(Done(arrival.kind, latency, job_id))

    start = time.perf_counter()
    # A thread per arrival: a pool smaller than the arrivals would hold posts back, closing the loop.
    with ThreadPoolExecutor(max(1, len(arrivals))) as pool:
        futures = []
        for arrival in arrivals:
            time.sleep(max(0.0, start + arrival.at_s - time.perf_counter()))
            futures.append(pool.submit(request, arrival))
        for future in futures:
            future.result()
    for client in clients:
        client.close()
    return done


def waits_s(service: ServiceUnderTest, job_ids: list[str]) -> list[float]:
    """Each job's wait for a worker: from its acceptance to its take, from the job records."""
    with Redis.from_url(service.redis_url) as redis, redis.pipeline() as pipe:
        for job_id in job_ids:
            pipe.hmget(record_key(job_id), [RecordField.CREATED_AT, RecordField.STARTED_AT])
        return [float(started) - float(created) for created, started in pipe.execute()]


def phase_result(service: ServiceUnderTest, phase: str, done: list[Done], seconds: float) -> PhaseResult:
    images = [d for d in done if d.kind == IMAGE]
    videos = [d for d in done if d.kind == VIDEO]
    image_s = [d.latency_s for d in images]
    video_s = [d.latency_s for d in videos]
    image_ids = [d.job_id for d in images]
    return PhaseResult(
        phase=phase,
        seconds=round(seconds, 3),
        images=len(images),
        image_p50_s=round(percentile(image_s, 50), 4),
        image_p95_s=round(percentile(image_s, 95), 4),
        image_p99_s=round(percentile(image_s, 99), 4),
        image_wait_p99_s=round(percentile(waits_s(service, image_ids), 99), 4),
        image_batches=service.batches(image_ids),
        videos=len(videos),
        video_p50_s=round(percentile(video_s, 50), 4) if videos else None,
        video_p99_s=round(percentile(video_s, 99), 4) if videos else None,
        video_batches=service.batches([d.job_id for d in videos]) if videos else None,
    )


def streams_for(settings: Settings, video_model_dir: Path) -> dict[str, Settings]:
    """The image and video streams' settings: the run's, with each model's name, endpoint and labels
    (drawn from its classes)."""
    rng = random.Random(settings.seed)

    def labels(model_dir: Path) -> list[int]:
        classes = json.loads((model_dir / "model_index.json").read_text()).get("id2label", {})
        return [rng.randrange(len(classes)) for _ in range(LABELS_PER_STREAM)]

    return {
        IMAGE: replace(settings, model=IMAGE_MODEL_NAME, labels=labels(settings.model_dir)),
        VIDEO: replace(
            settings,
            model=VIDEO_MODEL_NAME,
            endpoint="/v1/videos",
            model_dir=video_model_dir,
            labels=labels(video_model_dir),
        ),
    }


def run(settings: Settings, args: argparse.Namespace) -> dict:
    """Warm-up, the capacity (unless --image-rate), phase A, then phase B; returns the JSON record."""
    streams = streams_for(settings, args.video_model_dir)
    models = {stream.model: stream.model_dir for stream in streams.values()}
    env = {"DIT_INTERLEAVE": args.interleave}
    if args.max_batch_cost:
        env["DIT_MAX_BATCH_COST"] = str(args.max_batch_cost)
    record: dict = {}
    with tempfile.TemporaryDirectory(prefix="dit-mixed-") as tmp:
        service = ServiceUnderTest(settings, Path(tmp), env, embedded_redis=True, models=models).start()
        try:
            with httpx.Client(base_url=service.url, timeout=60) as client:
                for stream in streams.values():  # first batch and first output of each model
                    one_request(client, stream, 0)
            capacity = None
            if args.image_rate is None:
                closed = run_closed(service, streams[IMAGE], settings.max_batch)
                capacity = closed.images_per_second
            image_rate = args.image_rate if args.image_rate is not None else args.image_load * capacity
            record.update(
                capacity_images_per_s=capacity,
                image_rate=round(image_rate, 3),
                video_rate=args.video_rate,
                videos_expected=round(args.video_rate * args.seconds, 1),
                interleave=args.interleave,
            )
            print(json.dumps(record), flush=True)
            phases = []
            # Phase A's jobs have all ended when run_open_loop returns, so phase B starts on an idle worker.
            for phase, rates in (
                ("A", {IMAGE: image_rate}),
                ("B", {IMAGE: image_rate, VIDEO: args.video_rate}),
            ):
                arrivals = schedule(rates, args.seconds, settings.seed)
                began = time.perf_counter()
                done = run_open_loop(service, streams, arrivals)
                phases.append(phase_result(service, phase, done, time.perf_counter() - began))
                print(json.dumps(asdict(phases[-1])), flush=True)
        finally:
            service.stop()
    a, b = phases
    ratio = b.image_p99_s / a.image_p99_s
    record.update(
        phases=[asdict(p) for p in phases], image_p99_ratio=round(ratio, 3), goal_met=ratio <= GOAL_RATIO
    )
    return record


def format_table(record: dict) -> str:
    def cell(value: object) -> str:
        return "—" if value is None else str(value)

    lines = [
        f"image arrivals {record['image_rate']}/s (capacity {cell(record['capacity_images_per_s'])} "
        f"images/s), videos {record['video_rate']}/s in phase B ({record['videos_expected']} expected), "
        f"interleave {record['interleave']}",
        "",
        "| phase | images | image p50 s | image p95 s | image p99 s | image wait p99 s | image batches "
        "| videos | video p50 s | video p99 s | video batches |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"A": "A: images", "B": "B: images + videos"}
    for p in record["phases"]:
        cells = [names[p["phase"]], p["images"], p["image_p50_s"], p["image_p95_s"], p["image_p99_s"]]
        cells += [p["image_wait_p99_s"], p["image_batches"], p["videos"], p["video_p50_s"], p["video_p99_s"]]
        cells += [p["video_batches"]]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    verdict = "met" if record["goal_met"] else "not met"
    lines.append("")
    lines.append(f"image p99 B ÷ A: {record['image_p99_ratio']} (goal ≤ {GOAL_RATIO:g}: {verdict})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dit-serve bench mixed", description=__doc__.splitlines()[0])
    add_workload_flags(parser, "jobs of the closed-loop image capacity run")
    parser.add_argument("--video-model-dir", type=Path, default=VIDEO_MODEL_DIR, help="the video model")
    parser.add_argument("--seconds", type=float, default=60.0, help="arrival window of each phase")
    parser.add_argument(
        "--image-load", type=float, default=DEFAULT_IMAGE_LOAD, help="image rate, as a fraction of capacity"
    )
    parser.add_argument(
        "--image-rate", type=float, default=None, help="image arrivals/s (instead of --image-load)"
    )
    parser.add_argument("--video-rate", type=float, default=DEFAULT_VIDEO_RATE, help="video arrivals/s, B")
    parser.add_argument("--seed", type=int, default=0, help="of the arrivals, labels and samples")
    parser.add_argument("--max-batch", type=int, default=16, help="the worker's --max-batch")
    parser.add_argument("--max-wait-ms", type=int, default=20, help="the worker's --max-wait-ms")
    parser.add_argument(
        "--max-batch-cost", type=int, default=None, help="the worker's --max-batch-cost (default: its own)"
    )
    parser.add_argument("--batching", choices=["static", "continuous"], default="static", help="the worker's")
    parser.add_argument(
        "--interleave", choices=["on", "off"], default="on", help="the worker's (worker/interleave.py)"
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/mixed.json"))
    args = parser.parse_args(argv)
    settings = Settings.for_service_only(args, batching=args.batching, seed=args.seed)
    record = run(settings, args)
    record["settings"] = {key: str(value) for key, value in vars(args).items()}
    print(format_table(record))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
