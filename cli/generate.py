"""`dit-serve generate PROMPT -o out.png`: submit a job to a running service, show its progress on
stderr from the job's event stream, and save its outputs.

Exit status: 0 when the job completed and its outputs are saved; 1 when it failed or was canceled, or
the API refused the request or could not be reached (the reason on stderr); 130 after Ctrl-C, which
cancels the job first. stdout gets the saved paths, one a line, or with --json only the job object.
"""

import argparse
import sys
from pathlib import Path

import httpx
from pydantic import BaseModel, ValidationError

from cli.progress import ProgressLine, describe, describe_job
from cli.request_flags import add_request_flags, given_fields
from dit_serve.client import APIError, Client, DitServeError, ImageRequest, JobBody, JobEnded, VideoRequest
from dit_serve.client.calls import build_submission, completed
from dit_serve.client.settings import API_KEY_ENV, DEFAULT_URL, URL_ENV
from dit_serve.contract import JobKind

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
ROUTE_NOT_FOUND = "not_found"  # an API without GET /v1/jobs/{id}/events (older than the route)
JOB_FINISHED = "job_finished"
REQUEST_MODELS: dict[str, type[BaseModel]] = {"image": ImageRequest, "video": VideoRequest}
OUTPUT_HELP = (
    "where to save the outputs: a file (out.png) for one output, and for several out-0.png, out-1.png, "
    "...; a pattern with {index} (shots/cat-{index}.png); or a directory, where each is saved as "
    "<job id>-<index>.<format> (default: the current directory)"
)


def add_generate_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    generate = commands.add_parser(
        "generate", help="submit a job to a running service, follow its progress, save its outputs"
    )
    generate.add_argument("prompt", nargs="?", default=None, help="a label (class models) or text")
    generate.add_argument("--url", default=None, help=f"the API's address ({URL_ENV}, default {DEFAULT_URL})")
    generate.add_argument("--key", default=None, help=f"an API key ({API_KEY_ENV}); needed when auth is on")
    generate.add_argument("--video", action="store_true", help="a video job (default: an image job)")
    generate.add_argument("-o", "--output", default=None, help=OUTPUT_HELP.replace("%", "%%"))
    generate.add_argument(
        "--json", action="store_true", help="print the final job object as JSON on stdout, and nothing else"
    )
    generate.add_argument("--quiet", action="store_true", help="no progress on stderr")
    request = generate.add_argument_group(
        "request fields (README, Request fields; unset: the server's default)"
    )
    generate.set_defaults(request_fields=add_request_flags(request, REQUEST_MODELS, frozenset({"prompt"})))


def _follow(client: Client, job: JobBody, progress: ProgressLine) -> JobBody:
    """The job once it has ended, its events shown as they come (plain waiting on an older API)."""
    try:
        for event in client.events(job.id):
            progress.write(describe(event))
            if isinstance(event, JobEnded):
                return event.job
    except APIError as exc:
        if exc.code != ROUTE_NOT_FOUND:
            raise
    return client.wait(job.id)


def _cancel(client: Client, job_id: str) -> None:
    try:
        client.cancel(job_id)
    except APIError as exc:
        if exc.code != JOB_FINISHED:  # it ended meanwhile: nothing to cancel
            raise
    print(f"dit-serve generate: interrupted; canceled job {job_id}", file=sys.stderr)


def _invalid(exc: ValidationError) -> str:
    problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors())
    return f"dit-serve generate: invalid request: {problems} (video fields need --video)"


def run_generate(args: argparse.Namespace) -> int:
    """Run the command; returns its exit status."""
    kind = JobKind.VIDEO if args.video else JobKind.IMAGE
    try:
        body = build_submission(kind, args.prompt, **given_fields(args, args.request_fields))
    except ValidationError as exc:
        print(_invalid(exc), file=sys.stderr)
        return EXIT_FAILED
    progress = ProgressLine(sys.stderr, enabled=not args.quiet)
    with Client(args.url, args.key) as client:
        try:
            job = client.submit(body)
            try:
                progress.write(describe_job(job))
                job = _follow(client, job, progress)
            except KeyboardInterrupt:
                progress.close()
                # A fresh client: the interrupt may have landed while the other held its connection
                # pool's lock (a `with lock:` can leak it to an exception raised by a signal handler),
                # and the cancel would then wait on that lock forever.
                with Client(args.url, args.key) as fresh:
                    _cancel(fresh, job.id)
                return EXIT_INTERRUPTED
            progress.close()
            if args.json:
                print(job.model_dump_json())
            paths = client.save(completed(job), args.output or Path.cwd())
        except KeyboardInterrupt:  # before the job existed, or while saving its outputs
            return EXIT_INTERRUPTED
        except httpx.TransportError as exc:
            progress.close()
            print(f"dit-serve generate: no answer from {client.settings.base_url}: {exc!r}", file=sys.stderr)
            return EXIT_FAILED
        except (DitServeError, OSError) as exc:  # OSError: an output that cannot be written
            progress.close()
            print(f"dit-serve generate: {exc}", file=sys.stderr)
            return EXIT_FAILED
    for path in paths:
        if args.json:
            progress.write(f"saved {path}")
        else:
            print(path)
    return 0
