"""Tracing each block kind once, checked on every model of the coverage registry: the capture must be
the full trace's node for node (example values and their aliasing included), and its guards must say
what the full capture's say after each change to the last block of every block list (a block whose
body dynamo reused from the first of its kind).

    python -m tests.capture_by_kind_registry              # every case, ~5 min on a CPU
    python -m tests.capture_by_kind_registry --only flux,wan

Prints one row per model and exits non-zero if any capture differs or any guard disagrees.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from fxcache.capture import CaptureError, capture

from .model_registry import CASES
from .test_capture_by_kind import _last_blocks, _structure, changes, verdicts


def check(case) -> dict:
    tiny = case.build()
    kwargs = tiny.inputs(tiny.noise(seed=1), sigma=0.5)
    try:
        full = capture(tiny.model, (), kwargs, by_kind=False)
    except CaptureError as error:
        return {"model": case.name, "note": f"not captured whole ({str(error)[:60]}...)"}
    by_kind = capture(tiny.model, (), kwargs, by_kind=True)
    row = {"model": case.name, "traced": by_kind.traced_by_kind,
           "graph equal": _structure(by_kind.graph_module) == _structure(full.graph_module)}
    f_locals = {"model": tiny.model, "args": (), "kwargs": kwargs}
    agree = disagree = seen = 0
    wrong = []
    for block in _last_blocks(tiny.model):
        for name, do, undo in changes(block):
            ours, reference = verdicts([by_kind, full], f_locals, do, undo)
            agree += ours == reference
            disagree += ours != reference
            seen += not reference
            if ours != reference:
                wrong.append(name)
    row.update(agree=agree, disagree=disagree, seen=seen, wrong=wrong[:3])
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated case names")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    only = set(args.only.split(",")) if args.only else None
    failed = 0
    print("| model | blocks, bodies traced | graph equal | changes: guards agree / disagree (seen by both) |")
    print("|---|---|---|---|")
    for case in CASES:
        if only and case.name not in only:
            continue
        torch._dynamo.reset()
        try:
            row = check(case)
        except Exception as error:  # a model this check cannot run is a row, not the end of the run
            row = {"model": case.name, "note": f"error: {type(error).__name__}: {str(error)[:80]}"}
            failed += 1
        if "note" in row:
            print(f"| {row['model']} | {row['note']} | | |", flush=True)
            continue
        traced = row["traced"]
        kinds = f"{traced['blocks']}, {traced['bodies']}" if traced else "traced whole (fell back)"
        failed += (not row["graph equal"]) + (row["disagree"] > 0)
        print(f"| {row['model']} | {kinds} | {'yes' if row['graph equal'] else 'NO'} | {row['agree']} / "
              f"{row['disagree']} ({row['seen']})" + (f" {row['wrong']}" if row["wrong"] else "") + " |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
