"""Before and after: the runner of a base revision against this tree's, in one process, interleaved.

The base revision's ``branchify`` is exported with ``git archive`` into a temporary folder and imported
beside this tree's under the name ``branchify_base`` (the package imports itself relatively). Both build
a runner on the same model, weights and thresholds (``benchmarks/runtime.py``'s ``build``; the base's
module gets this tree's exit heads and spec), checked to give equal logits and exit indices on the batch
and on every sample run alone. Four variants then run interleaved (``runtime.benchmark.interleaved``,
the order rotating every repeat): each tree's runner (b) and measured ideal (c). Printed per batch size:
the paired medians (over repeats, of each repeat's ratios) of the overhead (b - c) / b of each tree, and
of the runner's time base / this tree (above 1: this tree is faster). Batch 1 runs ``--singles`` samples
of the batch one at a time, with its mix of exits (``runtime.single_picks``).

    python benchmarks/runtime_ab.py --base main --model resnet18 --threads 1 --clock cpu --repeats 61
    python benchmarks/runtime_ab.py --base HEAD~3 --model bert4 --repeats 15 --singles 16

On a loaded machine read the paired figures, and run one thread with the CPU clock (``--clock cpu``: this
process's CPU time, which leaves out the time other processes hold the core).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import runtime as rb  # benchmarks/runtime.py: this script's folder comes first on sys.path
import torch

from branchify.runtime import benchmark

REPO = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def import_base(rev: str, folder: Path):
    """The ``branchify`` package of revision ``rev``, exported into ``folder`` and imported as ``branchify_base``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "branchify"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    (folder / "branchify").rename(folder / "branchify_base")
    sys.path.insert(0, str(folder))
    return importlib.import_module("branchify_base")


def base_runner(base, setup: rb.Setup, example):
    """A runner of the base package on ``setup``'s model, with its module's spec and exit heads."""
    module = setup.module
    spec = base.ExitSpec.model_validate(module.exit_spec.model_dump())
    twin = base.attach_exits(setup.model, spec, example).eval()
    twin.exit_heads.load_state_dict(module.exit_heads.state_dict())
    return base.ExitRunner(twin, example_inputs=example)


def same(r1, r2) -> bool:
    return torch.equal(r1.logits, r2.logits) and torch.equal(r1.exit_index, r2.exit_index)


def paired(totals: dict[str, list[float]]) -> tuple[float, float, float]:
    """Paired medians: each tree's overhead (b - c) / b, and the runner's time base / new."""
    def median(f):
        return statistics.median(f(*r) for r in zip(*(totals[n] for n in ("b base", "c base", "b new", "c new"))))
    return (median(lambda bb, cb, bn, cn: (bb - cb) / bb), median(lambda bb, cb, bn, cn: (bn - cn) / bn),
            median(lambda bb, cb, bn, cn: bb / bn))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the git revision to compare with (e.g. main, HEAD~2)")
    parser.add_argument("--model", choices=sorted(rb.SIZES), default="resnet18")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--singles", type=int, default=16, help="samples run one at a time for batch 1")
    parser.add_argument("--repeats", type=int, default=61)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    args = parser.parse_args()
    if args.clock == "cpu":
        benchmark.clock = time.process_time
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--", "branchify") else ""
    print(f"load at start: {rb.load()}")
    print(f"base {args.base} = {git('rev-parse', '--short', args.base)}; new: this tree at "
          f"{git('rev-parse', '--short', 'HEAD')}{dirty}; torch {torch.__version__}, {args.threads} threads, "
          f"{args.clock} clock, {args.repeats} repeats", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = import_base(args.base, Path(tmp))
        setup = rb.build(args.model, args.size or rb.SIZES[args.model], args.batch)
        x, new = setup.inputs, setup.runner
        example = rb.take(x, slice(0, 1))
        old = base_runner(base, setup, example)
        with torch.inference_mode():
            result = new(x)
            equal = same(result, old(x))
            k = len(new.heads)
            picks = rb.single_picks(result.exit_index, k, args.singles)
            singles = [rb.take(x, slice(j, j + 1)) for j in picks.tolist()]
            alone = [(new(s), old(s)) for s in singles]
        equal_alone = all(same(a, b) for a, b in alone)
        print(f"{setup.description}; leaving at exits {'/'.join(map(str, range(k)))}/final: "
              f"{result.exit_index.bincount(minlength=k + 1).tolist()} of {args.batch}; "
              f"equal logits and exit indices, base and new: batch {equal}, each of {len(singles)} samples alone "
              f"{equal_alone}", flush=True)
        if not (equal and equal_alone):
            raise SystemExit("the two trees disagree: no timing")

        def unit(inputs, taken_new, taken_old):
            return {"b base": functools.partial(old, inputs),
                    "c base": rb.ideal(old, rb.stage_values(old, inputs), taken_old),
                    "b new": functools.partial(new, inputs),
                    "c new": rb.ideal(new, rb.stage_values(new, inputs), taken_new)}

        rows = [(f"{args.batch}", [unit(x, result.exit_index, result.exit_index)]),
                (f"1 (x{len(singles)})", [unit(s, a.exit_index, b.exit_index) for s, (a, b) in zip(singles, alone)])]
        print(f"{'batch':<10} {'overhead base':>14} {'overhead new':>13} {'runner base/new':>16}   "
              f"{'b base ms':>10} {'b new ms':>9} {'c new ms':>9}")
        for label, units in rows:
            totals = benchmark.interleaved(units, args.repeats)
            before, after, ratio = paired(totals)
            b_base, b_new, c_new = (statistics.median(totals[n]) * 1e3 for n in ("b base", "b new", "c new"))
            print(f"{label:<10} {100 * before:13.1f}% {100 * after:12.1f}% {ratio:16.3f}   "
                  f"{b_base:10.2f} {b_new:9.2f} {c_new:9.2f}", flush=True)
    print(f"load at end: {rb.load()}")


if __name__ == "__main__":
    main()
