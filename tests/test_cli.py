"""The README's main job, as a smoke test."""

import subprocess
import sys

from fxcache.demo import format_rows, run_demo


def test_demo_reports_skipped_work_flops_and_difference():
    rows = run_demo(threshold=0.3, steps=6, progress=False)
    uncached, cached = rows
    assert uncached.skipped == 0 and cached.computed + cached.skipped == uncached.computed == 12
    assert cached.skipped > 0 and cached.flops < uncached.flops
    assert 0 < cached.relative_difference < 0.1
    table = format_rows(rows)
    assert "FirstBlockCache(threshold=0.3)" in table and "FLOP frac" in table


def test_cli_demo_runs():
    done = subprocess.run([sys.executable, "-m", "fxcache", "demo", "--steps", "4"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "uncached" in done.stdout and "FirstBlockCache" in done.stdout
