"""Schedules of static passes: which region computes at which step, per cache context, and the
fraction of FLOPs a generation is predicted to execute, as a formula in the token count.

A pass that decides from the step alone declares host flags (``g.flag(name, decide=...)``); the
builder records which module paths each flag gates, so the whole schedule is known before the first
step. The cost of
each region comes from the graph, not from a fit: the model is captured once more by dynamo with the
token dimension of its ``hidden_states`` marked dynamic, the graph is run on fake tensors whose sizes
are symbols, under ``torch.utils.flop_counter``, and every node's FLOPs (a sympy expression in the
token count) are added to the region whose module path is on its module stack. Where the model bakes
its size into the graph (e.g. learned positional embeddings), the formula is the constant at the
captured size and the schedule says so.

Example::

    schedule = cached.plan(28, timesteps=pipe.scheduler.timesteps)
    print(schedule)                       # steps x regions, C = compute, . = reuse
    schedule.fraction(tokens=4096)        # predicted FLOPs executed / FLOPs of the full run
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import sympy
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .capture import capture_dynamic, normalize_module_path
from .flops import flop_counter
from .passes.base import ConfigError, Step

__all__ = ["RegionCost", "Schedule", "build_schedule", "flop_counter", "symbolic_costs"]

TOKENS = sympy.Symbol("tokens", positive=True, integer=True)


@dataclass
class RegionCost:
    """FLOPs of one call: per gated region and in total, sympy expressions in :data:`TOKENS`."""

    regions: dict[str, sympy.Expr]
    total: sympy.Expr
    tokens: int  # the token count the model was captured at
    symbolic: bool  # False where the graph fixed the size (the formulas are constants)

    def at(self, expr: sympy.Expr, tokens: int | None = None) -> int:
        return int(expr.subs(TOKENS, self.tokens if tokens is None else tokens))


@dataclass
class Schedule:
    """Which region computes at which step, per cache context, and what it costs.

    ``computes[context][step][region]`` is True where the region computes. ``costs`` is None when
    the model has not been called yet (no graph to read FLOPs from).
    """

    num_steps: int
    timesteps: list[float] | None
    contexts: tuple[str, ...]
    regions: list[str]
    computes: dict[str, list[dict[str, bool]]]
    costs: RegionCost | None = None
    notes: list[str] = field(default_factory=list)

    def executed_flops(self, context: str | None = None) -> sympy.Expr:
        """FLOPs of one generation in ``context`` as executed under the schedule (sympy, in tokens)."""
        if self.costs is None:
            raise RuntimeError("no FLOPs yet: call the model once before planning costs")
        steps = self.computes[context or self.contexts[0]]
        executed = sympy.Integer(0)
        for decisions in steps:
            skipped = sum((self.costs.regions[r] for r, c in decisions.items() if not c), sympy.Integer(0))
            executed += self.costs.total - skipped
        return sympy.expand(executed)

    def fraction_formula(self, context: str | None = None) -> sympy.Expr:
        """Executed / full-run FLOPs as a sympy expression in :data:`TOKENS`."""
        return sympy.simplify(self.executed_flops(context) / (self.num_steps * self.costs.total))

    def fraction(self, tokens: int | None = None, context: str | None = None) -> float:
        """Predicted fraction of the full run's FLOPs executed, at ``tokens`` (default: as captured).

        Example::

            cached.plan(28).fraction(tokens=4096)
        """
        value = self.fraction_formula(context).subs(TOKENS, self.costs.tokens if tokens is None else tokens)
        return float(value)

    def computed_steps(self, region: str, context: str | None = None) -> list[int]:
        return [i for i, d in enumerate(self.computes[context or self.contexts[0]]) if d.get(region, True)]

    def __str__(self) -> str:
        lines = [f"schedule: {self.num_steps} steps, contexts {', '.join(self.contexts)} "
                 "(C = computes, . = reused/predicted)"]
        width = max((len(r) for r in self.regions), default=0)
        same = all(self.computes[c] == self.computes[self.contexts[0]] for c in self.contexts)
        for context in (self.contexts[:1] if same else self.contexts):
            if not same:
                lines.append(f" context {context}:")
            for region in self.regions:
                row = "".join("C" if d[region] else "." for d in self.computes[context])
                lines.append(f"  {region:<{width}}  {row}")
        if same and len(self.contexts) > 1:
            lines.append("  (every context follows the same schedule, with its own state)")
        if self.costs is not None:
            fraction = self.fraction_formula()
            lines.append(f"  FLOPs per call: {sympy.sstr(sympy.expand(self.costs.total))}"
                         f"  (tokens = {self.costs.tokens} as captured)")
            lines.append(f"  predicted fraction of FLOPs executed: {float(fraction.subs(TOKENS, self.costs.tokens)):.3f}"
                         + (f"; as a function of tokens: {sympy.sstr(fraction)}" if self.costs.symbolic else
                            " (the graph fixes the size: no formula in tokens)"))
            if self.costs.symbolic:
                more = ", ".join(f"{n}: {self.fraction(tokens=n):.3f}" for n in (1024, 4096, 16384))
                lines.append(f"  at other token counts: {more}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def build_schedule(program, num_steps: int, timesteps: Sequence[float] | None = None,
                   contexts: Sequence[str] = ("default",), costs: RegionCost | None = None) -> Schedule:
    """The schedule of a rewritten program's host flags over ``num_steps`` steps (``timesteps``
    where a flag needs them), for each context: each flag's ``decide(step)`` says whether the module
    paths it gates compute.

    Example::

        build_schedule(cached.programs()[-1], 28)
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if timesteps is not None:
        timesteps = [float(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
        if len(timesteps) != num_steps:
            raise ValueError(f"{len(timesteps)} timesteps were given for {num_steps} steps")
    notes = [f"{rewrite.name} decides in the graph at every call: no schedule ahead"
             for rewrite in program.passes if rewrite.decides_in_graph]
    flags = [spec for spec in program.flags if spec.gates]
    names = program.gated_paths
    computes: dict[str, list[dict[str, bool]]] = {}
    for context in contexts:
        rows = []
        for index in range(num_steps):
            step = Step(index, num_steps, timesteps[index] if timesteps else None, context, planned=True)
            row = {name: True for name in names}
            for spec in flags:
                try:
                    decision = bool(spec.decide(step))
                except ConfigError as error:
                    raise ConfigError(f"plan(): {error} (give plan() the timesteps)") from error
                for region in spec.gates:
                    row[region] = row[region] and decision
            rows.append(row)
        computes[context] = rows
    return Schedule(num_steps, timesteps, tuple(contexts), names, computes, costs, notes)


# -- FLOPs from the graph --------------------------------------------------------------------------
def symbolic_costs(model: torch.nn.Module, args: tuple, kwargs: dict, region_names: Sequence[str]) -> RegionCost:
    """FLOPs of one call per region (a region is a module path) and in total, as sympy expressions in
    the token count, read off a dynamo capture with the token dimension dynamic.

    Example::

        costs = symbolic_costs(transformer, (), inputs, ["transformer_blocks.0.attn"])
        costs.total                # e.g. 98816*tokens + 1120*tokens**2 + ...
    """
    args, kwargs = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, (args, kwargs))
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        raise ValueError("symbolic_costs needs the model's hidden_states tensor")
    # token layout (B, S, C): S; latents (B, C, [F,] H, W): W, whose token count is linear in it
    dim = 1 if hidden.dim() == 3 else hidden.dim() - 1
    size = hidden.shape[dim]
    torch._dynamo.maybe_mark_dynamic(hidden, dim)
    if hidden.dim() == 3:
        for leaf in pytree.tree_leaves((args, kwargs)):
            # a table with one row per image token (Flux's img_ids) follows the token count
            if isinstance(leaf, torch.Tensor) and leaf.dim() == 2 and leaf.shape[0] == size and size > 1:
                torch._dynamo.maybe_mark_dynamic(leaf, 0)
    gm, example_inputs = capture_dynamic(model, args, kwargs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("example_value") for n in placeholders]
    fake_mode = torch._guards.detect_fake_mode([f for f in fakes if isinstance(f, torch.Tensor)])
    hidden_fake = next((f for f, real in zip(fakes, example_inputs) if real is hidden), None)
    symbol = hidden_fake.shape[dim] if hidden_fake is not None else size
    symbolic = isinstance(symbol, torch.SymInt) and bool(symbol.node.expr.free_symbols)
    per_region = {name: sympy.Integer(0) for name in region_names}
    counter = flop_counter()

    def total() -> Any:
        return sum(counter.get_flop_counts().get("Global", {}).values())

    class Count(fx.Interpreter):
        def run_node(self, node):
            before = total()
            result = super().run_node(node)
            spent = total() - before
            if node.op in ("call_function", "call_method", "call_module") and _as_expr(spent) != 0:
                paths = {normalize_module_path(p) for p, _ in (node.meta.get("nn_module_stack") or {}).values()}
                for name in region_names:
                    if name in paths:
                        per_region[name] += _as_expr(spent)
                        break
            return result

    with fake_mode, counter:
        Count(gm).run(*fakes)
    whole = _as_expr(total())
    shape_env = fake_mode.shape_env
    if shape_env is not None:  # sizes dynamo proved equal to the marked one are replaced by it
        whole = shape_env.simplify(whole)
        per_region = {k: shape_env.simplify(v) for k, v in per_region.items()}
    if shape_env is not None:  # any other size dynamo left symbolic is fixed at its captured value
        marked = symbol.node.expr.free_symbols if symbolic else set()
        values = getattr(shape_env, "backed_var_to_val", None) or shape_env.var_to_val
        fixed = {k: v for k, v in values.items() if k not in marked}
        whole = whole.subs(fixed)
        per_region = {k: v.subs(fixed) for k, v in per_region.items()}
    if symbolic:
        # the captured size relates to the token count linearly: tokens = size * (tokens per unit)
        expr = symbol.node.expr
        tokens_per_unit = sympy.Rational(_token_count(gm, fakes, hidden_fake, size), size)
        substitution = {s: TOKENS / tokens_per_unit for s in expr.free_symbols}
        whole = sympy.expand(_floors_out(whole).subs(substitution))
        per_region = {k: sympy.expand(_floors_out(v).subs(substitution)) for k, v in per_region.items()}
    return RegionCost(per_region, whole, _token_count(gm, fakes, hidden_fake, size), symbolic)


def _as_expr(value) -> sympy.Expr:
    if isinstance(value, torch.SymInt):
        return value.node.expr
    return sympy.Integer(int(value))


def _floors_out(expr: sympy.Expr) -> sympy.Expr:
    """``FloorDiv(s, p)`` -> ``s / p``: exact at the sizes a patchified latent can have."""
    from torch.utils._sympy.functions import FloorDiv

    return expr.replace(lambda e: isinstance(e, FloorDiv), lambda e: e.args[0] / e.args[1])


def _token_count(gm, fakes, hidden_fake, size) -> int:
    """Tokens of the hidden stream at the captured size: the sequence length the first
    ``scaled_dot_product_attention`` attends over, minus text tokens is model-specific, so use the
    latent itself: token layout -> its length; latents -> its spatial numel over the patch area."""
    if hidden_fake is None or hidden_fake.dim() == 3:
        return size
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor) and value.dim() == 3 and node.op == "call_function":
            length = value.shape[1]
            if isinstance(length, torch.SymInt):
                return int(length.node.hint) if length.node.hint is not None else size
    return size
