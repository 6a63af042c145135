"""The GPU fast path, behind flags: regional torch.compile and copy-free memory layouts.

Every choice here leaves a model's outputs what they were (up to kernel rounding) and the CPU path
working; the defaults change nothing. Attention already runs through PyTorch SDPA (diffusers'
default processors), which picks the flash kernel for bf16/fp16 on Hopper.
"""

import logging

import torch

from dit_serve.config import CompileMode
from models.families.base import LoadedModel

log = logging.getLogger(__name__)


def repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The longest ModuleList whose children are all of one class: a transformer's layer stack."""
    best: list[torch.nn.Module] = []
    for child in module.modules():
        if not isinstance(child, torch.nn.ModuleList):
            continue
        if len({type(block) for block in child}) == 1 and len(child) > len(best):
            best = list(child)
    return best


class GraphStep(torch.nn.Module):
    """A whole transformer compiled with CUDA graphs, marking a new graph step before every call.

    CUDA-graph replays reuse their output memory: marking each call as a new step lets the previous
    output die instead of being overwritten while still in use (the sampler consumes it at once).
    """

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.inner = transformer
        self.compiled = torch.compile(transformer, mode=CompileMode.REDUCE_OVERHEAD.value)

    @property
    def config(self) -> object:
        return self.inner.config

    def forward(self, *args: object, **kwargs: object) -> object:
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(*args, **kwargs)


def eager_module(transformer: torch.nn.Module) -> torch.nn.Module:
    """The transformer itself, out of the GraphStep that `reduce-overhead` wraps it in: its layers are
    where LoRA adapters go, by their own module paths."""
    return transformer.inner if isinstance(transformer, GraphStep) else transformer


def accelerate(model: LoadedModel, compile_mode: CompileMode) -> int:
    """Apply the fast path to a loaded model; returns how many blocks were compiled.

    `default` and `max-autotune-no-cudagraphs` compile regionally: the repeated transformer block once,
    reused for every layer, so the compile takes seconds where compiling the whole model takes
    minutes, at nearly the same speed. `reduce-overhead` compiles the whole transformer into CUDA
    graphs (one graph per step instead of hundreds of kernel launches; per-block graphs would overwrite
    each other's outputs). On CUDA the VAE also runs channels-last, the layout cuDNN's convolutions want.
    """
    if model.device.type == "cuda":
        model.vae.to(memory_format=torch.channels_last)
    if compile_mode is CompileMode.NONE:
        return 0
    if compile_mode is CompileMode.REDUCE_OVERHEAD:
        model.transformer = GraphStep(model.transformer)
        log.info("model %s: transformer compiled whole with CUDA graphs", model.name)
        return 1
    blocks = repeated_blocks(model.transformer)
    for block in blocks:
        block.compile(mode=compile_mode.value)
    log.info("model %s: %d transformer blocks compiled (%s)", model.name, len(blocks), compile_mode.value)
    return len(blocks)
