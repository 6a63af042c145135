"""Step-level continuous batching: rows at different denoising steps share one forward pass.

diffusers' schedulers step a whole batch with one scalar timestep, so a job could only join a batch
at its start. Here each row carries its own position in the schedule: the transformer gets one
timestep per row (the DiT families' timestep embeddings take a vector), and the scheduler update is
a row solver (worker/solvers): the project's own vectorised step of the model's scheduler (DDIM,
DPM-Solver++ or UniPC), written to match that scheduler's `step`, with each row's multistep history
(past data predictions, its last sample) kept beside its latents. A row's output depends only on its
own seed, condition and guidance, so it is the same whether it ran alone, in a static batch, or
joined this one mid-flight.
"""

from contextlib import nullcontext

import torch

from dit_serve.caching import CachePolicy
from dit_serve.loras import AppliedLora
from models.families.base import Conditioning, LoadedModel, RowCondition
from worker.lora import BASE, AdapterBank
from worker.sampling import cfg_denoise, guided_rows, initial_noise, select_rows
from worker.solvers.base import History, UnsupportedScheduler
from worker.solvers.registry import row_solver
from worker.step_cache import RowCaches, planned, step_cache


class RunningBatch:
    """Rows of one model, size and step count, each at its own step, advanced one step at a time.

    Rows join with `add` at any step boundary and leave with `pop` (finished) or `drop` (canceled);
    every row is known by the id `add` returned.
    """

    def __init__(
        self,
        model: LoadedModel,
        steps: int,
        width: int,
        height: int,
        frames: int = 1,
        bank: AdapterBank | None = None,
    ):
        """`bank`: where rows' LoRA adapters are loaded (worker/lora.py); None: rows take none."""
        self.model = model
        self.bank = bank
        self.adapter_names: list[str] = []  # (N,) each row's PEFT adapter
        self.steps = steps
        self.shape = model.latent_shape(width, height, frames)
        self.solver = row_solver(model.scheduler, steps)
        self.ids: list[int] = []
        self.positions = torch.zeros(0, dtype=torch.long)  # (N,) steps done per row
        self.latents = torch.zeros((0, *self.shape), device=model.device)  # (N, *shape) fp32
        self.cond: Conditioning = {}
        self.uncond: Conditioning = {}
        self.guidance = torch.zeros(0, device=model.device)  # (N,)
        self.clean = torch.zeros(0)  # (N, *shape) the last step's predicted clean latents, for previews
        self.history: History = {name: self.latents for name in self.solver.history_names}  # (N, *shape) each
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
        loras: list[tuple[AppliedLora, ...]] | None = None,
    ) -> list[int]:
        """New rows at step 0 (their noise drawn from their seeds, their step caching from `caches`, their
        LoRA adapters from `loras`); returns their ids."""
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        latents = initial_noise(generators, self.shape, self.model.device)
        cond, uncond = self.model.conditions(conditions)
        guidance = torch.tensor(guidance_scales, dtype=torch.float32, device=self.model.device)
        if loras and any(loras):
            if self.bank is None:
                raise ValueError("rows with LoRA adapters need the batch's AdapterBank")
            names = self.bank.names_for(loras, keep=set(self.adapter_names))
        else:
            names = [BASE] * len(seeds)
        ids = list(range(self._next_id, self._next_id + len(seeds)))
        self._next_id += len(seeds)
        self.caches.add(ids, caches or [None] * len(ids))
        self.ids += ids
        self.positions = torch.cat([self.positions, torch.zeros(len(ids), dtype=torch.long)])
        self.latents = torch.cat([self.latents, latents])
        # A row's history starts empty: zeros, which its first steps' coefficients never weigh.
        self.history = {
            name: torch.cat([past, torch.zeros_like(latents)]) for name, past in self.history.items()
        }
        self.cond = _cat(self.cond, cond)
        self.uncond = _cat(self.uncond, uncond)
        self.guidance = torch.cat([self.guidance, guidance])
        self.adapter_names += names
        return ids

    def step(self) -> None:
        """Advance every row by one denoising step."""
        t = self.solver.timesteps[self.positions].to(self.latents.device)  # (N,)
        guided = guided_rows(self.guidance)
        cache = step_cache(self.model) if self.caches else None
        names = self.adapter_names
        lora = self.bank.forward(names + [names[g] for g in guided.tolist()]) if self.bank else nullcontext()
        with planned(cache, self.caches, self.ids, guided, self.positions.tolist(), self.steps), lora:
            pred = cfg_denoise(
                self.model.predict, self.latents, t, self.cond, self.uncond, self.guidance, guided
            )
        self.latents, self.clean, self.history = self.solver.step(
            pred, self.positions, self.latents, self.history
        )
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
        self.adapter_names = [
            name for row, name in zip(self.ids, self.adapter_names, strict=True) if row not in gone
        ]
        self.ids = [row for row in self.ids if row not in gone]
        self.positions = self.positions[keep]
        device_keep = keep.to(self.latents.device)
        self.latents = self.latents[device_keep]
        self.history = {name: past[device_keep] for name, past in self.history.items()}
        self.cond, self.uncond = select_rows(self.cond, keep), select_rows(self.uncond, keep)
        self.guidance = self.guidance[device_keep]


def _cat(old: Conditioning, new: Conditioning) -> Conditioning:
    return {key: torch.cat([old[key], value]) if key in old else value for key, value in new.items()}


def supports_continuous(model: LoadedModel) -> bool:
    """Whether the model's scheduler has a per-row step here (DDIM, DPM-Solver++, UniPC; see
    worker/solvers for the options each supports)."""
    try:
        row_solver(model.scheduler, 1)
    except UnsupportedScheduler:
        return False
    return True
