"""Step caching policies: what a request may ask for, and how a server names a model's default.

A policy decides, per output row and per denoising step, whether the transformer's blocks run or the
row reuses the residual they added the last time they ran (worker/step_cache.py). Policies:

- `first_block`: ParaAttention's First Block Cache (the idea of TeaCache, arXiv 2411.19108): the first
  block always runs; when its residual changed less than `threshold` (relative mean absolute change)
  since the last step that ran the rest, the rest is skipped. Adaptive: it skips where the model is
  settled.
- `interval`: a fixed schedule in the spirit of Δ-DiT (arXiv 2406.01125) and DeepCache: the whole block
  stack runs every `interval`-th step and is skipped in between.

Both always run the first `warmup` fraction of the steps (the layout of the image is decided there), and
`first_block` skips at most `max_skip` steps in a row. A skipped step takes the last residual (`order`
0) or, by default, extrapolates it along the line through the last two steps that ran (`order` 1:
TaylorSeer's first order, arXiv 2503.06923), which on the bundled image model keeps 4–6 dB more PSNR
to the uncached output at the same skipped steps.

A request's `cache` is a policy name, `"auto"` (the model's measured default, `ModelSpec.cache_auto`),
`"none"`, or an object with the knobs. The API resolves it to a `CachePolicy` (or None for no caching)
before the job is queued, so the job shows what it ran with.
"""

from enum import StrEnum
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

AUTO = "auto"
DEFAULT_THRESHOLD = 0.1
DEFAULT_INTERVAL = 2
DEFAULT_WARMUP = 0.2
DEFAULT_MAX_SKIP = 2
DEFAULT_ORDER = 1
MAX_INTERVAL = 10


class CachePolicyName(StrEnum):
    NONE = "none"
    FIRST_BLOCK = "first_block"
    INTERVAL = "interval"


KNOBS = {  # the knobs each policy takes besides `warmup`
    CachePolicyName.FIRST_BLOCK: ("threshold", "max_skip"),
    CachePolicyName.INTERVAL: ("interval",),
}


class CachePolicy(BaseModel):
    """A step-caching policy with its knobs; a knob left out takes its default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: CachePolicyName = Field(description="first_block (adaptive) or interval (fixed schedule)")
    threshold: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=f"first_block: skip when the first block's residual changed less than this "
        f"(relative); higher skips more (default {DEFAULT_THRESHOLD})",
    )
    max_skip: int | None = Field(
        default=None,
        ge=1,
        le=MAX_INTERVAL,
        description=f"first_block: most steps skipped in a row ({DEFAULT_MAX_SKIP})",
    )
    interval: int | None = Field(
        default=None,
        ge=2,
        le=MAX_INTERVAL,
        description=f"interval: the blocks run every this many steps (default {DEFAULT_INTERVAL})",
    )
    order: int = Field(
        default=DEFAULT_ORDER,
        ge=0,
        le=1,
        description="a skipped step reuses the last residual (0) or extrapolates the last two (1)",
    )
    warmup: float = Field(
        default=DEFAULT_WARMUP,
        ge=0,
        le=1,
        description="the first fraction of the steps always runs the blocks",
    )

    @model_validator(mode="after")
    def _knobs_of_the_policy(self) -> Self:
        if self.policy is CachePolicyName.NONE:
            raise ValueError('policy "none" takes no knobs: send cache: "none"')
        foreign = [
            knob
            for knob in ("threshold", "max_skip", "interval")
            if getattr(self, knob) is not None and knob not in KNOBS[self.policy]
        ]
        if foreign:
            raise ValueError(f"{self.policy.value} takes no {', '.join(foreign)}")
        defaults = {
            "threshold": DEFAULT_THRESHOLD,
            "max_skip": DEFAULT_MAX_SKIP,
            "interval": DEFAULT_INTERVAL,
        }
        for knob in KNOBS[self.policy]:
            if getattr(self, knob) is None:
                object.__setattr__(self, knob, defaults[knob])
        return self

    def label(self) -> str:
        """The policy and its knobs, as `parse_policy` reads them: "first_block,threshold=0.1,..."."""
        knobs = [f"{knob}={getattr(self, knob):g}" for knob in (*KNOBS[self.policy], "order", "warmup")]
        return ",".join([self.policy.value, *knobs])


# What a request's `cache` may be: a policy name, "auto", "none", or a policy object.
CacheChoice = str | CachePolicy


def parse_policy(text: str) -> CachePolicy | str:
    """`none`, `auto`, a policy name, or `name,knob=value,...` (the `--cache MODEL=POLICY` syntax)."""
    name, *knobs = [part.strip() for part in text.split(",")]
    if name in (AUTO, CachePolicyName.NONE.value) and not knobs:
        return name
    values: dict[str, object] = {"policy": name}
    for knob in knobs:
        key, sep, value = knob.partition("=")
        if not sep:
            raise ValueError(f"cache policy {text!r}: knobs are written knob=value, got {knob!r}")
        values[key.strip()] = value.strip()
    return CachePolicy.model_validate(values)


def resolve(
    choice: CacheChoice | None, auto: CachePolicy | None, default: CacheChoice | None
) -> CachePolicy | None:
    """The policy a job runs with: the request's choice, else the server's default for the model.

    `auto` is the model's measured default (None when it has none, which means no caching).
    Raises ValueError for an unknown name.
    """
    choice = default if choice is None else choice
    if choice is None or choice == CachePolicyName.NONE.value:
        return None
    if choice == AUTO:
        return auto
    if isinstance(choice, str):
        return CachePolicy.model_validate({"policy": choice}) if choice in _POLICY_NAMES else _unknown(choice)
    return choice


_POLICY_NAMES = {name.value for name in CachePolicyName} - {CachePolicyName.NONE.value}


def _unknown(name: str) -> CachePolicy:
    names = ", ".join(sorted({AUTO, CachePolicyName.NONE.value, *_POLICY_NAMES}))
    raise ValueError(f"unknown cache policy {name!r}; choose one of {names}, or an object with knobs")
