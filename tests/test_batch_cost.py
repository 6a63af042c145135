"""Batches bounded in cost units (worker/batching.py), in Python and in the take script, on a real Redis."""

import pytest
from redis import Redis

from dit_serve.config import DEFAULT_MAX_BATCH_COST
from dit_serve.contract import JobRequest
from dit_serve.jobs import JobRecord, queue_name
from dit_serve.queueing import enqueue_job
from tests.test_contract import _request as contract_request
from worker.batching import JobTicket, Room, row_cost
from worker.queue import JobQueue

MODEL = "m"
QUEUE = queue_name(MODEL)
TTL_S = 3600
IMAGE_CFG_ROW = 32 * 32 * 2  # a 32x32 row with guidance > 1: its unconditional row doubles it


def _request(n: int = 1, guidance: float = 4.0) -> JobRequest:
    return contract_request(model=MODEL, n=n, class_labels=[0] * n, guidance_scale=guidance)


def _enqueue(redis: Redis, job_id: str, n: int = 1, guidance: float = 4.0) -> None:
    enqueue_job(redis, job_id, JobRecord.new(_request(n, guidance)), retries=0, ttl_s=TTL_S)


def _take(redis: Redis, room: Room, joining: bool = False) -> list[str]:
    queue = JobQueue(redis, [QUEUE], "w", 30, TTL_S)
    return [t.job_id for t in queue.take(QUEUE, room.rows, "e", joining=joining, max_cost=room.cost)]


def test_a_row_costs_pixels_times_frames_times_its_forward_rows() -> None:
    assert row_cost(_request(guidance=4.0)) == IMAGE_CFG_ROW
    assert row_cost(_request(guidance=1.0)) == 32 * 32  # no CFG at or below 1: one forward row
    video = _request().model_copy(update={"num_frames": 9, "width": 64, "height": 48})
    assert row_cost(video) == 64 * 48 * 9 * 2


def test_the_default_limit_leaves_the_bundled_models_bound_by_rows() -> None:
    assert DEFAULT_MAX_BATCH_COST == 16 * 512 * 512 * 2  # DiT-XL/2 at 512x512, 16 rows with CFG
    bundled_video = _request().model_copy(update={"kind": "video", "num_frames": 16, "output_format": "mp4"})
    assert 16 * row_cost(bundled_video) <= DEFAULT_MAX_BATCH_COST
    wan_480p = bundled_video.model_copy(update={"num_frames": 81, "width": 832, "height": 480})
    assert row_cost(wan_480p) > DEFAULT_MAX_BATCH_COST  # runs alone


def test_room_shrinks_by_rows_and_cost_and_is_full_when_either_runs_out() -> None:
    tickets = [JobTicket(f"j{n}", QUEUE, "e", _request(n=n)) for n in (1, 3)]
    assert Room(16, 16 * IMAGE_CFG_ROW).after(tickets) == Room(12, 12 * IMAGE_CFG_ROW)
    assert not Room(12, 12 * IMAGE_CFG_ROW).full
    assert Room(5, 0).full and Room(0, 10**9).full


def test_the_take_script_bounds_the_batch_in_cost_units(redis: Redis) -> None:
    _enqueue(redis, "cfg", n=2)  # 2 x 2048
    _enqueue(redis, "plain", n=2, guidance=1.0)  # 2 x 1024: the same compat, half the cost
    _enqueue(redis, "last", n=1)  # 2048: would pass the cost limit
    # Rows allow all five; cost allows the first two jobs exactly, so the script's cost is row_cost's.
    assert _take(redis, Room(16, 2 * IMAGE_CFG_ROW + 2 * 32 * 32)) == ["cfg", "plain"]
    assert _take(redis, Room(16, DEFAULT_MAX_BATCH_COST)) == ["last"]


def test_a_job_over_the_cost_limit_runs_alone_but_never_joins(redis: Redis) -> None:
    _enqueue(redis, "big", n=4)
    _enqueue(redis, "small")
    assert _take(redis, Room(16, IMAGE_CFG_ROW), joining=True) == ["small"]  # a joiner must fit
    _enqueue(redis, "next")
    assert _take(redis, Room(16, IMAGE_CFG_ROW)) == ["big"]  # first of a new batch: alone
    assert _take(redis, Room(16, IMAGE_CFG_ROW)) == ["next"]


@pytest.mark.parametrize("joining", [False, True])
def test_rows_still_bound_a_batch_under_a_generous_cost_limit(redis: Redis, joining: bool) -> None:
    for job_id in ("a", "b", "c"):
        _enqueue(redis, job_id, n=2)
    assert _take(redis, Room(5, 10**12), joining=joining) == ["a", "b"]
