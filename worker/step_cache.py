"""Step caching decided per row: each output row of a batch reuses its own cached block residuals.

DiT blocks change little between neighbouring denoising steps, so a step may reuse the residual the
block stack added the last time it ran (dit_serve/caching.py names the policies). diffusers' cache hooks
(`diffusers.hooks.FirstBlockCache`, `MagCache`, ...) decide once for the whole batch, from a mean over
all its rows: in a batching server a row's output would then depend on which rows share its batch, and
a row that joined a continuous batch mid-flight would be decided by rows at other steps. Here every
output row decides for itself (its conditional and unconditional forward rows together, as the hook
decides for a pipeline call of one image), from its own state. The rows that run the blocks run them
as a smaller batch; the others take `anchor + residual`, so a row's output is the same alone, in a
static batch, or joined mid-flight, and skipped rows cost no block compute.

Mechanism: hooks on the family's blocks (diffusers' HookRegistry), in call order, plus its exit (the
module whose output is the block stack's result: the last block, or a marker after it). The blocks stay
untouched between batches: with no plan set, every hook calls the block as it is.

Forward rows: `cfg_denoise` runs [every row's conditional input; the guided rows' unconditional input].
A block may see each forward row as several leading rows (a video DiT's spatial blocks see one per
frame), contiguous per forward row; tensors whose leading size is a multiple of the forward rows are
sliced that way, the rest are passed as they are.
"""

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from dit_serve.caching import CachePolicy, CachePolicyName
from models.families.base import LoadedModel

HOOK_NAME = "dit_serve_row_cache"
CONDITIONAL, UNCONDITIONAL = 0, 1
Key = tuple[int, int]  # (output row id, branch)


@dataclass
class RowState:
    """One output row's caching state across steps."""

    policy: CachePolicy
    skipped_in_a_row: int = 0
    computed: int = 0
    skipped: int = 0


@dataclass
class RowCaches:
    """The cache state of one batch's rows: residuals per forward row, decisions per output row."""

    rows: dict[int, RowState] = field(default_factory=dict)
    head_residual: dict[Key, torch.Tensor] = field(default_factory=dict)  # first_block's last head residual
    residual: dict[Key, torch.Tensor] = field(default_factory=dict)  # what the stack added last time
    ran_at: dict[Key, int] = field(default_factory=dict)  # the step it ran at
    earlier: dict[Key, tuple[torch.Tensor, int]] = field(default_factory=dict)  # the run before that

    def add(self, row_ids: Sequence[int], policies: Sequence[CachePolicy | None]) -> None:
        for row_id, policy in zip(row_ids, policies, strict=True):
            if policy is not None:
                self.rows[row_id] = RowState(policy)

    def drop(self, row_ids: Sequence[int]) -> None:
        for row_id in row_ids:
            self.rows.pop(row_id, None)
            for branch in (CONDITIONAL, UNCONDITIONAL):
                for store in (self.head_residual, self.residual, self.ran_at, self.earlier):
                    store.pop((row_id, branch), None)

    def remember(self, key: Key, residual: torch.Tensor, position: int) -> None:
        """The residual the stack added at step `position` (it ran)."""
        if key in self.residual:
            self.earlier[key] = (self.residual[key], self.ran_at[key])
        self.residual[key], self.ran_at[key] = residual, position

    def residual_at(self, key: Key, position: int, order: int) -> torch.Tensor:
        """The residual a skipped step takes: the last one (order 0), or extrapolated along the line
        through the last two runs (order 1, TaylorSeer's first order, arXiv 2503.06923)."""
        last, ran_at = self.residual[key], self.ran_at[key]
        if order == 0 or key not in self.earlier:
            return last
        before, ran_before = self.earlier[key]
        return last + (last - before) * ((position - ran_at) / (ran_at - ran_before))

    def step_counts(self, row_ids: Iterable[int] | None = None) -> tuple[int, int]:
        """(steps computed, steps skipped) of these rows, summed (all cached rows when None)."""
        states = [self.rows[row] for row in (self.rows if row_ids is None else row_ids) if row in self.rows]
        return sum(state.computed for state in states), sum(state.skipped for state in states)

    def skipped_fraction(self, row_ids: Sequence[int] | None = None) -> float:
        """Skipped steps over all steps of these rows (all cached rows when None)."""
        computed, skipped = self.step_counts(row_ids)
        return skipped / (computed + skipped) if computed + skipped else 0.0

    def __bool__(self) -> bool:
        return bool(self.rows)

    @classmethod
    def of(cls, policies: Sequence[CachePolicy | None]) -> "RowCaches":
        """Rows 0..N-1 with these policies (None: no caching)."""
        caches = cls()
        caches.add(range(len(policies)), policies)
        return caches


@dataclass
class ForwardPlan:
    """One forward pass: which output row and branch each forward row is, and what each row does."""

    caches: RowCaches
    keys: list[Key]
    positions: dict[int, int]  # output row id -> steps it has done before this one
    total_steps: int
    run_head: torch.Tensor  # (B,) bool: forward rows that run the first block
    compute: torch.Tensor | None = None  # (B,) bool: forward rows that run the rest (set by the head)
    stack_in: torch.Tensor | None = None
    head_out: torch.Tensor | None = None


def _warming_up(policy: CachePolicy, position: int, total: int) -> bool:
    return position < round(policy.warmup * total)


def _interval_runs(policy: CachePolicy, position: int, total: int) -> bool:
    assert policy.interval is not None
    return (position - round(policy.warmup * total)) % policy.interval == 0


def _decided_before(plan: ForwardPlan, row: int) -> bool | None:
    """Whether the row runs the block stack, as far as is known before the forward pass: True for rows
    without caching, without a residual yet, or warming up; the `interval` schedule's answer; None for
    `first_block`, which decides after its first block."""
    state = plan.caches.rows.get(row)
    if state is None or (row, CONDITIONAL) not in plan.caches.residual:
        return True
    position = plan.positions[row]
    if _warming_up(state.policy, position, plan.total_steps):
        return True
    if state.policy.policy is CachePolicyName.INTERVAL:
        return _interval_runs(state.policy, position, plan.total_steps)
    return None


def relative_change(now: torch.Tensor, before: torch.Tensor) -> float:
    """First Block Cache's measure: mean |now - before| over mean |before| (as diffusers computes it)."""
    return float((now - before).abs().mean() / before.abs().mean())


class StepCache:
    """Per-row step caching over one model's block stack: hooks installed once, idle between batches."""

    def __init__(self, blocks: Sequence[nn.Module], exit: nn.Module):
        if len(blocks) < 2:
            raise ValueError("step caching needs at least two transformer blocks")
        self.plan: ForwardPlan | None = None
        for index, block in enumerate(blocks):
            role = "head" if index == 0 else "middle"
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_RowHook(self, role), HOOK_NAME)
        if exit is not blocks[-1]:
            HookRegistry.check_if_exists_or_initialize(exit).register_hook(_RowHook(self, "exit"), HOOK_NAME)
        else:
            last = HookRegistry.check_if_exists_or_initialize(exit).get_hook(HOOK_NAME)
            assert isinstance(last, _RowHook)
            last.role = "exit"

    @contextmanager
    def forward(
        self,
        caches: RowCaches,
        row_ids: Sequence[int],
        guided: torch.Tensor,
        positions: Sequence[int],
        total: int,
    ) -> Iterator[None]:
        """Plan the next forward pass (rows `row_ids`, then the unconditional rows of `guided`)."""
        if not caches:
            yield
            return
        keys = [(row, CONDITIONAL) for row in row_ids]
        keys += [(row_ids[g], UNCONDITIONAL) for g in guided.tolist()]
        plan = ForwardPlan(caches, keys, dict(zip(row_ids, positions, strict=True)), total, torch.ones(0))
        plan.run_head = torch.tensor([_decided_before(plan, row) is not False for row, _ in keys])
        self.plan = plan
        try:
            yield
        finally:
            self.plan = None

    # -- the hooks' work -----------------------------------------------------------------------------
    def head(self, run: Any, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        plan = self.plan
        assert plan is not None
        plan.stack_in = hidden
        out = _run_rows(run, plan.run_head, hidden, args, kwargs)
        plan.head_out = out
        plan.compute = self._decide(plan, hidden, out)
        return out

    def _decide(self, plan: ForwardPlan, stack_in: torch.Tensor, head_out: torch.Tensor) -> torch.Tensor:
        """Which forward rows run the rest of the stack; counts each output row's decision."""
        b = len(plan.keys)
        compute = torch.ones(b, dtype=torch.bool)
        by_row: dict[int, list[int]] = {}
        for index, (row, _) in enumerate(plan.keys):
            by_row.setdefault(row, []).append(index)
        for row, indices in by_row.items():
            state = plan.caches.rows.get(row)
            if state is None:
                continue
            runs = _decided_before(plan, row)
            if runs is None:  # first_block: measured on the first block's residual
                residual = _rows(head_out, indices, b) - _rows(stack_in, indices, b)
                before = torch.cat([plan.caches.head_residual[plan.keys[i]] for i in indices])
                assert state.policy.threshold is not None and state.policy.max_skip is not None
                runs = (
                    relative_change(residual, before) > state.policy.threshold
                    or state.skipped_in_a_row >= state.policy.max_skip
                )
            if runs:
                state.computed += 1
                state.skipped_in_a_row = 0
                if state.policy.policy is CachePolicyName.FIRST_BLOCK:
                    for i in indices:
                        plan.caches.head_residual[plan.keys[i]] = _rows(head_out, [i], b) - _rows(
                            stack_in, [i], b
                        )
            else:
                state.skipped += 1
                state.skipped_in_a_row += 1
                compute[indices] = False
        return compute

    def middle(self, run: Any, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        plan = self.plan
        assert plan is not None and plan.compute is not None
        return _run_rows(run, plan.compute, hidden, args, kwargs)

    def exit(self, run: Any, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        plan = self.plan
        assert plan is not None and plan.compute is not None
        out = _run_rows(run, plan.compute, hidden, args, kwargs)
        b = len(plan.keys)
        skipped = []
        for index, key in enumerate(plan.keys):
            state = plan.caches.rows.get(key[0])
            if state is None:
                continue
            anchor = plan.head_out if state.policy.policy is CachePolicyName.FIRST_BLOCK else plan.stack_in
            assert anchor is not None
            if plan.compute[index]:
                plan.caches.remember(
                    key, _rows(out, [index], b) - _rows(anchor, [index], b), plan.positions[key[0]]
                )
            else:
                residual = plan.caches.residual_at(key, plan.positions[key[0]], state.policy.order)
                skipped.append((index, _rows(anchor, [index], b) + residual))
        if skipped:
            out = out.clone()
            view = out.view(b, -1, *out.shape[1:])
            for index, value in skipped:
                view[index] = value
        return out


class _RowHook(ModelHook):
    """Routes a block's call to its StepCache when a forward pass is planned."""

    def __init__(self, cache: StepCache, role: str):
        super().__init__()
        self.cache = cache
        self.role = role

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        run = self.fn_ref.original_forward
        if self.cache.plan is None:
            return run(*args, **kwargs)
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        return getattr(self.cache, self.role)(run, hidden, rest, kwargs)


def _rows(tensor: torch.Tensor, rows: Sequence[int] | torch.Tensor, b: int) -> torch.Tensor:
    """The leading rows of forward rows `rows`, when `tensor` holds b forward rows of m leading rows each."""
    view = tensor.view(b, -1, *tensor.shape[1:])  # (b, m, ...)
    index = torch.as_tensor(rows, dtype=torch.long, device=tensor.device)
    return view[index].reshape(-1, *tensor.shape[1:])  # (len(rows) * m, ...)


def _slice(value: Any, rows: torch.Tensor, b: int) -> Any:
    if isinstance(value, torch.Tensor):
        batched = value.dim() > 0 and value.shape[0] >= b and value.shape[0] % b == 0
        return _rows(value, rows, b) if batched else value
    if isinstance(value, (tuple, list)):
        return type(value)(_slice(item, rows, b) for item in value)
    if isinstance(value, dict):
        return {key: _slice(item, rows, b) for key, item in value.items()}
    return value


def _run_rows(run: Any, mask: torch.Tensor, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """The block on the forward rows in `mask`; the others pass through unchanged."""
    b = mask.numel()
    if bool(mask.all()):
        return run(hidden, *args, **kwargs)
    if not bool(mask.any()):
        return hidden  # blocks never write into their input, so the input itself passes through
    out = hidden.clone()
    rows = mask.nonzero().squeeze(1)
    part = run(_rows(hidden, rows, b), *_slice(args, rows, b), **_slice(kwargs, rows, b))
    out.view(b, -1, *out.shape[1:])[rows.to(out.device)] = part.view(len(rows), -1, *part.shape[1:])
    return out


@contextmanager
def planned(
    cache: StepCache | None,
    caches: RowCaches | None,
    row_ids: Sequence[int],
    guided: torch.Tensor,
    positions: Sequence[int],
    total: int,
) -> Iterator[None]:
    """StepCache.forward when the batch caches anything; else nothing (the blocks run as they are)."""
    if cache is None or not caches:
        yield
        return
    with cache.forward(caches, row_ids, guided, positions, total):
        yield


_caches: "WeakKeyDictionary[LoadedModel, StepCache | None]" = WeakKeyDictionary()


def step_cache(model: LoadedModel) -> StepCache | None:
    """The model's StepCache (its hooks installed on first use); None when its family has no block stack."""
    if model not in _caches:
        stack = model.cache_blocks()
        _caches[model] = None if stack is None else StepCache(*stack)
    return _caches[model]
