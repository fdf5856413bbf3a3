"""The examples in examples/ as smoke tests: each runs offline in a fresh interpreter, as a user would
run it, and its printed result is checked."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str) -> str:
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                       OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def number_after(label: str, text: str) -> float:
    match = re.search(re.escape(label) + r" ([-+0-9.e]+)", text)
    assert match, f"{label!r} not in {text!r}"
    return float(match.group(1))


def test_flux_pipeline_example_skips_and_repeats():
    out = run_example("flux_pipeline.py")
    computed, calls = map(int, re.search(r"on (\d+) of (\d+) calls", out).groups())
    assert 0 < computed < calls
    assert 0 < number_after("relative difference to uncached", out) < 0.1
    assert "repeatable: True" in out and "image 16x16" in out


def test_local_checkpoint_example_equals_diffusers_hook():
    out = run_example("local_checkpoint.py")
    assert "FluxTransformer2DModel transformed" in out
    assert number_after("on the in-memory pipeline", out) < 1e-5


def test_wan22_example_caches_both_transformers():
    out = run_example("wan22_two_transformers.py")
    for name in ("transformer", "transformer_2"):
        line = next(line for line in out.splitlines() if line.startswith(f"{name}:"))
        counts = dict(re.findall(r"'(\w+)': (\d+)", line))
        assert set(counts) == {"cond", "uncond"} and all(int(c) >= 1 for c in counts.values())
    assert 0 < number_after("relative difference to uncached", out) < 0.1
    assert "video 5 frames of 32x32" in out
