"""TeaCache: skip the whole block stack while the timestep-modulated input has changed little.

Semantics of the TeaCache paper (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video
Diffusion Model", 2024) and its reference code (ali-vilab/TeaCache). At each call the *indicator*,
the first block's timestep-modulated input, is compared with the previous call's: its relative L1
change ``mean|x - x_prev| / mean|x_prev|`` is rescaled by a per-model polynomial (``np.poly1d``
order: highest power first) and added to an accumulated distance. The blocks are skipped while
that distance stays ``< threshold``; a computing step resets it to 0. The first
``retention_steps`` steps and the last step always compute (and reset it). A skipped step adds the
residual of the whole block range stored at the last computing step to the hidden stream entering
the blocks; the other streams pass through as skipped blocks would. The indicator is updated at
every call.

The indicator is found in the graph, no per-model code: ``indicator="modulated_input"`` takes the
first value in block 0 computed from both the hidden stream and the timestep embedding, with the
stream's shape (FLUX's and HunyuanVideo's ``norm1`` output, as the reference reads it);
``"timestep_embedding"`` takes the block's timestep embedding input itself (Wan 2.1's ``e0``, the
reference's ``use_ret_steps`` mode). Published polynomials: :data:`TEACACHE_COEFFICIENTS`, with
:meth:`TeaCache.for_model`; :meth:`TeaCache.calibrate` fits one for any model.

The decision is made in the graph, lowered like FirstBlockCache: ``lowering="host"`` reads it with
one ``.item()`` per call, ``lowering="cond"`` keeps one graph with ``torch.cond``. State is kept per
cache context (the reference keeps one per parity of the call counter: the same for CFG pipelines).

Example::

    cached = fxcache.transform(transformer, scheduler=pipe, passes=[TeaCache.for_model("flux", threshold=0.4)])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from ..observe import observe
from ..parallel import context_parallel, mean_ratio
from ..regions import HIDDEN, Block, RegionError, descendants, example_value
from ..rewrite import INPUTS, REGION, PassBuilder, copy_into
from .base import CachePass, ConfigError
from .block_residual import block_stack, run_or_add_residual, run_or_add_residual_cond

__all__ = ["TEACACHE_COEFFICIENTS", "TeaCache", "find_indicator"]

# The reference code's polynomials (ali-vilab/TeaCache: TeaCache4FLUX, TeaCache4HunyuanVideo,
# TeaCache4Wan2.1 with use_ret_steps), highest power first, with the indicator and the steps that
# always compute that they were fitted with.
TEACACHE_COEFFICIENTS: dict[str, dict[str, Any]] = {
    "flux": dict(coefficients=(4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01),
                 indicator="modulated_input", retention_steps=1),
    "hunyuan_video": dict(coefficients=(7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00,
                                        9.61237896e-02), indicator="modulated_input", retention_steps=1),
    "wan2.1_t2v_1.3b": dict(coefficients=(-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01,
                                          -4.99875664e-02), indicator="timestep_embedding", retention_steps=5),
    "wan2.1_t2v_14b": dict(coefficients=(-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01,
                                         -3.15583525e-01), indicator="timestep_embedding", retention_steps=5),
}
INDICATORS = ("modulated_input", "timestep_embedding")


@dataclass(frozen=True)
class TeaCache(CachePass):
    """``threshold``: skip while the accumulated rescaled distance is ``< threshold`` (the reference's
    ``rel_l1_thresh``; FLUX: 0.25 about 1.5x, 0.4 1.8x, 0.6 2x). ``coefficients``: the rescaling
    polynomial, highest power first (default FLUX's). ``indicator``: ``"modulated_input"`` or
    ``"timestep_embedding"``. ``retention_steps``: the first steps that always compute.
    ``num_inference_steps``: the generation's length, to always compute its last step where no
    scheduler or pipeline field tells it (None: the last step is forced only when known).
    ``lowering``: ``"host"`` or ``"cond"``.

    Example::

        TeaCache(threshold=0.4)                                   # FLUX's polynomial
        TeaCache.for_model("wan2.1_t2v_1.3b", threshold=0.2)
    """

    threshold: float = 0.25
    coefficients: tuple[float, ...] = TEACACHE_COEFFICIENTS["flux"]["coefficients"]
    indicator: str = "modulated_input"
    retention_steps: int = 1
    num_inference_steps: int | None = None
    lowering: str = "host"

    scope = "blocks"
    namespace = "teacache"

    def __post_init__(self):
        self._require_number("threshold", minimum=0.0)
        coefficients = self.coefficients
        if isinstance(coefficients, torch.Tensor):
            coefficients = coefficients.tolist()
        if isinstance(coefficients, (str, bytes)) or not hasattr(coefficients, "__iter__") or not coefficients or any(
                isinstance(c, bool) or not isinstance(c, (int, float)) for c in coefficients):
            self._fail("coefficients", "must be a non-empty sequence of numbers, highest power first")
        object.__setattr__(self, "coefficients", tuple(float(c) for c in coefficients))
        self._require_choice("indicator", INDICATORS)
        if isinstance(self.retention_steps, bool) or not isinstance(self.retention_steps, int) or self.retention_steps < 1:
            self._fail("retention_steps", "must be an integer >= 1 (the first step always computes)")
        if self.num_inference_steps is not None and (isinstance(self.num_inference_steps, bool) or not isinstance(
                self.num_inference_steps, int) or self.num_inference_steps < 1):
            self._fail("num_inference_steps", "must be None or a positive integer")
        self._require_choice("lowering", ("host", "cond"))

    @classmethod
    def for_model(cls, name: str, **fields) -> "TeaCache":
        """A TeaCache with a published polynomial (:data:`TEACACHE_COEFFICIENTS`), its indicator and
        retention steps; ``fields`` set the rest (``threshold``...)."""
        if name not in TEACACHE_COEFFICIENTS:
            raise ConfigError(f"TeaCache.for_model: no published polynomial for {name!r}; known: "
                              f"{sorted(TEACACHE_COEFFICIENTS)}. Fit one with TeaCache.calibrate(model, generate)")
        return cls(**{**TEACACHE_COEFFICIENTS[name], **fields})

    def forces(self, index: int, num_steps: int | None) -> bool:
        """Whether step ``index`` always computes: a retention step, or the last one."""
        num_steps = num_steps or self.num_inference_steps
        return index < self.retention_steps or (num_steps is not None and index >= num_steps - 1)

    # -- rewrite ------------------------------------------------------------------------------------
    def rewrite(self, g: PassBuilder) -> None:
        blocks = g.regions.blocks
        indicator_node = find_indicator(blocks[0], g.inputs, self.indicator, after_a_break=g.captured.is_piece)
        stack, hidden_position = block_stack(g)
        hidden_output = stack.outputs[hidden_position]
        indicator = g.hoist(indicator_node, stack)  # needed whether the blocks then run or not
        hidden_position = stack.outputs.index(hidden_output)  # hoisting may take an output out of the stack
        streams = g.skip_values(stack, blocks)
        previous = g.state("previous_indicator", like=indicator)
        accumulated = g.state("accumulated_distance", shape=(1,), dtype=torch.float64)
        residual = g.cache("residual", like=stack.outputs[hidden_position])
        computed = g.counter("blocks_computed")
        threshold = g.scalar("threshold", value=self.threshold, dtype=torch.float64)
        force = g.scalar("force_compute", value=lambda step: float(self.forces(step.index, step.num_steps)))
        group = g.metric_group("sum |m - m_prev| and sum |m_prev| of the indicator m, with their counts")
        compute = g.call(accumulate_and_decide, indicator, previous, accumulated, threshold, force,
                         self.coefficients, group, after=indicator)
        if self.lowering == "host":
            decision, policy = g.host_bool(compute), run_or_add_residual
        else:
            decision, policy = compute, run_or_add_residual_cond
        g.replace(stack, policy, decision, REGION, residual, hidden_position, tuple(streams), computed, INPUTS)

    # -- calibration --------------------------------------------------------------------------------
    @classmethod
    def calibrate(cls, model: torch.nn.Module, generate: Callable[[torch.nn.Module], Any], *, degree: int = 4,
                  indicator: str = "modulated_input", context: str | None = None, **fields) -> "TeaCache":
        """Fit the rescaling polynomial on one generation, as the TeaCache authors do: per call, the
        indicator's relative L1 change (x) and the block stack output's (y); least squares
        ``y ~ poly(x)`` of ``degree``. ``generate`` runs a generation through the model it is given
        (see :func:`fxcache.observe.observe`); ``context`` picks the cache context measured (default:
        the first used).

        Example::

            config = TeaCache.calibrate(transformer, lambda m: run_pipeline(m, steps=28), threshold=0.3)
        """
        pairs = measure_changes(model, generate, indicator)
        if not pairs:
            raise ConfigError("TeaCache.calibrate: generate() never called the model")
        name = context if context is not None else next(iter(pairs))
        if name not in pairs or len(pairs[name]) <= degree:
            raise ConfigError(f"TeaCache.calibrate: context {name!r} has {len(pairs.get(name, []))} measured "
                              f"changes; a degree-{degree} fit needs more than {degree} (run more steps)")
        x = torch.tensor([p[0] for p in pairs[name]], dtype=torch.float64)
        y = torch.tensor([p[1] for p in pairs[name]], dtype=torch.float64)
        powers = torch.stack([x ** k for k in range(degree, -1, -1)], dim=1)
        solution = torch.linalg.lstsq(powers, y.unsqueeze(1)).solution.squeeze(1)
        return cls(coefficients=tuple(solution.tolist()), indicator=indicator, **fields)


def accumulate_and_decide(indicator: torch.Tensor, previous: torch.Tensor, accumulated: torch.Tensor,
                          threshold: torch.Tensor, force: torch.Tensor, coefficients: tuple[float, ...],
                          group: str | None = None) -> torch.Tensor:
    """Add the rescaled relative L1 change of the indicator to the accumulated distance; compute
    (0-d bool) when forced or when the distance reaches ``threshold`` (NaN computes). Updates the
    previous indicator and the accumulated distance (reset to 0 on computing). Under context
    parallelism the change is over the whole sequence (one collective, ``group``)."""
    change = mean_ratio((indicator - previous).abs(), previous.abs(), group)
    rescaled = torch.zeros_like(change)
    for coefficient in coefficients:  # Horner: highest power first, as np.poly1d
        rescaled = rescaled * change + coefficient
    total = accumulated.reshape(()) + rescaled
    compute = (force.reshape(()) > 0) | torch.logical_not(total < threshold.reshape(()))
    copy_into(accumulated, torch.where(compute, torch.zeros_like(total), total).reshape(1))
    copy_into(previous, indicator)
    return compute


# -- the indicator ----------------------------------------------------------------------------------
def find_indicator(block: Block, inputs: dict[str, fx.Node], indicator: str,
                   after_a_break: bool = False) -> fx.Node:
    """The node of ``block`` TeaCache compares between calls (see the module docstring).
    ``after_a_break``: the graph starts after a graph break (a split forward), so its inputs are what
    the code before the break computed."""
    members = set(block.nodes)
    # the timestep: an input named so, else the per-sample scalars (timestep, guidance: (B,) or 0-d)
    named = [node for name, node in inputs.items() if "timestep" in name]
    scalars = [node for node in inputs.values()
               if isinstance(example_value(node), torch.Tensor) and example_value(node).dim() <= 1]
    split = (" dynamo splits the forward at a graph break before the blocks (explain() says where), and "
             "the graph that holds them starts after it, with the timestep already embedded; use "
             "FirstBlockCache or MagCache on it." if after_a_break else "")
    if not (named or scalars):
        raise RegionError(f"TeaCache: no input of the model is a timestep (inputs: {list(inputs)}); the "
                          f"indicator is found from the timestep embedding.{split}")
    from_timestep = set().union(*(descendants(node) for node in named or scalars))
    embeddings = [n for n in block.inputs if n in from_timestep and n not in block.stream_inputs.values()
                  and isinstance(example_value(n), torch.Tensor)]
    if not embeddings:
        looked = [node.name for node in named or scalars]
        raise RegionError(f"TeaCache: no input of {block.name} is computed from the timestep (looked for it "
                          f"among the inputs {looked}); the indicator is found from the timestep embedding."
                          + (split or " Use FirstBlockCache or MagCache on this model."))
    embedding = max(embeddings, key=lambda n: example_value(n).numel())
    if indicator == "timestep_embedding":
        return embedding
    hidden = block.stream_inputs[HIDDEN]
    shape = tuple(example_value(hidden).shape)
    from_hidden, from_embedding = descendants(hidden) & members, descendants(embedding) & members
    for node in block.nodes:
        value = example_value(node)
        if node in from_hidden and node in from_embedding and isinstance(value, torch.Tensor) \
                and tuple(value.shape) == shape:
            # follow the modulation while it stays one value of the stream's shape (x * (1 + scale)
            # + shift, then a cast), up to where the attention projections read it
            while len(node.users) == 1:
                user = next(iter(node.users))
                user_value = example_value(user)
                if user not in members or not isinstance(user_value, torch.Tensor) or \
                        tuple(user_value.shape) != shape:
                    break
                node = user
            return node
    raise RegionError(f"TeaCache: {block.name} computes nothing from both the hidden stream and the timestep "
                      "embedding with the stream's shape (no modulated input); use indicator='timestep_embedding'")


@torch.no_grad()
def measure_changes(model: torch.nn.Module, generate: Callable[[torch.nn.Module], Any],
                    indicator: str = "modulated_input") -> dict[str, list[tuple[float, float]]]:
    """Per cache context, one ``(indicator change, output change)`` pair per call after the first:
    relative L1 changes of the indicator and of the block stack's hidden output."""
    pairs: dict[str, list[tuple[float, float]]] = {}
    previous: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def select(regions):
        blocks = regions.blocks
        inputs = dict(zip(regions.input_names, [n for n in regions.graph_module.graph.nodes if n.op == "placeholder"]))
        return {"indicator": find_indicator(blocks[0], inputs, indicator),
                "output": blocks[-1].stream_outputs[HIDDEN]}

    group = getattr(context_parallel(model), "group", None)  # each rank holds a shard: measure the whole

    def relative_l1(now: torch.Tensor, before: torch.Tensor) -> float:
        return float(mean_ratio((now - before).abs(), before.abs(), group))

    def measure(context: str, values: dict[str, torch.Tensor]) -> None:
        current = (values["indicator"].float(), values["output"].float())
        if context in previous:
            before = previous[context]
            pairs.setdefault(context, []).append((relative_l1(current[0], before[0]), relative_l1(current[1], before[1])))
        else:
            pairs.setdefault(context, [])
        previous[context] = current

    observe(model, generate, select, measure)
    return pairs
