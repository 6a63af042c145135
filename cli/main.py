"""The `dit-serve` command: up (everything in one command), api, worker, keys, generate, soak, bench, train,
eval."""

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence

from pydantic import SecretStr

from cli.bench import add_bench_parser, run_bench
from cli.generate import add_generate_parser, run_generate
from cli.keys import add_keys_parser, run_keys
from cli.soak import add_soak_parser, run_soak_command
from dit_serve.config import AuthMode, Settings, auth_default, get_settings

WORKER_STOP_TIMEOUT_S = 30.0  # how long `up` lets its worker finish its batch before killing it

# (flag, settings field, help); every flag also has an environment variable, DIT_<FIELD> (REDIS_URL).
COMMON_FLAGS = [
    ("--host", "host", "address the API listens on (DIT_HOST, default 127.0.0.1)"),
    ("--port", "port", "port of the API (DIT_PORT, default 8000)"),
    (
        "--auth",
        "auth",
        "on: /v1 routes need an API key (`dit-serve keys create`); off: none (DIT_AUTH; default on, "
        "except off for `up` on 127.0.0.1, ::1 or localhost)",
    ),
    ("--redis-url", "redis_url", "Redis URL (REDIS_URL); `up` starts an embedded Redis when absent"),
    (
        "--output-dir",
        "output_dir",
        "where local storage writes outputs (DIT_OUTPUT_DIR, default ./data/outputs)",
    ),
    (
        "--data-dir",
        "data_dir",
        "where `up` keeps the embedded Redis' data (DIT_DATA_DIR, default ./data)",
    ),
    ("--storage", "storage", "output storage: local or s3 (DIT_STORAGE)"),
    ("--device", "device", "auto, cpu or cuda (DIT_DEVICE, default auto)"),
    ("--dtype", "dtype", "fp32, fp16 or bf16 for every model (DIT_DTYPE, default fp32)"),
    (
        "--compile",
        "compile",
        "torch.compile the transformer blocks: none, default, reduce-overhead (CUDA graphs) or "
        "max-autotune-no-cudagraphs (DIT_COMPILE, default none)",
    ),
    ("--max-batch", "max_batch", "most outputs sampled in one batch (DIT_MAX_BATCH, default 16)"),
    (
        "--max-batch-cost",
        "max_batch_cost",
        "most cost units in one batch, a row costing pixels x frames x 2 with CFG (DIT_MAX_BATCH_COST, "
        "default 8388608: 16 rows of a 512x512 image with CFG); a larger job still runs, alone",
    ),
    (
        "--max-wait-ms",
        "max_wait_ms",
        "static batching: how long a lone first job waits for more (DIT_MAX_WAIT_MS, default 20)",
    ),
    (
        "--batch-gap-ms",
        "batch_gap_ms",
        "static batching: each job that joins keeps the batch open this long more (DIT_BATCH_GAP_MS, "
        "default 100; 0: a fixed --max-wait-ms window)",
    ),
    (
        "--max-fill-ms",
        "max_fill_ms",
        "static batching: the longest a batch stays open after its first job (DIT_MAX_FILL_MS, default 500)",
    ),
    (
        "--batching",
        "batching",
        "static, or continuous: jobs join a running batch at step boundaries, for models whose "
        "scheduler is DDIM, DPM-Solver++ or UniPC (the DiTs, PixArt and Wan; others batch statically) "
        "(DIT_BATCHING, default static)",
    ),
    (
        "--interleave",
        "interleave",
        "on: a long run (a video) pauses between its steps while a shorter batch of another model the "
        "worker serves runs; off: each batch runs to its end first (DIT_INTERLEAVE, default on)",
    ),
    (
        "--lora-memory-mb",
        "lora_memory_mb",
        "worker: the memory LoRA adapters may take per model; least recently used ones are unloaded past "
        "it (DIT_LORA_MEMORY_MB, default 1024)",
    ),
    (
        "--metrics-port",
        "metrics_port",
        "port of a worker's Prometheus /metrics, 0 for none (DIT_METRICS_PORT, default 9400; `up` "
        "picks a free one, and its API's /metrics carries the worker's)",
    ),
    (
        "--metrics-host",
        "metrics_host",
        "address of a worker's /metrics (DIT_METRICS_HOST, default 127.0.0.1)",
    ),
    (
        "--max-queue-depth",
        "max_queue_depth",
        "most jobs waiting in one model's queue; more are refused with 429 queue_full, 0 for no cap "
        "(DIT_MAX_QUEUE_DEPTH, default 1000)",
    ),
    ("--default-model", "default_model", "model used when a request names none (DIT_DEFAULT_MODEL)"),
    ("--log-level", "log_level", "debug, info, warning (DIT_LOG_LEVEL)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit-serve", description="Serve Diffusion Transformers over HTTP.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("up", "API + one worker (+ an embedded Redis when no --redis-url) in one command"),
        ("api", "the HTTP API only"),
        ("worker", "one batching worker only"),
    ):
        command = commands.add_parser(name, help=help_text)
        for flag, field, flag_help in COMMON_FLAGS:
            command.add_argument(flag, dest=field, default=None, help=flag_help)
        command.add_argument(
            "--model",
            dest="models",
            action="append",
            default=None,
            metavar="NAME=SOURCE",
            help="serve a pipeline directory or hub id as NAME (repeatable; DIT_MODELS as a JSON list)",
        )
        command.add_argument(
            "--cache",
            dest="cache",
            action="append",
            default=None,
            metavar="MODEL=POLICY",
            help="step caching for requests to MODEL that name none: none, auto (the model's measured "
            "policy), first_block, interval, or NAME,KNOB=VALUE,... (repeatable; DIT_CACHE as a JSON list)",
        )
        command.add_argument(
            "--lora",
            dest="lora",
            action="append",
            default=None,
            metavar="MODEL:NAME=SOURCE",
            help="worker: register a LoRA adapter of MODEL as NAME from a PEFT adapter directory or a "
            "diffusers LoRA .safetensors file (repeatable; DIT_LORA as a JSON list)",
        )
    add_keys_parser(commands)
    add_generate_parser(commands)
    add_soak_parser(commands)
    add_bench_parser(commands)
    train = commands.add_parser(
        "train", help="retrain a bundled model from its fixed-seed recipe (CPU: minutes)"
    )
    train.add_argument(
        "model",
        choices=["image", "video", "judge", "lora"],
        help="image: VAE + image DiT; video: video DiT; judge: eval classifier; lora: a style adapter on "
        "the image model (--style)",
    )
    train.add_argument(
        "--base",
        default="dit-shapes-image",
        help="lora: the base model, the bundled image model's name or a model directory",
    )
    train.add_argument("--style", default="outline", help="lora: the style the adapter draws (outline)")
    train.add_argument("--steps", type=int, default=None, help="lora: training steps (default: the recipe's)")
    train.add_argument(
        "--outline-width",
        type=float,
        default=None,
        help="lora: the outline's width in pixels (default: the shipped adapter's, shapes.OUTLINE_WIDTH)",
    )
    train.add_argument("--out-dir", default=None, help="where to write the model (default: models/bundled)")
    train.add_argument(
        "--device", default="cpu", help="cpu (the recorded recipe) or cuda (same data and noise)"
    )
    evaluate = commands.add_parser(
        "eval", help="score the bundled models' label accuracy through the real sampler"
    )
    evaluate.add_argument(
        "--image-model", default=None, help="image model directory (default: the bundled one)"
    )
    evaluate.add_argument(
        "--video-model", default=None, help="video model directory (default: the bundled one)"
    )
    evaluate.add_argument("--kind", choices=["image", "video", "both"], default="both")
    evaluate.add_argument(
        "--per-label", type=int, default=8, help="image samples per label (videos: a quarter)"
    )
    evaluate.add_argument("--json", default=None, help="also write the rows to this JSON file")
    evaluate.add_argument("--device", default="cpu", help="where to sample (the judge runs on the CPU)")
    evaluate.add_argument(
        "--cache",
        action="store_true",
        help="score every step-caching policy against cache none (the guardrail for a model's auto)",
    )
    evaluate.add_argument(
        "--lora",
        default=None,
        metavar="DIR",
        help="score a style adapter (a PEFT directory) on the image model: hollowness and label accuracy "
        "with and without it",
    )
    evaluate.add_argument(
        "--outline-widths",
        default=None,
        metavar="W,W,...",
        help="--lora: also pass outline renders of these widths (pixels) through the VAE and back, to see "
        "which the VAE carries (default: the adapter's trained width only)",
    )
    evaluate.add_argument(
        "--video-every",
        type=int,
        default=4,
        help="--cache: one clip of every this many video labels (default 4: 24 of the bundled 96)",
    )
    evaluate.add_argument(
        "--write-auto",
        action="store_true",
        help="--cache: write the passing policy that skips the most block compute to each model's "
        "cache_policy.json",
    )
    return parser


def run_train(args: argparse.Namespace) -> None:
    from pathlib import Path

    from models.training.recipes import BUNDLED_DIR, train_image_model, train_video_model

    if args.model == "judge":
        from evaluation.classifier import WEIGHTS, train_classifier

        accuracy = train_classifier(Path(args.out_dir) / WEIGHTS.name if args.out_dir else WEIGHTS)
        print(f"judge classifier: {accuracy:.1%} on fresh clean renders")
        return
    import torch

    if args.model == "lora":
        from dataclasses import replace

        from models.bundled import IMAGE_MODEL_DIR, IMAGE_MODEL_NAME
        from models.training.lora import LORA_RECIPE, train_lora
        from models.training.shapes import OUTLINE_WIDTH

        base = IMAGE_MODEL_DIR if args.base == IMAGE_MODEL_NAME else Path(args.base)
        recipe = replace(LORA_RECIPE, steps=args.steps) if args.steps else LORA_RECIPE
        out = Path(args.out_dir) / args.style if args.out_dir else None
        width = args.outline_width or OUTLINE_WIDTH
        path = train_lora(args.style, base, out, recipe, torch.device(args.device), width)
        print(f"adapter written to {path}; serve it with --lora {IMAGE_MODEL_NAME}:{args.style}={path}")
        return
    out_dir = Path(args.out_dir) if args.out_dir else BUNDLED_DIR
    (train_image_model if args.model == "image" else train_video_model)(out_dir, torch.device(args.device))


def run_evaluation(args: argparse.Namespace) -> None:
    from pathlib import Path

    import torch

    from evaluation.run import run_eval
    from models.bundled import IMAGE_MODEL_DIR, VIDEO_MODEL_DIR

    image_dir = Path(args.image_model) if args.image_model else IMAGE_MODEL_DIR
    video_dir = Path(args.video_model) if args.video_model else VIDEO_MODEL_DIR
    if args.kind in ("video", "both") and not (video_dir / "model_index.json").is_file():
        print(f"no video model at {video_dir} (`dit-serve train video` makes one); evaluating images only")
        args.kind = "image"
    if args.lora:
        from evaluation.lora import run_lora_eval
        from evaluation.run import load_class_model

        model = load_class_model("image", image_dir, torch.device(args.device))
        widths = [float(w) for w in args.outline_widths.split(",")] if args.outline_widths else None
        run_lora_eval(model, Path(args.lora), args.per_label, Path(args.json) if args.json else None, widths)
        return
    if args.cache:
        from evaluation.cache import run_cache_eval

        run_cache_eval(
            image_dir if args.kind in ("image", "both") else None,
            video_dir if args.kind in ("video", "both") else None,
            args.per_label,
            args.video_every,
            Path(args.json) if args.json else None,
            args.write_auto,
            torch.device(args.device),
        )
        return
    run_eval(
        image_dir if args.kind in ("image", "both") else None,
        video_dir if args.kind in ("video", "both") else None,
        args.per_label,
        Path(args.json) if args.json else None,
        torch.device(args.device),
    )


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {field: getattr(args, field) for _, field, _ in COMMON_FLAGS}
    overrides["models"] = args.models
    overrides["cache"] = args.cache
    overrides["lora"] = args.lora
    return get_settings(**overrides)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _environment(settings: Settings) -> dict[str, str]:
    """The settings as environment variables, to hand to a child process."""
    env = dict(os.environ)
    for field, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        if isinstance(secret := getattr(settings, field), SecretStr):
            value = secret.get_secret_value()  # model_dump masks it as "**********"
        key = "REDIS_URL" if field == "redis_url" else f"DIT_{field.upper()}"
        env[key] = value if isinstance(value, str) else json.dumps(value)
    return env


def run_api(settings: Settings) -> None:
    import uvicorn

    from app.main import create_app

    if settings.auth == AuthMode.ON:
        logging.getLogger(__name__).info(
            "auth is on: clients need an API key (`dit-serve keys create NAME --redis-url URL`)"
        )
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower()
    )


def _with_worker_metrics(settings: Settings) -> Settings:
    """`up`'s worker serves its metrics on a free port unless one was set, and the API re-exports them.

    A fixed default port would make the worker of a second `up` on the same machine fail to start.
    """
    from dit_serve.embedded_redis import free_port

    if "metrics_port" not in settings.model_fields_set:  # neither --metrics-port nor DIT_METRICS_PORT
        settings = settings.model_copy(update={"metrics_port": free_port()})
    if settings.metrics_port and not settings.worker_metrics_url:
        # One scrape target for the host: the API's /metrics carries the worker's.
        url = f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"
        settings = settings.model_copy(update={"worker_metrics_url": url})
    return settings


def run_up(settings: Settings) -> None:
    """API in this process, one supervised worker as a child process, an embedded Redis unless one is given.

    SIGTERM or SIGINT stops the API, then the worker (after its batch), then Redis. uvicorn handles
    both signals while it serves and raises them again once it has stopped; `up` keeps its own
    handlers installed throughout, or that SIGTERM would end it before its children are stopped.
    """
    import uvicorn

    from app.main import create_app
    from cli.supervisor import WorkerSupervisor
    from dit_serve.embedded_redis import EmbeddedRedis

    log = logging.getLogger(__name__)
    stop_requested = threading.Event()
    server: uvicorn.Server | None = None

    def stop(signum: int, _frame: object) -> None:
        if not stop_requested.is_set():
            log.info("%s: stopping the API, the worker, then Redis", signal.Signals(signum).name)
        stop_requested.set()
        if server:
            server.should_exit = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    embedded = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(settings.data_dir / "redis").start()
        settings = settings.model_copy(update={"redis_url": embedded.url})
        log.info("started an embedded Redis at %s", embedded.url)
    try:
        settings = _with_worker_metrics(settings)
        assert settings.redis_url
        if settings.auth == AuthMode.ON:
            log.warning(
                "auth is on (%s is not a loopback address, or --auth on): clients need an API key; "
                "create one with `dit-serve keys create NAME --redis-url %s`",
                settings.host,
                settings.redis_url,
            )
        level = settings.log_level.lower()
        api = uvicorn.Server(
            uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level=level)
        )
        api.should_exit = stop_requested.is_set()
        server = api

        def stop_api() -> None:
            api.should_exit = True

        name_base = settings.worker_name or f"{socket.gethostname()}.up{os.getpid()}"
        supervisor = WorkerSupervisor(_environment(settings), settings.redis_url, name_base, stop_api)
        supervisor.start()
        try:
            api.run()
        finally:
            supervisor.stop(WORKER_STOP_TIMEOUT_S)
    finally:
        if embedded:
            embedded.stop()
            log.info("stopped the embedded Redis")
    if supervisor.failure:
        raise SystemExit(f"dit-serve up stopped: {supervisor.failure}")
    if not api.started and not stop_requested.is_set():
        raise SystemExit(f"dit-serve up: the API could not start on {settings.host}:{settings.port}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command in ("train", "eval"):
        _setup_logging("info")
        run_train(args) if args.command == "train" else run_evaluation(args)
        return
    if args.command == "generate":
        raise SystemExit(run_generate(args))
    if args.command == "keys":
        run_keys(args, args.redis_url or get_settings().redis_url)
        return
    if args.command == "bench":
        run_bench(args.scenario, args.args)
        return
    if args.command == "soak":
        _setup_logging("info")
        run_soak_command(args)
        return
    settings = _settings(args)
    if settings.auth is None:  # neither --auth nor DIT_AUTH: the command's default
        settings = settings.model_copy(update={"auth": auth_default(args.command, settings.host)})
    _setup_logging(settings.log_level)
    if args.command == "api":
        run_api(settings)
    elif args.command == "worker":
        from worker.main import run_worker

        run_worker(settings)
    else:
        run_up(settings)


if __name__ == "__main__":
    main()
