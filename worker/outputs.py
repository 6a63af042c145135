"""Turn a finished job's pixels into stored files and the output records the API reports."""

import numpy as np

from dit_serve.contract import JobKind
from dit_serve.jobs import OutputRecord
from dit_serve.storage import Storage, output_key
from worker.batching import JobTicket
from worker.encoding import IMAGE_FORMATS, VIDEO_FORMATS, encode_image, encode_video, extension_for
from worker.stages import ENCODE, STORE, StageTimer, untimed


def store_outputs(
    storage: Storage, ticket: JobTicket, pixels: list[np.ndarray], timer: StageTimer = untimed
) -> list[OutputRecord]:
    """Encode and store each output of a job.

    Args:
        storage: where outputs go (written atomically).
        ticket: the job.
        pixels: one array per output: (H, W, 3) uint8 for images, (F, H, W, 3) for videos.
        timer: wraps each output's encoding and its storage write, for the worker's metrics.

    Returns:
        One record per output, in index order.
    """
    request = ticket.request
    fmt = request.output_format.value
    video = request.kind is JobKind.VIDEO
    content_type = (VIDEO_FORMATS if video else IMAGE_FORMATS)[fmt]
    outputs: list[OutputRecord] = []
    for index, array in enumerate(pixels):
        with timer(ENCODE):
            data = encode_video(array, request.fps or 1, fmt) if video else encode_image(array, fmt)
        key = output_key(ticket.job_id, index, extension_for(fmt))
        with timer(STORE):
            storage.put(key, data, content_type)
        outputs.append(
            OutputRecord(
                index=index,
                content_type=content_type,
                width=int(array.shape[-2]),
                height=int(array.shape[-3]),
                seed=request.seed + index,
                bytes=len(data),
                key=key,
                num_frames=int(array.shape[0]) if video else None,
            )
        )
    return outputs
