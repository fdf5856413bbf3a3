"""What every pass is: a frozen, validated config and a ``rewrite(g)``. The whole contract is here and
in :mod:`fxcache.rewrite`; docs/concepts.md ("Writing a pass") walks through it.

A pass declares what it needs through ``g`` (a :class:`~fxcache.rewrite.PassBuilder`): state, caches,
counters, host flags with their ``decide(step)``, scalars with their ``value(step)``; and it replaces
regions of its ``scope`` with a policy function. A *static* decision (from the step alone) is a flag,
so the schedule is known before the first step; a *dynamic* one is computed in the graph.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar

import torch

from ..regions import Attention, ModelRegions, RegionError
from ..rewrite import PassBuilder

__all__ = ["AttentionKindsPass", "CachePass", "ConfigError", "Step", "attention_settings"]


class ConfigError(ValueError):
    """A pass config field has a value the pass cannot use; the message names the field."""


@dataclass(frozen=True)
class Step:
    """Where the denoising loop is when a call is made. ``index`` counts from the context's first
    call of this program in the generation; ``planned`` is True when ``plan()`` asks, ahead of time;
    ``sigma`` is the scheduler's noise level at this step (``cache_context(sigma=...)`` or the
    scheduler's ``sigmas``), when known."""

    index: int
    num_steps: int | None = None
    timestep: float | None = None
    context: str = "default"
    planned: bool = False
    sigma: float | None = None


class CachePass:
    """Base class of the passes. Subclasses are frozen dataclasses whose ``__post_init__`` validates
    (raising :class:`ConfigError` naming the field) and which implement :meth:`rewrite`.

    ``scope`` is the outermost kind of region the pass replaces: ``"modules"`` (attention or any
    module), ``"blocks"`` (block ranges), ``"model"`` (the whole call), or ``"forecast"`` (replaces
    nothing, forecasts what other passes reuse); regions inside it may be replaced too (FasterCache
    replaces attention, then the whole call). Passes rewrite innermost scope first; regions of
    different scopes nest, so passes on them compose. A config holds no runtime state: what a pass needs per
    program lives in the closures it hands to ``g.flag``/``g.scalar``.
    """

    scope: ClassVar[str] = "modules"
    # whether the pass reads ``Step.sigma``: only then does the runtime read the scheduler's sigmas,
    # once per generation (a device tensor's read is a host sync)
    reads_sigma: ClassVar[bool] = False

    def rewrite(self, g: PassBuilder) -> None:
        """Declare state, flags and scalars through ``g`` and replace regions (see the module doc)."""
        raise NotImplementedError

    @property
    def namespace(self) -> str:
        """Prefix of every name the pass declares: its class name in snake case."""
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", type(self).__name__).lower()

    def describe(self) -> str:
        values = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"{type(self).__name__}({values})"

    # -- validation helpers for subclasses ---------------------------------------------------------
    def _fail(self, field: str, message: str):
        raise ConfigError(f"{type(self).__name__}.{field} = {getattr(self, field)!r}: {message}")

    def _require_number(self, field: str, *, minimum: float | None = None, strict: bool = False):
        value = getattr(self, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self._fail(field, "must be a finite number")
        if minimum is not None and (value < minimum or (strict and value == minimum)):
            self._fail(field, f"must be {'>' if strict else '>='} {minimum}")

    def _require_integer(self, field: str, minimum: int):
        value = getattr(self, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self._fail(field, f"must be an integer >= {minimum}")

    def _require_choice(self, field: str, choices: tuple):
        if getattr(self, field) not in choices:
            self._fail(field, f"must be one of {choices}")

    def _require_timestep_range(self, field: str):
        """A ``(lo, hi)`` pair of numbers; stored as a tuple."""
        bounds = getattr(self, field)
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2 or any(
                isinstance(b, bool) or not isinstance(b, (int, float)) for b in bounds):
            self._fail(field, "must be a pair (lo, hi) of timesteps")
        object.__setattr__(self, field, tuple(bounds))

    def _require_patterns(self, field: str):
        """A sequence of regular expressions; stored as a tuple."""
        patterns = getattr(self, field)
        if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
            self._fail(field, "must be a sequence of regular expressions (strings)")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                self._fail(field, f"{pattern!r} is not a regular expression ({error})")
        object.__setattr__(self, field, tuple(patterns))


def attention_settings(config, attention: Attention, kinds: tuple[str, ...]) -> str | None:
    """Which ``<kind>_attention_*`` settings of ``config`` apply to ``attention``: the first of
    ``kinds`` whose skip range is set and one of whose identifiers matches the module path
    (``re.search``, as diffusers), or None. PAB and FasterCache share this selection."""
    for kind in kinds:
        identifiers = getattr(config, f"{kind}_attention_block_identifiers")
        if getattr(config, f"{kind}_attention_block_skip_range") is not None and \
                any(re.search(i, attention.name) for i in identifiers):
            return kind
    return None


class AttentionKindsPass(CachePass):
    """Shared by passes configured per attention kind (PAB, FasterCache): ``kind_of(attention)``
    picks the settings, one host flag per kind computes (True) or reuses its attention modules."""

    def kind_of(self, attention: Attention) -> str | None:
        raise NotImplementedError

    def targets(self, regions: ModelRegions, allow_none: bool = False) -> dict[str, list[Attention]]:
        """Attention regions by the kind of settings they use (kinds with none are left out); none at
        all is an error unless ``allow_none``."""
        by_kind: dict[str, list[Attention]] = {}
        for attention in regions.attentions:
            kind = self.kind_of(attention)
            if kind is not None:
                by_kind.setdefault(kind, []).append(attention)
        if not by_kind and not allow_none:
            found = ", ".join(f"{a.name} ({a.kind})" for a in regions.attentions) or "none"
            raise RegionError(f"{type(self).__name__}: no attention module matches the configured kinds "
                              f"and identifiers; attention found: {found}")
        return by_kind

    @staticmethod
    def flag_name(kind: str) -> str:
        return f"compute_{kind}_attention"

    def declare_flags(self, g: PassBuilder, kinds, computes) -> dict:
        """One host flag per attention kind, ``computes(kind, step)``."""
        return {kind: g.flag(self.flag_name(kind), decide=lambda step, kind=kind: computes(kind, step))
                for kind in kinds}

    def timestep_once(self) -> Callable[[Step], float]:
        """:meth:`timestep`, read once per call: every flag and scalar of a call is handed the same
        ``Step`` and asks for it, and a callback that returns a device tensor costs a sync per read.
        One reader per program (a config holds no runtime state)."""
        last: dict[str, Any] = {}

        def read(step: Step) -> float:
            if last.get("step") is not step:
                last["step"], last["value"] = step, self.timestep(step)
            return last["value"]

        return read

    def timestep(self, step: Step) -> float:
        """The call's timestep: ``current_timestep_callback()`` when set (diffusers' way), else the
        step's (a scheduler handed to ``transform``, or ``cache_context(timestep=...)``)."""
        callback = getattr(self, "current_timestep_callback", None)
        if callback is not None and not step.planned:  # a plan reads the timesteps it is given
            value = callback()
            return float(value.reshape(-1)[0]) if isinstance(value, torch.Tensor) else float(value)
        if step.timestep is None:
            raise ConfigError(
                f"{type(self).__name__} needs the current timestep: pass scheduler=pipe.scheduler to "
                "fxcache.transform, timestep=... to cache_context, or current_timestep_callback")
        return float(step.timestep)

