"""The speed/quality frontier (``python -m fxcache frontier``, fxcache/demo/frontier.py): the Pareto
front, the best setting per method the demo runs, and a small run of the command on the digits model
where fxcache's, diffusers' and cache-dit's FirstBlockCache points must coincide."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, strategies as st

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from fxcache import passes as fx  # noqa: E402
from fxcache.cli import METHODS  # noqa: E402
from fxcache.demo import frontier  # noqa: E402
from fxcache.demo.frontier import Frontier, Point, pareto_front  # noqa: E402


def point(flops: float, psnr: float, method: str = "M", label: str = "", library: str = "fxcache",
          accuracy: float = 1.0) -> Point:
    return Point(method, label or f"{flops}/{psnr}", library, flops, psnr, 1.0, accuracy, 1.0, flops)


def dominates(q: Point, p: Point) -> bool:
    return (q.flop_fraction <= p.flop_fraction and q.psnr >= p.psnr
            and (q.flop_fraction < p.flop_fraction or q.psnr > p.psnr))


values = st.lists(st.tuples(st.sampled_from([0.2, 0.4, 0.5, 0.8, 1.0]),
                            st.sampled_from([20.0, 30.0, 35.0, 40.0, math.inf])), min_size=1, max_size=12)


@given(values)
def test_pareto_front_is_exactly_the_points_nothing_dominates(pairs):
    points = [point(f, q, label=str(i)) for i, (f, q) in enumerate(pairs)]
    front = pareto_front(points)
    assert front == sorted(front, key=lambda p: (p.flop_fraction, -p.psnr))
    for p in points:
        assert (p in front) == (not any(dominates(q, p) for q in points)), p
    # every point off the front is beaten by one on it
    for p in set(points) - set(front):
        assert any(dominates(q, p) for q in front)


def test_best_is_the_cheapest_setting_keeping_the_bar_else_the_best_psnr():
    result = Frontier((point(0.9, 50, "A"), point(0.5, 36, "A"), point(0.3, 30, "A"), point(0.2, 34, "B"),
                       point(0.6, 20, "B"), point(0.1, 60, "A", library="diffusers")), 1.0, 1.0, {}, {})
    best = result.best()
    assert (best["A"].flop_fraction, best["A"].psnr) == (0.5, 36)  # diffusers' cheaper point is not fxcache's
    assert (best["B"].flop_fraction, best["B"].psnr) == (0.2, 34)  # none keeps 35 dB: the best PSNR
    assert result.best(min_psnr=30)["A"].flop_fraction == 0.3
    with pytest.raises(ValueError, match="quality"):
        pareto_front(result.points, "speed")


class FixedCalibration:
    """What settings read from a calibration, fixed: enough to build every setting without generating."""

    num_steps = 20
    mag_ratios = (1.0,) * 20
    teacache_coefficients = (1.0, 0.0)
    clock = staticmethod(lambda: 500.0)


def test_every_pass_is_on_the_frontier_or_said_why_not():
    built: set[type] = set()
    for setting in frontier.settings(20):
        if setting.library != "fxcache":
            continue
        made = setting.make(FixedCalibration())
        built.update(type(p) for p in (made if isinstance(made, list) else [made]))
    missing = {name for name, cls in METHODS.items() if cls not in built and name not in frontier.LEFT_OUT}
    assert not missing, f"add these passes to fxcache/demo/frontier.py settings(): {sorted(missing)}"
    assert fx.FasterCache not in built and "FasterCache" in frontier.LEFT_OUT


def test_demo_runs_the_best_setting_of_each_method_and_says_when_there_is_none():
    from fxcache.demo.run import digits_methods

    methods = digits_methods(denoiser=None, num_steps=20, clock=FixedCalibration.clock,
                             best={"FirstBlockCache": "threshold=0.5", "TaylorSeer": "interval=3, order=1"},
                             calibration=FixedCalibration())
    assert methods["FirstBlockCache threshold=0.5"] == fx.FirstBlockCache(threshold=0.5)
    assert methods["TaylorSeer interval=3, order=1"].cache_interval == 3
    assert "PyramidAttentionBroadcast spatial every 2 (not on the frontier yet)" in methods
    assert not any("+" in name for name in methods)  # compositions stay on the frontier page
    shipped = frontier.load_best_settings()
    labels = {(s.method, s.label) for s in frontier.settings(20)}
    assert shipped and all((method, label) in labels for method, label in shipped.items())


def test_command_writes_the_page_and_cache_dit_agrees_on_the_steps_masks(tmp_path, monkeypatch):
    pytest.importorskip("cache_dit")
    from fxcache.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(["frontier", "--methods", "DBCache steps mask", "--libraries", "fxcache,cache-dit", "--steps", "6",
                 "--samples-per-class", "1", "--markdown", "page.md", "--png", "page.png", "--json", "points.json",
                 "--best-json", "best.json"]) == 0
    result = Frontier.from_json((tmp_path / "points.json").read_text())
    assert not result.failed, result.failed
    assert_libraries_agree(result, expected_points=6)
    assert min(p.flop_fraction for p in result.points) < 0.9  # the masks skip work
    page = (tmp_path / "page.md").read_text()
    assert "![frontier](page.png)" in page and "| DBCache steps mask | medium, static |" in page
    assert (tmp_path / "page.png").stat().st_size > 10_000
    assert set(json.loads((tmp_path / "best.json").read_text())) == {"DBCache steps mask"}
    # rerunning one method keeps the others' points; another grid cannot be mixed in
    assert main(["frontier", "--methods", "FirstBlockCache", "--libraries", "fxcache", "--steps", "6",
                 "--samples-per-class", "1", "--json", "points.json", "--update", "--png", "page.png"]) == 0
    updated = Frontier.from_json((tmp_path / "points.json").read_text())
    assert {p.method for p in updated.points} == {"DBCache steps mask", "FirstBlockCache"}
    assert updated.run["rerun_methods"] == ["FirstBlockCache"]
    with pytest.raises(ValueError, match="same settings"):
        updated.updated_with(dataclasses.replace(updated, run={**updated.run, "num_steps": 20}))


def assert_libraries_agree(result: Frontier, expected_points: int) -> None:
    by_setting: dict[tuple, dict[str, Point]] = {}
    for p in result.points:
        by_setting.setdefault((p.method, p.label), {})[p.library] = p
    assert sum(len(v) for v in by_setting.values()) == expected_points
    for libraries in by_setting.values():
        assert len(libraries) > 1 and "fxcache" in libraries
        ours = libraries["fxcache"]
        for peer in libraries.values():  # the same rule: the same work and the same images
            assert peer.flop_fraction == pytest.approx(ours.flop_fraction, abs=1e-9), peer
            assert peer.psnr == pytest.approx(ours.psnr, rel=1e-3) or peer.psnr == ours.psnr == math.inf, peer


def test_fxcache_diffusers_and_cache_dit_first_block_cache_give_one_point():
    pytest.importorskip("cache_dit")
    chosen = [s for s in frontier.settings(6) if s.method == "FirstBlockCache" and s.label == "threshold=0.3"]
    result = frontier.run_frontier(chosen, samples_per_class=1, num_steps=6, progress=False)
    assert not result.failed, result.failed
    assert_libraries_agree(result, expected_points=3)
    assert result.points[0].flop_fraction < 1.0


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="no frontier method named \\['FirstBlock'\\]; known: .*FirstBlockCache"):
        frontier.run_frontier(methods=["FirstBlock"], denoiser=object(), progress=False)
    with pytest.raises(ValueError, match="libraries must be among"):
        frontier.run_frontier(methods=["TeaCache"], libraries=["xdit"], denoiser=object(), progress=False)


def test_the_loop_gives_each_call_its_step_and_sigma_and_only_sea_cache_reads_them(monkeypatch):
    """The frontier's loop passes ``step_index``, ``sigma`` and ``num_inference_steps`` to every
    ``cache_context``, as diffusers' pipelines do, so SeaCache (fxcache's and diffusers') has what it
    filters by; every other method's images are those of a loop that passes nothing (so the points
    measured before the loop passed them stand), and SeaCache's equal diffusers'."""
    import torch

    from fxcache.demo import digits, quality
    from fxcache.testing import models

    denoiser, steps, labels = digits.load_digits_denoiser(), 6, torch.arange(digits.NUM_CLASSES)
    calibration = frontier.Calibration(denoiser, steps)
    firsts = {}
    for setting in frontier.settings(steps):
        if setting.library in ("fxcache", "diffusers") and (setting.method, setting.library) not in firsts:
            firsts[setting.method, setting.library] = setting
    chosen = [s for (method, _), s in firsts.items()
              if method in ("FirstBlockCache", "MagCache", "TaylorSeer", "PyramidAttentionBroadcast")]
    chosen += [s for s in frontier.settings(steps) if s.method == "SeaCache" and s.label == "threshold=0.8"]

    def images(setting, step_fields):
        monkeypatch.setattr(quality, "euler_sample", lambda *args, **kwargs: models.euler_sample(
            *args, **{**kwargs, "step_fields": step_fields}))
        model = quality._cached(denoiser.model, setting.make(calibration), "eager")
        with torch.no_grad():
            return quality.generate(model, denoiser, labels, num_steps=steps, clock=calibration.clock)

    sea = {}
    for setting in chosen:
        with_fields = images(setting, True)
        if setting.method == "SeaCache":
            sea[setting.library] = with_fields
        else:
            assert torch.equal(with_fields, images(setting, False)), setting.name
    assert set(sea) == {"fxcache", "diffusers"} and torch.equal(sea["fxcache"], sea["diffusers"])
    with torch.no_grad():
        uncached = quality.generate(denoiser.model, denoiser, labels, num_steps=steps)
    assert not torch.equal(sea["fxcache"], uncached), "SeaCache reused nothing"
