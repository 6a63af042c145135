"""The function RQ records for dit-serve jobs; only a stock `rq worker` would ever call it."""


def run(job_id: str) -> None:
    raise RuntimeError(
        f"job {job_id} is a dit-serve job: it is sampled in batches by `dit-serve worker`, "
        "not by a stock `rq worker`; stop the rq worker that listens on dit-serve.* queues"
    )
