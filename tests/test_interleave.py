"""Interleaving (worker/interleave.py): a long run pauses at a step boundary while a shorter batch of
another of the worker's models runs. The policy's pure parts, then a real Worker in this process, on a
real Redis with the tiny image and video models, static and continuous: an image queued behind a
running video ends before it, the video's output is byte for byte the one it has when it runs
uninterrupted, and the video's watchdog is re-armed when it resumes."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from dit_serve.contract import JobKind
from dit_serve.jobs import queue_name
from models.loading import LoadedModel, load_model
from tests.worker_harness import CPU, InProcessWorker, job_request
from worker.interleave import Interleaver, Pace, QueueShape, expected_batch_s, shortest_to_interleave

VIDEO_STEPS = 10
IMAGE_STEPS = 3
IMG, VID = queue_name("img"), queue_name("vid")


# -- the policy ------------------------------------------------------------------------------------


def test_a_measured_pace_is_used_and_an_unmeasured_queue_is_scaled_by_cost_per_step() -> None:
    shape = QueueShape(steps=20, step_cost=32 * 32)
    assert expected_batch_s(shape, known_s=0.05, running_step_s=9.0, running_step_cost=1) == pytest.approx(
        1.0
    )
    # never measured: the running run's 0.2 s per step of a 16-frame 32x32 video, scaled to one frame
    cold = expected_batch_s(shape, known_s=None, running_step_s=0.2, running_step_cost=16 * 32 * 32)
    assert cold == pytest.approx(20 * 0.2 / 16)


def test_only_a_batch_expected_to_end_first_is_chosen_and_the_shortest_of_them() -> None:
    expected = {"a": 3.0, "b": 1.0, "c": 0.5}
    assert shortest_to_interleave(["a", "b"], expected, remaining_s=2.0) == "b"
    assert shortest_to_interleave(["a", "b", "c"], expected, remaining_s=2.0) == "c"
    assert shortest_to_interleave(["a"], expected, remaining_s=2.0) is None
    assert shortest_to_interleave([], expected, remaining_s=2.0) is None


def test_pace_is_a_moving_average_of_measured_steps() -> None:
    pace = Pace()
    pace.record("q", 1.0)
    pace.record("q", 3.0)
    assert pace.seconds == {"q": 2.0}


class FakeQueues:
    """What the Interleaver asks of a worker: which queues wait, and running one batch of one."""

    def __init__(self, waiting: list[str]):
        self.queued = list(waiting)
        self.ran: list[str] = []
        self.interleaver: Interleaver | None = None

    def waiting(self, queues: list[str]) -> list[str]:
        return [queue for queue in queues if queue in self.queued]

    def run_batch(self, queue: str) -> bool:
        assert self.interleaver is not None
        self.ran.append(queue)
        self.queued.remove(queue)
        # the batch run inside is itself a run at step boundaries: it must never pause for another
        assert not self.interleaver.turn(queue, job_request(JobKind.IMAGE, 4), 3, 0.01)
        return True


def _interleaver(queues: FakeQueues, enabled: bool = True) -> Interleaver:
    shapes = {
        "img": QueueShape(steps=4, step_cost=32 * 32),
        "img2": QueueShape(steps=4, step_cost=32 * 32),
        "vid": QueueShape(steps=25, step_cost=16 * 32 * 32),
    }
    queues.interleaver = Interleaver(shapes, queues.waiting, queues.run_batch, enabled)
    return queues.interleaver


def test_a_long_run_runs_one_shorter_batch_per_step_boundary_and_never_nests() -> None:
    queues = FakeQueues(["img", "img2"])
    interleaver = _interleaver(queues)
    video = job_request(JobKind.VIDEO, 25, frames=16)
    assert interleaver.turn("vid", video, 20, 0.2)  # one batch only: the paused run steps before the next
    assert queues.ran == ["img"] and interleaver.paused_s > 0
    assert interleaver.turn("vid", video, 19, 0.2)
    assert queues.ran == ["img", "img2"]
    assert not interleaver.turn("vid", video, 18, 0.2)  # nothing waits
    assert interleaver.pace.seconds == {"vid": pytest.approx(0.2), "img": 0.01, "img2": 0.01}


def test_a_short_run_is_not_paused_for_a_longer_batch_nor_without_a_measured_pace() -> None:
    queues = FakeQueues(["vid"])
    interleaver = _interleaver(queues)
    image = job_request(JobKind.IMAGE, 4)
    assert not interleaver.turn("img", image, 3, None)  # the first step's time is not known yet
    assert not interleaver.turn("img", image, 3, 0.05)  # 25 video steps ~ 16x an image step each
    assert not interleaver.turn("img", image, 0, 0.05)
    assert queues.ran == []


def test_turned_off_it_never_pauses() -> None:
    queues = FakeQueues(["img"])
    interleaver = _interleaver(queues, enabled=False)
    assert not interleaver.turn("vid", job_request(JobKind.VIDEO, 25, frames=16), 20, 0.2)
    assert queues.ran == []


# -- a real worker ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(model_dirs: dict[str, Path]) -> dict[str, LoadedModel]:
    return {name: load_model(name, model_dirs[name], CPU) for name in ("vid", "img")}


@pytest.fixture
def run(redis: Redis, tiny: dict[str, LoadedModel], tmp_path: Path) -> Iterator[object]:
    def make(continuous: bool, interleave: bool) -> InProcessWorker:
        return InProcessWorker(
            redis, tiny, tmp_path / f"out-{continuous}-{interleave}", continuous, interleave
        )

    yield make


@pytest.mark.parametrize("continuous", [False, True], ids=["static", "continuous"])
def test_an_image_queued_behind_a_running_video_ends_first_and_the_video_is_unchanged(
    run, continuous: bool
) -> None:
    frames = 5
    # Off: the video, taken first, runs to its end before the image starts.
    off = run(continuous, interleave=False)
    video, image = (
        off.enqueue("v-off", job_request(JobKind.VIDEO, VIDEO_STEPS, frames, model="vid")),
        off.enqueue("i-off", job_request(JobKind.IMAGE, IMAGE_STEPS, model="img")),
    )
    assert off.worker.run_once() and off.status(video) == "finished" and off.status(image) == "queued"
    assert off.worker.run_once() and off.status(image) == "finished"
    uninterrupted = off.output(video)

    # On: the image batch runs inside the video's run, at one of its step boundaries.
    on = run(continuous, interleave=True)
    on.worker.interleaver.pace.record(IMG, 1e-4)  # measured before: an image batch is short
    video, image = (
        on.enqueue("v-on", job_request(JobKind.VIDEO, VIDEO_STEPS, frames, model="vid")),
        on.enqueue("i-on", job_request(JobKind.IMAGE, IMAGE_STEPS, model="img")),
    )
    assert on.worker.run_once()
    assert on.status(video) == "finished" and on.status(image) == "finished"
    v, i = on.record(video), on.record(image)
    assert v.started_at and i.started_at and v.completed_at and i.completed_at
    assert v.started_at < i.started_at and i.completed_at < v.completed_at
    assert on.output(video) == uninterrupted  # a row does not depend on being paused
    # the video's watchdog was armed, then the image's, then the video's again when it resumed
    assert on.armed[:3] == [{video}, {image}, {video}]
    assert on.worker.ledger.held() == [] and on.worker.ledger.overdue() is None
    assert on.worker.interleaver.paused_s > 0 and not on.worker.interleaver.nested
    assert on.sample("dit_interleaved_batches_total", model="img", kind="image") == 1
    assert off.sample("dit_interleaved_batches_total", model="img", kind="image") == 0


def test_a_running_image_batch_is_not_paused_for_a_longer_video(run) -> None:
    on = run(False, interleave=True)
    on.worker._next_queue = 1  # the image queue's turn first
    image = on.enqueue("i", job_request(JobKind.IMAGE, 8, model="img"))
    video = on.enqueue("v", job_request(JobKind.VIDEO, VIDEO_STEPS, 5, model="vid"))
    assert on.worker.run_once()
    assert on.status(image) == "finished" and on.status(video) == "queued"
    assert on.worker.run_once() and on.status(video) == "finished"
    assert on.record(image).completed_at < on.record(video).started_at  # type: ignore[operator]
