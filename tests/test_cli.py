"""The README's main job, as a smoke test."""

import subprocess
import sys

from fxcache.demo import format_rows, run_demo
from fxcache.demo.frontier import load_best_settings


def test_demo_reports_skipped_work_flops_and_difference():
    rows = run_demo(threshold=0.3, steps=6, progress=False)
    uncached, cached = rows
    assert uncached.skipped == 0 and cached.computed + cached.skipped == uncached.computed == 12
    assert cached.skipped > 0 and cached.flops < uncached.flops
    assert 0 < cached.relative_difference < 0.1
    table = format_rows(rows)
    assert "FirstBlockCache(threshold=0.3)" in table and "FLOP frac" in table


def test_cli_demo_on_the_digits_model_prints_every_pass_and_saves_the_grid(tmp_path):
    out = tmp_path / "grid.png"
    done = subprocess.run([sys.executable, "-m", "fxcache", "demo", "--steps", "6", "--samples-per-class", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = {line.split("  ")[0]: line.split() for line in done.stdout.splitlines()}
    fractions = []
    for method, label in load_best_settings().items():  # every pass at its best setting on the frontier
        (row,) = [r for name, r in rows.items() if name == f"{method} {label}"]
        flop_fraction, accuracy = float(row[-5]), float(row[-1])
        assert 0 < flop_fraction <= 1 and 0 <= accuracy <= 1
        fractions.append(flop_fraction)
    # settings chosen at 20 steps: at 6 some skip nothing, most still skip
    assert sum(f < 1 for f in fractions) > len(fractions) / 2, fractions
    assert out.stat().st_size > 10_000


def test_cli_demo_on_a_random_weight_model_runs():
    done = subprocess.run([sys.executable, "-m", "fxcache", "demo", "--model", "wan", "--steps", "4"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "uncached" in done.stdout and "FirstBlockCache" in done.stdout
