"""Step-level continuous batching: rows at different denoising steps share one forward pass.

diffusers' schedulers step a whole batch with one scalar timestep, so a job could only join a batch
at its start. Here each row carries its own position in the schedule: the transformer gets one
timestep per row (DiT's timestep embedding takes a vector), and the scheduler update is the
project's own vectorised DDIM step, written to match `DDIMScheduler.step` (eta = 0) operation for
operation. A row's output depends only on its own seed, condition and guidance, so it is the same
whether it ran alone, in a static batch, or joined this one mid-flight.
"""

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from dit_serve.caching import CachePolicy
from models.families.base import Conditioning, LoadedModel, RowCondition
from worker.sampling import cfg_denoise, guided_rows, initial_noise, select_rows
from worker.step_cache import RowCaches, planned, step_cache

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class UnsupportedScheduler(ValueError):
    """A scheduler this module has no per-row step for; the worker batches such models statically."""


@dataclass(frozen=True)
class DDIMTable:
    """A DDIM schedule for one step count, as per-row lookups."""

    timesteps: torch.Tensor  # (S,) the schedule, first to last
    alphas_cumprod: torch.Tensor  # (T,) fp32
    final_alpha_cumprod: float
    step_size: int  # num_train_timesteps // num_inference_steps: DDIM's previous-timestep rule
    prediction_type: str
    clip_range: float | None


def ddim_table(scheduler: SchedulerMixin, num_inference_steps: int) -> DDIMTable:
    """The schedule `scheduler` would run for `num_inference_steps`, if it is a DDIM one we can step."""
    if not isinstance(scheduler, DDIMScheduler):
        raise UnsupportedScheduler(f"{type(scheduler).__name__} has no per-row step here (DDIM has)")
    config = scheduler.config
    if config.thresholding or config.prediction_type not in PREDICTION_TYPES:
        raise UnsupportedScheduler("DDIM with dynamic thresholding or an unknown prediction type")
    fresh = DDIMScheduler.from_config(config)
    fresh.set_timesteps(num_inference_steps)
    return DDIMTable(
        timesteps=fresh.timesteps.clone(),
        alphas_cumprod=fresh.alphas_cumprod.float(),
        final_alpha_cumprod=float(fresh.final_alpha_cumprod),
        step_size=config.num_train_timesteps // num_inference_steps,
        prediction_type=config.prediction_type,
        clip_range=float(config.clip_sample_range) if config.clip_sample else None,
    )


def ddim_step(table: DDIMTable, pred: torch.Tensor, timesteps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM update (eta = 0) for rows at different timesteps: ddim_update's latents."""
    return ddim_update(table, pred, timesteps, x)[0]


def ddim_update(
    table: DDIMTable, pred: torch.Tensor, timesteps: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM update (eta = 0) for rows at different timesteps.

    Args:
        table: the schedule.
        pred: (N, C, *S) model output (eps, x0 or v, per the table's prediction type).
        timesteps: (N,) each row's current timestep, on the CPU.
        x: (N, C, *S) each row's current latents.

    Returns:
        (N, C, *S) latents at each row's previous timestep, and (N, C, *S) the predicted clean latents.
    """
    previous = timesteps - table.step_size  # (N,)
    alpha_t = table.alphas_cumprod[timesteps]  # (N,)
    alpha_prev = torch.where(
        previous >= 0, table.alphas_cumprod[previous.clamp(min=0)], torch.tensor(table.final_alpha_cumprod)
    )
    shape = (-1, *([1] * (x.dim() - 1)))
    alpha_t = alpha_t.view(shape).to(x.device)  # (N, 1, ...)
    alpha_prev = alpha_prev.view(shape).to(x.device)
    beta_t = 1 - alpha_t
    if table.prediction_type == "epsilon":
        x0 = (x - beta_t ** (0.5) * pred) / alpha_t ** (0.5)
        eps = pred
    elif table.prediction_type == "sample":
        x0 = pred
        eps = (x - alpha_t ** (0.5) * x0) / beta_t ** (0.5)
    else:  # v_prediction
        x0 = (alpha_t**0.5) * x - (beta_t**0.5) * pred
        eps = (alpha_t**0.5) * pred + (beta_t**0.5) * x
    if table.clip_range is not None:
        x0 = x0.clamp(-table.clip_range, table.clip_range)
    direction = (1 - alpha_prev) ** (0.5) * eps
    return alpha_prev ** (0.5) * x0 + direction, x0


class RunningBatch:
    """Rows of one model, size and step count, each at its own step, advanced one step at a time.

    Rows join with `add` at any step boundary and leave with `pop` (finished) or `drop` (canceled);
    every row is known by the id `add` returned.
    """

    def __init__(self, model: LoadedModel, steps: int, width: int, height: int, frames: int = 1):
        self.model = model
        self.steps = steps
        self.shape = model.latent_shape(width, height, frames)
        self.table = ddim_table(model.scheduler, steps)
        self.ids: list[int] = []
        self.positions = torch.zeros(0, dtype=torch.long)  # (N,) steps done per row
        self.latents = torch.zeros((0, *self.shape), device=model.device)  # (N, *shape) fp32
        self.cond: Conditioning = {}
        self.uncond: Conditioning = {}
        self.guidance = torch.zeros(0, device=model.device)  # (N,)
        self.clean = torch.zeros(0)  # (N, *shape) the last step's predicted clean latents, for previews
        self.caches = RowCaches()  # step caching, per row id
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.ids)

    def add(
        self,
        conditions: list[RowCondition],
        seeds: list[int],
        guidance_scales: list[float],
        caches: list[CachePolicy | None] | None = None,
    ) -> list[int]:
        """New rows at step 0 (their noise drawn from their seeds, their step caching from `caches`);
        returns their ids."""
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        latents = initial_noise(generators, self.shape, self.model.device)
        cond, uncond = self.model.conditions(conditions)
        guidance = torch.tensor(guidance_scales, dtype=torch.float32, device=self.model.device)
        ids = list(range(self._next_id, self._next_id + len(seeds)))
        self._next_id += len(seeds)
        self.caches.add(ids, caches or [None] * len(ids))
        self.ids += ids
        self.positions = torch.cat([self.positions, torch.zeros(len(ids), dtype=torch.long)])
        self.latents = torch.cat([self.latents, latents])
        self.cond = _cat(self.cond, cond)
        self.uncond = _cat(self.uncond, uncond)
        self.guidance = torch.cat([self.guidance, guidance])
        return ids

    def step(self) -> None:
        """Advance every row by one denoising step."""
        timesteps = self.table.timesteps[self.positions]  # (N,) on the CPU
        t = timesteps.to(self.latents.device)
        guided = guided_rows(self.guidance)
        cache = step_cache(self.model) if self.caches else None
        with planned(cache, self.caches, self.ids, guided, self.positions.tolist(), self.steps):
            pred = cfg_denoise(
                self.model.predict, self.latents, t, self.cond, self.uncond, self.guidance, guided
            )
        self.latents, self.clean = ddim_update(self.table, pred, timesteps, self.latents)
        self.positions += 1

    def clean_of(self, ids: list[int]) -> torch.Tensor:
        """The last step's predicted clean latents of rows `ids`, (M, *shape), in their order."""
        return self.clean[[self.ids.index(row) for row in ids]]

    def steps_done(self) -> dict[int, int]:
        """Each row's steps done, by id."""
        return dict(zip(self.ids, self.positions.tolist(), strict=True))

    def finished(self) -> list[int]:
        """Ids of the rows that have done all their steps."""
        return [
            row for row, done in zip(self.ids, self.positions.tolist(), strict=True) if done >= self.steps
        ]

    def pop(self, ids: list[int]) -> torch.Tensor:
        """Remove rows and return their latents, (M, *shape), in the order of `ids`."""
        index = [self.ids.index(row) for row in ids]
        latents = self.latents[index]
        self.drop(ids)
        return latents

    def drop(self, ids: list[int]) -> None:
        """Remove rows (canceled, or popped)."""
        gone = set(ids)
        self.caches.drop(ids)
        keep = torch.tensor([row not in gone for row in self.ids], dtype=torch.bool)
        self.ids = [row for row in self.ids if row not in gone]
        self.positions = self.positions[keep]
        device_keep = keep.to(self.latents.device)
        self.latents = self.latents[device_keep]
        self.cond, self.uncond = select_rows(self.cond, keep), select_rows(self.uncond, keep)
        self.guidance = self.guidance[device_keep]


def _cat(old: Conditioning, new: Conditioning) -> Conditioning:
    return {key: torch.cat([old[key], value]) if key in old else value for key, value in new.items()}


def supports_continuous(model: LoadedModel) -> bool:
    """Whether the model's scheduler has a per-row step here (DDIM, deterministic)."""
    try:
        ddim_table(model.scheduler, 1)
    except UnsupportedScheduler:
        return False
    return True
