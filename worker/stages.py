"""The stages of a batch, by name, and the timer protocol the sampler and the output writer call."""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

CONDITIONS = "conditions"  # the batch's conditional and unconditional inputs (text encoding)
SAMPLING = "sampling"  # the whole denoising loop
DECODE = "decode"  # VAE decode of the finished latents
ENCODE = "encode"  # one output to PNG/JPEG/WebP or MP4/GIF bytes
STORE = "store"  # one output written to storage

# timer(stage) -> a context manager around that stage's work
StageTimer = Callable[[str], AbstractContextManager[None]]


@contextmanager
def untimed(_stage: str) -> Iterator[None]:
    yield
