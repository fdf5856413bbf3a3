"""A machine that explores what users do between calls: random sequences of calls across contexts,
resets, interrupted generations, and batch, resolution and dtype changes, checked after every call.

Oracles:
* never-skip configs (FirstBlockCache at threshold 0, TaylorSeer recomputing every step) must equal
  the uncached model bit for bit, whatever came before;
* a skipping config (PyramidAttentionBroadcast reusing attention every other step) must give what a
  freshly reset copy gives when it replays only the calls of the current generation of that
  context: no state may cross contexts, generations, input signatures or resets.

CI runs a bounded budget; ``FXCACHE_STATE_MACHINE_EXAMPLES=200`` explores longer.
"""

import os

import torch
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import fxcache
from fxcache.passes import FirstBlockCache, PyramidAttentionBroadcast, TaylorSeer

from .dit import TinyDiT

EXAMPLES = int(os.environ.get("FXCACHE_STATE_MACHINE_EXAMPLES", "4"))
CONTEXTS = ("cond", "uncond", "other")
NUM_STEPS = 5

torch.manual_seed(0)
MODEL = TinyDiT(depth=2)


def _pab():
    return PyramidAttentionBroadcast(spatial_attention_block_skip_range=2,
                                     spatial_attention_timestep_skip_range=(-1, 1001),
                                     spatial_attention_block_identifiers=("self_attn",))


def _transform(make_pass, model=MODEL):
    return fxcache.transform(model, [make_pass()], backend="eager", max_programs=8)


NEVER_SKIP = {"fbc": lambda: FirstBlockCache(threshold=0.0),
              "taylorseer": lambda: TaylorSeer(cache_interval=1, disable_cache_before_step=0)}
# one CachedModel each for the whole run: captures are reused across examples, reset() between them
CACHED = {name: _transform(make) for name, make in NEVER_SKIP.items()}
SKIPPING = _transform(_pab)
REPLAY = _transform(_pab)


def _inputs(seed, batch, tokens, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, 4, generator=g).to(dtype)
    context = torch.randn(1, 8, 16, generator=g).expand(batch, -1, -1).to(dtype)
    return x, torch.full((batch,), 0.5, dtype=dtype), context


class CallsBetweenGenerations(RuleBasedStateMachine):
    @initialize()
    def start(self):
        MODEL.float()
        for cached in (*CACHED.values(), SKIPPING, REPLAY):
            cached.reset()
        self.step = {name: 0 for name in CONTEXTS}
        self.generation = {name: [] for name in CONTEXTS}  # calls of the current generation
        self.checked = 0

    def _call(self, cached, context, step, inputs):
        with cached.cache_context(context, step_index=step, num_inference_steps=NUM_STEPS, timestep=500.0):
            return cached(*inputs)

    @rule(context=st.sampled_from(CONTEXTS), seed=st.integers(0, 3), batch=st.sampled_from([1, 2]),
          tokens=st.sampled_from([16, 24]))
    def call(self, context, seed, batch, tokens):
        """One denoiser call; batch and resolution may change from any call to the next."""
        # inputs never repeat exactly, as in a denoising loop (at threshold 0 FirstBlockCache reuses
        # on a change of exactly 0)
        inputs = _inputs(4 * self.checked + seed, batch, tokens, MODEL.embed.weight.dtype)
        step = self.step[context]
        expected = MODEL(*inputs)
        for name, cached in CACHED.items():
            assert torch.equal(self._call(cached, context, step, inputs), expected), name
        out = self._call(SKIPPING, context, step, inputs)
        self.generation[context].append((step, inputs))
        REPLAY.reset()
        for replay_step, replay_inputs in self.generation[context]:
            replayed = self._call(REPLAY, "replay", replay_step, replay_inputs)
        assert torch.equal(out, replayed)
        self.step[context] = (step + 1) % NUM_STEPS
        if self.step[context] == 0:
            self.generation[context] = []
        self.checked += 1

    @rule(context=st.sampled_from(CONTEXTS))
    def interrupt(self, context):
        """The generation of one context stops part-way; its next call starts a new one at step 0."""
        self.step[context] = 0
        self.generation[context] = []

    @rule()
    def reset(self):
        """What a pipeline does at the end of a call."""
        for cached in (*CACHED.values(), SKIPPING):
            cached.reset()
        self.step = {name: 0 for name in CONTEXTS}
        self.generation = {name: [] for name in CONTEXTS}

    @rule()
    def change_dtype(self):
        """``pipe.to(dtype)`` between generations: the module's parameters change dtype in place."""
        MODEL.double() if MODEL.embed.weight.dtype == torch.float32 else MODEL.float()
        self.reset()

    @invariant()
    def programs_stay_bounded(self):
        for cached in (*CACHED.values(), SKIPPING):
            assert cached.stats()["programs"] <= 8


CallsBetweenGenerations.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=10, deadline=None, derandomize=EXAMPLES <= 6,
    # in CI a failure is reported as found: shrinking a stateful run can take minutes
    phases=[Phase.explicit, Phase.reuse, Phase.generate] + ([] if EXAMPLES <= 6 else [Phase.shrink]))
test_calls_between_generations = CallsBetweenGenerations.TestCase
