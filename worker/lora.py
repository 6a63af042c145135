"""LoRA adapters in a worker: loaded into a model's transformer with PEFT, mixed per row in one batch.

Each adapter a job names (dit_serve/loras.py) is loaded on first use from the shared storage into the
model's transformer as a PEFT LoRA adapter, beside the others (`AdapterBank`). A row runs with one
PEFT adapter: the job's single adapter at scale 1 is that adapter itself; several adapters, or another
scale, are one combined adapter made by PEFT's `add_weighted_adapter` with `cat`, whose delta is
exactly the weighted sum of theirs. Rows without adapters run `__base__`.

One forward pass carries rows with different adapters through PEFT's mixed-adapter batch inference:
every LoRA layer gets `adapter_names`, one per input row, and applies each adapter to its own rows
only. The forward rows are cfg_denoise's (each output row's conditional input, then the guided rows'
unconditional input), so a request's CFG rows use its adapters. A layer may see each forward row as
several leading rows (a video DiT's spatial blocks see one per frame), contiguous per forward row; the
names are repeated to match, as worker/step_cache.py slices its tensors.

Memory is bounded: adapters (and combinations) are kept in least-recently-used order and deleted past
`memory_bytes`, never those the batch being set up needs.
"""

import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from dit_serve.lora_registry import publish_targets, registered, store_and_register
from dit_serve.loras import KEY_PREFIXES, LORA_KEY, AppliedLora, LoraError, check_fits, read_adapter
from dit_serve.storage import Storage
from worker.acceleration import eager_module

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
DEFAULT_MEMORY_BYTES = 1024 * 1024 * 1024


class LoraUnavailable(RuntimeError):
    """A job's adapter could not be loaded: gone from storage, damaged, or not fitting the model."""


def adaptable_layers(transformer: nn.Module) -> dict[str, tuple[int, int]]:
    """The transformer's linear layers an adapter may target: module path -> (in, out) features."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in eager_module(transformer).named_modules()
        if isinstance(module, nn.Linear) and name
    }


def _peft_name(lora: AppliedLora) -> str:
    # PEFT adapter names are ModuleDict keys: no dots. The digest keeps a re-registered name apart.
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', lora.name)}-{lora.digest[:12]}"


@dataclass(frozen=True)
class _Kept:
    bytes: int
    parts: tuple[str, ...] = ()  # a combination: the adapters it was made of


class AdapterBank:
    """The LoRA adapters loaded into one model's transformer, in least-recently-used order."""

    def __init__(self, transformer: nn.Module, storage: Storage, memory_bytes: int = DEFAULT_MEMORY_BYTES):
        self.transformer = transformer
        self.storage = storage
        self.memory_bytes = memory_bytes
        self.tuner: Any = None  # peft's LoraModel over the transformer, once an adapter is loaded
        self.kept: OrderedDict[str, _Kept] = OrderedDict()

    # -- which adapter each row runs ------------------------------------------------------------------
    def names_for(self, rows: Sequence[Sequence[AppliedLora]], keep: set[str] | None = None) -> list[str]:
        """One PEFT adapter name per row, loading and combining what the rows need; `keep`: adapters
        other rows still run (a continuous batch's), never evicted now."""
        wanted = {tuple(loras) for loras in rows}
        names = {loras: self._adapter_for(loras) for loras in wanted}
        needed = set(names.values()) | (keep or set())
        self._evict(keep=needed | {part for name in needed for part in self._parts(name)})
        return [names[tuple(loras)] for loras in rows]

    def _adapter_for(self, loras: tuple[AppliedLora, ...]) -> str:
        active = tuple(lora for lora in loras if lora.scale != 0)
        if not active:
            return BASE
        parts = [self._load(lora) for lora in active]
        if len(active) == 1 and active[0].scale == 1:
            return parts[0]
        recipe = repr([(part, lora.scale) for part, lora in zip(parts, active, strict=True)])
        name = "combo-" + hashlib.sha256(recipe.encode()).hexdigest()[:16]
        if name not in self.kept:
            assert self.tuner is not None
            self.tuner.add_weighted_adapter(
                adapters=parts,
                weights=[lora.scale for lora in active],
                adapter_name=name,
                combination_type="cat",
            )
            self.kept[name] = _Kept(self._size(name), tuple(parts))
            self._deactivate()
        self.kept.move_to_end(name)
        return name

    def unloadable(self, loras: Iterable[AppliedLora]) -> dict[AppliedLora, LoraUnavailable]:
        """Of these adapters, those that cannot be loaded, with why; the others are loaded now."""
        failed = {}
        for lora in set(loras):
            try:
                self._load(lora)
            except LoraUnavailable as exc:
                failed[lora] = exc
        return failed

    def _parts(self, name: str) -> tuple[str, ...]:
        return self.kept[name].parts if name in self.kept else ()

    # -- loading and eviction ---------------------------------------------------------------------------
    def _load(self, lora: AppliedLora) -> str:
        name = _peft_name(lora)
        if name in self.kept:
            self.kept.move_to_end(name)
            return name
        try:
            data = self.storage.get(lora.key)
        except Exception as exc:
            raise LoraUnavailable(f"adapter {lora.name}: cannot read its weights ({exc})") from exc
        if hashlib.sha256(data).hexdigest() != lora.digest:
            raise LoraUnavailable(f"adapter {lora.name}: its stored weights do not match their digest")
        weights = {}
        for key, tensor in load_safetensors(data).items():
            prefix = next(p for p in KEY_PREFIXES if key.startswith(p))
            match = LORA_KEY.match(key[len(prefix) :])
            assert match is not None  # checked when it was registered
            weights[(match["module"], match["part"])] = tensor
        ranks = {module: tensor.shape[0] for (module, part), tensor in weights.items() if part == "A"}
        rank = max(ranks.values())
        from peft import LoraConfig, LoraModel  # imported on first use: a worker without adapters skips it

        config = LoraConfig(
            r=rank,
            lora_alpha=lora.alpha,  # type: ignore[arg-type]  # annotated int; a float scales alike
            use_rslora=lora.rslora,
            target_modules=sorted(ranks),
            rank_pattern={re.escape(module): r for module, r in ranks.items() if r != rank},
            lora_dropout=0.0,
            init_lora_weights=False,
        )
        try:
            if self.tuner is None:
                self.tuner = LoraModel(self.transformer, config, name)
            else:
                self.tuner.peft_config[name] = config
                self.tuner.inject_adapter(self.transformer, name)
            with torch.no_grad():
                for (module, part), tensor in weights.items():
                    layer: Any = self.transformer.get_submodule(module)
                    target = (layer.lora_A if part == "A" else layer.lora_B)[name].weight
                    target.copy_(tensor.to(target.dtype))
        except Exception as exc:
            self._delete(name)
            raise LoraUnavailable(f"adapter {lora.name} does not fit model's transformer: {exc}") from exc
        self._deactivate()
        self.kept[name] = _Kept(self._size(name))
        log.info(
            "loaded adapter %s (%d layers, rank %d, %.1f MB)",
            lora.name,
            len(ranks),
            rank,
            self.kept[name].bytes / 1e6,
        )
        return name

    def _size(self, name: str) -> int:
        return sum(
            parameter.numel() * parameter.element_size()
            for module in self._layers()
            for store in (module.lora_A, module.lora_B)
            if name in store
            for parameter in store[name].parameters()
        )

    def _evict(self, keep: set[str]) -> None:
        """Delete least recently used adapters (a combination before its parts) past the memory cap."""
        while sum(kept.bytes for kept in self.kept.values()) > self.memory_bytes:
            victim = next((name for name in self.kept if name not in keep), None)
            if victim is None:
                return  # everything left is needed now
            for name in [n for n, kept in self.kept.items() if victim in kept.parts]:
                self._delete(name)
            self._delete(victim)

    def _delete(self, name: str) -> None:
        self.kept.pop(name, None)
        if self.tuner is not None and name in self.tuner.peft_config:
            self.tuner.delete_adapter(name)
            log.info("unloaded adapter %s", name)
        self._deactivate()

    def _deactivate(self) -> None:
        """No adapter is active outside a mixed batch: a forward without adapter names is the base model."""
        for module in self._layers():
            module.set_adapter([])

    def _layers(self) -> Iterator[Any]:
        """The transformer's PEFT LoRA layers (none before the first adapter)."""
        if self.tuner is None:
            return iter(())
        from peft.tuners.lora import LoraLayer

        return (module for module in self.transformer.modules() if isinstance(module, LoraLayer))

    # -- one forward pass -------------------------------------------------------------------------------
    @contextmanager
    def forward(self, names: Sequence[str]) -> Iterator[None]:
        """Run the block with forward row k on adapter names[k] (see the module docstring)."""
        if all(name == BASE for name in names):
            yield  # no LoRA row: the layers' own base path, no sub-batching
            return
        rows = list(names)

        def with_names(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[Any, dict[str, Any]]:
            leading = args[0].shape[0] if args else next(iter(kwargs.values())).shape[0]
            if leading % len(rows):
                raise RuntimeError(
                    f"a LoRA layer saw {leading} rows, not a multiple of the {len(rows)} forward rows"
                )
            repeat = leading // len(rows)
            kwargs["adapter_names"] = [name for name in rows for _ in range(repeat)]
            return args, kwargs

        handles = [
            module.register_forward_pre_hook(with_names, with_kwargs=True) for module in self._layers()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class RowAdapters:
    """The adapter each input row of a batch runs (PEFT names from its model's bank)."""

    bank: AdapterBank
    names: list[str]

    def forward(self, rows: Sequence[int], guided: torch.Tensor) -> AbstractContextManager[None]:
        """The context of one cfg_denoise call over live input rows `rows` ([rows; rows[guided]])."""
        live = [self.names[row] for row in rows]
        return self.bank.forward(live + [live[g] for g in guided.tolist()])

    def __bool__(self) -> bool:
        return any(name != BASE for name in self.names)


def row_adapters(bank: AdapterBank | None, rows: Sequence[Sequence[AppliedLora]]) -> RowAdapters | None:
    """The rows' adapters, loaded into `bank`; None when no row has one."""
    if bank is None or not any(rows):
        return None
    return RowAdapters(bank, bank.names_for(rows))


def adapters_context(
    adapters: RowAdapters | None, rows: Sequence[int], guided: torch.Tensor
) -> AbstractContextManager[None]:
    return adapters.forward(rows, guided) if adapters else nullcontext()


_banks: "WeakKeyDictionary[nn.Module, AdapterBank]" = WeakKeyDictionary()


def adapter_bank(
    transformer: nn.Module, storage: Storage, memory_bytes: int = DEFAULT_MEMORY_BYTES
) -> AdapterBank:
    """The bank of a model's transformer (made on first use; one per transformer; a compiled one's
    adapters go into the transformer it wraps)."""
    transformer = eager_module(transformer)
    if transformer not in _banks:
        _banks[transformer] = AdapterBank(transformer, storage, memory_bytes)
    return _banks[transformer]


def register_at_start(
    redis: Any, storage: Storage, model: str, transformer: nn.Module, name: str, source: Path
) -> None:
    """A worker's `--lora MODEL:NAME=SOURCE`: check the adapter fits, store its weights, register it.
    An adapter of that name with the same weights is left as it is; with other weights it is replaced
    (the operator's flag wins over an earlier registration)."""
    try:
        adapter = read_adapter(source)
        check_fits(adapter, adaptable_layers(transformer), model)
    except LoraError as exc:
        raise SystemExit(f"--lora {model}:{name}={source}: {exc}") from None
    existing = registered(redis, model).get(name)
    if existing is not None and existing.digest == adapter.digest:
        return
    store_and_register(redis, storage, model, name, adapter, str(source))
    log.info("registered adapter %s of %s from %s", name, model, source)


def publish_layers(redis: Any, model: str, transformer: nn.Module) -> None:
    """Publish the model's adaptable layers, against which the API checks adapters it registers."""
    publish_targets(redis, model, adaptable_layers(transformer))
