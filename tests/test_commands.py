"""The explain, calibrate and bench commands of ``python -m fxcache`` (demo: test_cli.py)."""

import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from fxcache.__main__ import main
from fxcache.cli import build_pass
from fxcache.passes import ConfigError, MagCache, TaylorSeer
from fxcache.passes.mag_cache import measure_mag_ratios
from fxcache.testing import models

ROOT = Path(__file__).resolve().parents[1]


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def test_calibrate_then_explain_with_the_ratio_file(tmp_path, capsys):
    """calibrate measures what measure_mag_ratios measures on the same loop and saves it; MagCache
    loads the file; explain plans with it and prints the schedule the loaded config decides."""
    steps = 8
    ratios_file, ratios_png, schedule_png = tmp_path / "ratios.json", tmp_path / "ratios.png", tmp_path / "plan.png"
    assert main(["calibrate", "--model", "flux", "--steps", str(steps), "--out", str(ratios_file),
                 "--set", "threshold=0.3", "--png", str(ratios_png)]) == 0
    calibrated = capsys.readouterr().out
    loaded = MagCache.from_file(ratios_file)
    tiny = models.build("flux")
    expected = measure_mag_ratios(tiny.model, lambda recorder: models.euler_sample(
        recorder, tiny, tiny.noise(seed=0), steps, ("cond", "uncond")))["cond"]
    assert loaded.mag_ratios.tolist() == pytest.approx(expected, rel=1e-6)
    assert loaded.threshold == 0.3 and loaded.num_inference_steps == steps
    row = "".join("C" if compute else "." for compute in loaded.schedule())
    assert f"computes {row}" in calibrated and f"MagCache.from_file('{ratios_file}')" in calibrated
    assert _png_size(ratios_png)[0] > 400

    assert main(["explain", "--method", "MagCache", "--ratios", str(ratios_file), "--steps", str(steps),
                 "--png", str(schedule_png)]) == 0
    explained = capsys.readouterr().out
    block_rows = [line.split() for line in explained.splitlines() if "blocks." in line and len(line.split()) == 2]
    assert len(block_rows) == len(models.build("flux").model.transformer_blocks) + \
        len(models.build("flux").model.single_transformer_blocks)
    assert all(pattern == row for _, pattern in block_rows)
    assert "predicted fraction of FLOPs executed" in explained
    assert _png_size(schedule_png)[0] > 400


def test_build_pass_reads_fields_as_literals():
    taylor = build_pass("TaylorSeer", 10, ["cache_interval=3", "taylor_factors_dtype=torch.float32",
                                           "skip_predict_identifiers=('proj_out',)"])
    assert taylor == TaylorSeer(cache_interval=3, taylor_factors_dtype=__import__("torch").float32,
                                skip_predict_identifiers=("proj_out",))
    assert build_pass("PyramidAttentionBroadcast", 10).spatial_attention_block_skip_range == 2
    assert build_pass("MagCache", 12).num_inference_steps == 12
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        build_pass("TaylorSeer", 10, ["cache_interval"])
    with pytest.raises(ConfigError, match="no_such_field"):
        build_pass("TaylorSeer", 10, ["no_such_field=1"])


def test_explain_refuses_to_draw_a_dynamic_pass(tmp_path):
    with pytest.raises(SystemExit, match="no schedule ahead of time"):
        main(["explain", "--method", "FirstBlockCache", "--png", str(tmp_path / "x.png")])


def test_bench_dry_prints_the_side_by_side_table(tmp_path):
    """The benchmark ships in the package (fxcache.demo.bench): run from a directory with no checkout in it,
    one method, two steps; the uncached whole-graph row is there and both limits are filled in."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "fxcache", "bench", "--dry", "--steps", "2", "--repeats", "1",
                           "--methods", "fbc-forced"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    labels = [line.split("|")[1].strip() for line in table[1:]]
    assert "uncached eager" in labels
    assert any(label.startswith("uncached whole-graph compile") for label in labels)
    assert any(label.endswith("fxcache eager") for label in labels)
    assert any(label.endswith("diffusers eager") for label in labels)
    assert "process time" in done.stdout
    whole_limit = table[0].split("|").index(" whole-graph limit s ")
    assert all(row.split("|")[whole_limit].strip() != "-" for row in table[1:])


def test_bench_runs_only_the_uncached_rows_asked_for_and_names_an_unknown_one():
    from fxcache.demo import bench

    rows = bench.main(["--dry", "--steps", "2", "--repeats", "1", "--methods", "", "--peers", "",
                       "--uncached", "whole"])
    assert [row.label for row in rows] == ["uncached whole-graph compile (fullgraph, eager)"]
    assert rows[0].whole_graph_limit_seconds == rows[0].seconds and rows[0].regional_limit_seconds is None
    with pytest.raises(SystemExit, match=r"unknown uncached rows \['warm'\]; choose from eager, regional, whole"):
        bench.main(["--dry", "--uncached", "whole,warm"])
