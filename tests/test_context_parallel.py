"""fxcache on diffusers' context parallelism: two CPU processes (gloo), Ulysses degree 2.

The two ranks are spawned once for the module and serve jobs (module-level functions below); the
test process computes the single-process references meanwhile. Every collective has a bounded
timeout (the process group's, COLLECTIVE_TIMEOUT) and every job a join timeout (JOB_TIMEOUT): ranks
that decide differently fail the test instead of hanging CI.

On a CPU, diffusers' ``_resolve_parallel_config`` computes ``rank % torch.accelerator.device_count()``,
which is 0 there: the workers patch the count to 1 (docs/parallel.md says so too).
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback

import pytest
import torch

import fxcache
from fxcache.parallel import ContextParallel, ParallelError, context_parallel
from fxcache.passes import (DBCache, EasyCache, FasterCache, FirstBlockCache, FoCa, HiCache, MagCache,
                            PyramidAttentionBroadcast, SeaCache, TaylorSeer, TeaCache)
from fxcache.testing import models
from tests.helpers import relative_difference

# one xdist worker runs this module (the README's command distributes by group): the two ranks are
# spawned once, not once per worker
pytestmark = pytest.mark.xdist_group("context_parallel")

WORLD = 2
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
JOB_TIMEOUT = 420  # seconds for one job on both ranks, compiles included
STEPS = 6
CFG = ("cond", "uncond")
# tiny models as small as the passes allow: FirstBlockCache needs two blocks
SIZES = {"flux": dict(num_layers=1, num_single_layers=1), "wan": dict(num_layers=2)}


def build(name: str) -> models.TinyDenoiser:
    return models.build(name, **SIZES[name])


def make_pass(key: str, tiny: models.TinyDenoiser):
    """Each pass at settings where the tiny model both computes and reuses over STEPS steps."""
    span = (0.1 * tiny.timestep_scale, 0.9 * tiny.timestep_scale)
    if key == "first_block_cache":
        return FirstBlockCache(threshold={"flux": 0.3, "wan": 0.1}[tiny.name])
    if key == "pab":
        return PyramidAttentionBroadcast(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=span,
                                         cross_attention_block_skip_range=2, cross_attention_timestep_skip_range=span)
    if key == "taylorseer":
        return TaylorSeer(cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32)
    if key == "mag_cache":
        return MagCache(mag_ratios=[1.0] + [0.98] * (STEPS - 1), num_inference_steps=STEPS, threshold=0.1,
                        retention_ratio=0.0)
    # the dynamic passes beyond diffusers, at settings that reuse 2-3 of the 6 steps on tiny Flux
    if key == "teacache":
        return TeaCache(threshold=0.3, num_inference_steps=STEPS)
    if key == "db_cache":
        return DBCache(Fn_compute_blocks=1, residual_diff_threshold=0.3, max_warmup_steps=1)
    if key == "easycache":
        return EasyCache(thresh=0.1, ret_steps=1, num_inference_steps=STEPS)
    # the passes beyond diffusers that decide without a collective: FoCa and HiCache from the step,
    # SeaCache from the input latents, which every rank holds whole (Wan splits at blocks.0)
    if key == "foca":
        return FoCa(cache_interval=2, warmup_steps=2)
    if key == "hicache":
        return HiCache(cache_interval=2, warmup_steps=1)
    if key == "sea_cache":
        return SeaCache(threshold=0.3, retention_steps=1, cache_end_steps=1)
    if key == "faster_cache":  # batched CFG only; Flux's output is token-layout on a 4 x 4 grid
        scale = tiny.timestep_scale
        return FasterCache(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 0.95 * scale),
                           unconditional_batch_skip_range=3, unconditional_batch_timestep_skip_range=(-1, 0.9 * scale),
                           low_frequency_weight_update_timestep_range=(0.2 * scale, 0.9 * scale),
                           high_frequency_weight_update_timestep_range=(-1, 0.5 * scale),
                           attention_weight_callback=lambda _: 0.3, token_grid=(4, 4))
    raise ValueError(key)


# the four passes in two transforms (a dynamic block cache with PAB inside its blocks; MagCache with
# TaylorSeer on the attention inside): each runs, decides and is compared, at half the compiles
GROUPS = (("first_block_cache", "pab"), ("mag_cache", "taylorseer"))
DYNAMIC = {"first_block_cache"}


def uneven_noise(tiny: models.TinyDenoiser, seed: int) -> torch.Tensor:
    """Latents whose first half of the sequence (the first rank's shard) is flat, 1.0 everywhere (a
    uniform background), and the second half noise: per-shard metrics then differ between the ranks
    (see test_the_ranks_halves_would_decide_differently_alone)."""
    x = tiny.noise(seed=seed)
    if tiny.name == "flux":  # (batch, tokens, channels): the image tokens are split at the input
        x[:, : x.shape[1] // 2] = 1.0
    else:  # Wan (batch, channels, frames, h, w): tokens run frame by frame, split at blocks.0
        x[:, :, : x.shape[2] // 2] = 1.0
    return x


def batched(tiny: models.TinyDenoiser, x: torch.Tensor, sigma: float) -> dict:
    """One call for both CFG branches (batch 2: unconditional then conditional, as diffusers' video
    pipelines batch them and FasterCache expects)."""
    uncond, cond = tiny.inputs(x, sigma, 1), tiny.inputs(x, sigma, 0)
    return {k: torch.cat([v, cond[k]]) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == x.shape[0]
            else v for k, v in uncond.items()}


@torch.no_grad()
def loop(model, tiny: models.TinyDenoiser, *, seed: int = 0, contexts=CFG, layout: str = "split",
         group=None, guidance: float = 3.0):
    """A flow-matching Euler loop with true CFG, passing the step to ``cache_context`` as pipelines do.
    ``layout``: "split" (one call per branch, contexts cond and uncond), "batched" (one call of batch
    2, context cond_uncond) or "cfg_parallel" (this rank runs branch ``rank``, the velocities are
    all-gathered over ``group``). Returns the final latents and, per step, the cache's figures per
    context (what computed and what was reused so far)."""
    import torch.distributed as dist

    x = uneven_noise(tiny, seed)
    sigmas = [1.0 - i / STEPS for i in range(STEPS + 1)]
    decisions = []
    for i in range(STEPS):
        fields = dict(step_index=i, num_inference_steps=STEPS, timestep=sigmas[i] * tiny.timestep_scale,
                      sigma=sigmas[i])
        if layout == "batched":
            with model.cache_context("cond_uncond", **fields):
                out = model(**batched(tiny, x, sigmas[i]))[0]
            velocities = [out[1:], out[:1]]  # cond, uncond
        elif layout == "cfg_parallel":
            rank = dist.get_rank(group)
            with model.cache_context(contexts[rank], **fields):
                mine = model(**tiny.inputs(x, sigmas[i], rank))[0].contiguous()
            velocities = [torch.empty_like(mine) for _ in contexts]
            dist.all_gather(velocities, mine, group=group)
        else:
            velocities = []
            for condition, name in enumerate(contexts):
                with model.cache_context(name, **fields):
                    velocities.append(model(**tiny.inputs(x, sigmas[i], condition))[0])
        v = velocities[1] + guidance * (velocities[0] - velocities[1])
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        decisions.append({name: {k: v for k, v in figures.items() if k != "cache_bytes"}
                          for name, figures in model.stats()["contexts"].items()})
    return x, decisions


# -- the ranks ---------------------------------------------------------------------------------------
_PARALLEL_MODELS: dict[str, models.TinyDenoiser] = {}


def parallel_model(name: str) -> models.TinyDenoiser:
    """The tiny model with Ulysses degree 2, made once per rank (enable_parallelism cannot run twice)."""
    from diffusers import ContextParallelConfig

    if name not in _PARALLEL_MODELS:
        tiny = build(name)
        tiny.model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        _PARALLEL_MODELS[name] = tiny
    return _PARALLEL_MODELS[name]


def job_passes(rank: int, name: str, groups, layout: str = "split"):
    """Each group of passes on the context-parallel model; the transform after enable_parallelism."""
    tiny = parallel_model(name)
    results = {}
    for keys in groups:
        cached = fxcache.transform(tiny.model, [make_pass(key, tiny) for key in keys], backend="eager")
        x, decisions = loop(cached, tiny, layout=layout)
        results[keys] = dict(x=x, decisions=decisions, parallel=cached.stats()["context_parallel"],
                            explain=cached.explain(), cache_bytes=cached.stats()["cache_bytes"])
    return results


def job_transform_first(rank: int, name: str, key: str):
    """transform() on a plain model, enable_parallelism() on the transformed one, then the first call."""
    from diffusers import ContextParallelConfig

    tiny = build(name)
    cached = fxcache.transform(tiny.model, [make_pass(key, tiny)], backend="eager")
    cached.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    x, decisions = loop(cached, tiny)
    return dict(x=x, decisions=decisions, parallel=cached.stats()["context_parallel"])


def job_cfg_parallel(rank: int, name: str, key: str):
    """No context parallelism: rank 0 runs the conditional branch, rank 1 the unconditional one."""
    tiny = build(name)
    cached = fxcache.transform(tiny.model, [make_pass(key, tiny)], backend="eager")
    x, decisions = loop(cached, tiny, layout="cfg_parallel")
    return dict(x=x, decisions=decisions, parallel=cached.stats()["context_parallel"])


def _serve(rank: int, port: int, jobs, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # the timeout bounds every collective: a rank left waiting raises instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    torch.accelerator.device_count = lambda: 1  # diffusers computes rank % device_count (0 on a CPU)
    try:
        while (job := jobs.get()) is not None:
            function, args = job
            try:
                results.put((rank, "ok", globals()[function](rank, *args)))
            except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
                results.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class Ranks:
    """Two worker processes that run the same job and hand back one result each."""

    def __init__(self):
        context = torch.multiprocessing.get_context("spawn")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.jobs = [context.Queue() for _ in range(WORLD)]
        self.results = context.Queue()
        self.processes = [context.Process(target=_serve, args=(rank, port, self.jobs[rank], self.results), daemon=True)
                          for rank in range(WORLD)]
        for process in self.processes:
            process.start()

    def submit(self, function: str, *args) -> None:
        for jobs in self.jobs:
            jobs.put((function, args))

    def collect(self) -> list:
        """Both ranks' results (all of them read before failing, so the next job starts clean)."""
        out, failures = [None] * WORLD, []
        for _ in range(WORLD):
            try:
                rank, status, value = self.results.get(timeout=JOB_TIMEOUT)
            except queue.Empty:
                self.close(kill=True)
                pytest.fail(f"a rank gave no result within {JOB_TIMEOUT} s: the ranks diverged and one waits in a "
                            "collective the other never entered (or a rank died)")
            if status != "ok":
                failures.append(f"rank {rank} failed:\n{value}")
            out[rank] = value
        if failures:
            pytest.fail("\n".join(failures))
        return out

    def run(self, function: str, *args) -> list:
        self.submit(function, *args)
        return self.collect()

    def close(self, kill: bool = False) -> None:
        for jobs in self.jobs:
            jobs.put(None)
        for process in self.processes:
            process.join(timeout=0 if kill else 10)
            if process.is_alive():
                process.kill()


@pytest.fixture(scope="module")
def ranks():
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    workers = Ranks()
    yield workers
    workers.close()


def reference(name: str, keys, layout: str = "split"):
    """The same passes on one process, no parallelism."""
    tiny = build(name)
    keys = (keys,) if isinstance(keys, str) else keys
    cached = fxcache.transform(tiny.model, [make_pass(key, tiny) for key in keys], backend="eager")
    x, decisions = loop(cached, tiny, layout=layout)
    return x, decisions, cached


def assert_equal_runs(results: list, name: str, expected_x: torch.Tensor, expected_decisions: list, what: str) -> None:
    """Every rank decided as one process did, step by step and per context, and its latents equal one
    process's within 1e-5 (relative difference of the update, as DESIGN defines it)."""
    start = uneven_noise(build(name), 0)
    for rank, result in enumerate(results):
        assert result["decisions"] == expected_decisions, f"{what}: rank {rank} decided otherwise than one process"
        error = relative_difference(result["x"], expected_x, start)
        assert error <= 1e-5, f"{what}: rank {rank} differs from one process by {error:.2e}"


def shard_changes(name: str, steps: int = STEPS) -> list[tuple[float, float, float]]:
    """Uncached, conditional branch: the relative L1 change of the head block's hidden residual from
    one step to the next, over the whole sequence and over each rank's half of it."""
    tiny = build(name)
    block = (tiny.model.transformer_blocks if name == "flux" else tiny.model.blocks)[0]
    residuals = []

    def record(module, args, kwargs, output):
        hidden_in = kwargs.get("hidden_states", args[0] if args else None)
        hidden_out = output[1] if isinstance(output, tuple) else output
        residuals.append((hidden_out - hidden_in).detach())

    handle = block.register_forward_hook(record, with_kwargs=True)
    try:
        x = uneven_noise(tiny, 0)
        sigmas = [1.0 - i / steps for i in range(steps + 1)]
        with torch.no_grad():
            for i in range(steps):
                x = x + (sigmas[i + 1] - sigmas[i]) * tiny.model(**tiny.inputs(x, sigmas[i], 0))[0]
    finally:
        handle.remove()

    def change(now, before):
        return float((now - before).abs().mean() / before.abs().mean())

    out = []
    for before, now in zip(residuals, residuals[1:]):
        half = now.shape[1] // 2
        out.append((change(now, before), change(now[:, :half], before[:, :half]), change(now[:, half:], before[:, half:])))
    return out


def _on_ulysses(ranks, name: str, groups):
    """Each group of passes on the ranks, checked equal to one process run by run; yields (the
    group, one process's decisions, its CachedModel, each rank's result) for the test's own checks."""
    ranks.submit("job_passes", name, groups)
    expected = {keys: reference(name, keys) for keys in groups}  # while the ranks run
    results = ranks.collect()
    for keys in groups:
        x, decisions, cached = expected[keys]
        assert_equal_runs([r[keys] for r in results], name, x, decisions, f"{name} {keys}")
        yield keys, decisions, cached, [r[keys] for r in results]


# -- the tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["flux", "wan"])
def test_every_pass_on_ulysses_equals_one_process_and_every_rank_decides_alike(ranks, name):
    for keys, decisions, cached, results in _on_ulysses(ranks, name, GROUPS):
        last = decisions[-1]["cond"]
        for key in keys:
            namespace = make_pass(key, build(name)).namespace
            figures = {k: v for k, v in last.items() if k.startswith(namespace + ".")}
            reused = figures.get(f"{namespace}.tail_computed", STEPS) < STEPS or any(
                isinstance(v, dict) and v["false"] > 0 for v in figures.values())
            assert reused, f"{name} {key}: the cache reused nothing, so the comparison proves little ({last})"
        parallel = [r["parallel"] for r in results]
        assert [p["rank"] for p in parallel] == [0, 1] and {p["group_size"] for p in parallel} == {WORLD}
        reduced = {"FirstBlockCache"} if DYNAMIC & set(keys) else set()
        assert set(parallel[0]["reduced"]) == reduced, "only dynamic decisions are reduced"
        explain = results[0]["explain"]
        assert "context parallel over 2 ranks (ulysses 2)" in explain
        assert explain.count("all-reduces over the 2 ranks") == len(reduced)
        assert explain.count("no collective: decided from the step") == len(keys) - len(reduced)
        # cache state lives per rank on its shard: sequence-shaped state takes half the bytes
        assert results[0]["cache_bytes"] < cached.stats()["cache_bytes"]


def test_the_dynamic_passes_beyond_diffusers_on_ulysses_equal_one_process(ranks):
    """TeaCache, DBCache and EasyCache decide from metrics of sharded tensors too: each all-reduces
    its sums once per decision, so every rank reuses the steps one process reuses (tiny Flux)."""
    for keys, decisions, _, (result, _) in _on_ulysses(ranks, "flux", (("teacache",), ("db_cache",), ("easycache",))):
        computed = [v for k, v in decisions[-1]["cond"].items() if k.endswith("_computed")]
        assert computed and 0 < computed[0] < STEPS, f"{keys}: should compute some steps and reuse others"
        name = type(make_pass(keys[0], build("flux"))).__name__
        assert list(result["parallel"]["reduced"]) == [name]
        assert result["explain"].count("all-reduces over the 2 ranks") == 1


def test_the_passes_beyond_diffusers_without_a_collective_on_ulysses_equal_one_process(ranks):
    """FoCa and HiCache decide from the step index, SeaCache from the input latents that every rank
    holds whole (Wan shards its tokens at blocks.0): no all-reduce, and every rank reuses or
    forecasts the steps one process does (tiny Wan)."""
    for keys, decisions, _, (result, _) in _on_ulysses(ranks, "wan", (("sea_cache",), ("foca",), ("hicache",))):
        figures = decisions[-1]["cond"]
        reused = any(v < STEPS for k, v in figures.items() if k.endswith("_computed")) or any(
            isinstance(v, dict) and v["false"] > 0 for v in figures.values())
        assert reused, f"{keys}: the cache reused nothing, so the comparison proves little ({figures})"
        assert list(result["parallel"]["reduced"]) == []
        assert result["explain"].count("all-reduces over the 2 ranks") == 0


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_the_ranks_halves_would_decide_differently_alone(name):
    """The inputs above are a real test of the reduction: at FirstBlockCache's threshold, each rank's
    own half of the sequence decides otherwise than the other's at some step (per-shard metrics would
    send one rank into the tail's all-to-alls and leave the other out: a hang)."""
    threshold = make_pass("first_block_cache", build(name)).threshold
    changes = shard_changes(name)
    assert any((first > threshold) != (second > threshold) for _, first, second in changes), changes


def test_batched_cfg_keeps_one_state_per_context_on_every_rank(ranks):
    """FirstBlockCache, and FasterCache (batched CFG is its layout: it reuses attention and skips the
    unconditional half, capturing the model again at half batch on every rank)."""
    groups = (("first_block_cache",), ("faster_cache",))
    ranks.submit("job_passes", "flux", groups, "batched")
    expected = {keys: reference("flux", keys, layout="batched") for keys in groups}
    results = ranks.collect()
    for keys in groups:
        x, decisions, _ = expected[keys]
        assert_equal_runs([r[keys] for r in results], "flux", x, decisions, f"batched CFG {keys}")
        assert set(decisions[-1]) == {"cond_uncond"}
    figures = expected[("faster_cache",)][1][-1]["cond_uncond"]
    assert figures["faster_cache.compute_uncond"]["false"] > 0
    assert figures["faster_cache.compute_spatial_attention"]["false"] > 0


def test_transform_before_enable_parallelism(ranks):
    ranks.submit("job_transform_first", "wan", "first_block_cache")
    x, decisions, _ = reference("wan", "first_block_cache")
    results = ranks.collect()
    assert_equal_runs(results, "wan", x, decisions, "transform, then enable_parallelism")
    assert results[0]["parallel"]["group_size"] == WORLD


def test_cfg_parallel_layout_each_rank_one_branch_decides_as_one_process(ranks):
    """cond on rank 0 and uncond on rank 1 (no context parallelism): each rank's context decides as
    that context does in one process, and the combined latents are equal."""
    ranks.submit("job_cfg_parallel", "flux", "first_block_cache")
    x, decisions, _ = reference("flux", "first_block_cache")
    results = ranks.collect()
    start = uneven_noise(build("flux"), 0)
    for rank, result in enumerate(results):
        context = CFG[rank]
        assert [step[context] for step in result["decisions"]] == [step[context] for step in decisions]
        assert relative_difference(result["x"], x, start) <= 1e-5
        assert result["parallel"] is None  # no context-parallel group: nothing to reduce


# -- without processes -------------------------------------------------------------------------------
class _Config:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def test_tensor_parallelism_is_a_clear_error():
    model = torch.nn.Linear(2, 2)
    model._parallel_config = _Config(tensor_parallel_config=object(), context_parallel_config=None)
    with pytest.raises(ParallelError, match="tensor parallelism.*context parallelism only"):
        context_parallel(model)


def test_a_context_parallel_config_never_set_up_is_a_clear_error():
    model = torch.nn.Linear(2, 2)
    model._parallel_config = _Config(tensor_parallel_config=None,
                                     context_parallel_config=_Config(_flattened_mesh=None))
    with pytest.raises(ParallelError, match="enable_parallelism"):
        context_parallel(model)


def test_one_process_has_no_group():
    assert context_parallel(torch.nn.Linear(2, 2)) is None
    assert ContextParallel("g", 2, 0, 2, 1).describe() == "context parallel over 2 ranks (ulysses 2), this is rank 0"
