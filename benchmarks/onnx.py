"""The single-file ONNX export against the plain ONNX model, on resnet50 at 224 with random weights, onnxruntime CPU.

Exits after layer1, layer2 and layer3 with entropy thresholds at quantiles of each head's scores on the
benchmark batch, so that 50% / 25% / 12.5% of the samples leave at exits 0 / 1 / 2 and 12.5% go to the end
(``benchmarks/runtime.py``'s mix and helpers). Timed in one run, interleaved, median and best of the repeats:

- (a) the plain ONNX export of the original model (``torch.onnx.export``, batch dim dynamic);
- (b) ``runner.export_onnx``: the one file that routes each sample itself;
- (b') the same file with every weight moved to the top-level graph, read by the branches from the outer scope
  (onnxruntime's NCHWc layout transformer then leaves the convolutions alone);
- (c) the ideal: each piece of (b) (stage, head, criterion) as its own onnxruntime session, run directly on
  exactly the samples that reach it (the sub-batches are prepared beforehand), no routing;
- at batch 1 also the torch model (t) and ``bx.ExitRunner`` (r), for the runner's own speedup t/r.

Targets (issue 14, 2 CPU cores): a/b >= 1.4 at batch 64; at batch 1, a/b >= 0.9 of the torch runner's t/r;
efficiency c/b >= 0.9.

Run it as a module from the repository's root: as a script its folder would come first on ``sys.path``, and
this file, ``onnx.py``, would shadow the ``onnx`` package.

    python -m benchmarks.onnx                 # 7 repeats, 2 threads
    python -m benchmarks.onnx --threads 1     # on a loaded machine
    python -m benchmarks.onnx --quick         # 2 repeats, 16 samples at batch 1
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run this benchmark as `python -m benchmarks.onnx` from the repository's root: as a script, "
                     "its folder comes first on sys.path and this file (onnx.py) would shadow the onnx package")

import argparse
import functools
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from benchmarks.runtime import LAYERS, resnet50_with_exits, timed
from branchify.runtime.onnx_export import export_pieces


def session(model, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def weights_outside(model):
    """(b'): a copy of ``model`` with the initializers of every If branch moved to the top-level graph."""
    model = onnx.ModelProto.FromString(model.SerializeToString())

    def lift(graph) -> None:
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    lift(attr.g)
                    model.graph.initializer.extend(attr.g.initializer)
                    del attr.g.initializer[:]

    lift(model.graph)
    return model


def plain_onnx(model: torch.nn.Module, x: torch.Tensor, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: batch},))
        torch.onnx.export(program, (), str(path), dynamo=True, input_names=["x"], verbose=False, external_data=False)
    return path


def ideal(pieces: list, sessions: list[ort.InferenceSession], x: np.ndarray,
          exit_index: np.ndarray) -> Callable[[], None]:
    """(c): each piece's session on exactly the samples that reach it, inputs prepared beforehand."""
    work = []
    values, taken = [x], exit_index
    for piece, sess in zip(pieces, sessions):
        if len(taken) == 0:
            break
        names = [i.name for i in sess.get_inputs()]
        feeds = dict(zip(names, values + [a.numpy() for a in piece.inputs[len(values):]]))
        work.append((sess, feeds))
        out = sess.run(None, feeds)[:piece.carried_out]
        keep = taken > piece.index
        values, taken = [v[keep] for v in out], taken[keep]

    def run() -> None:
        for sess, feeds in work:
            sess.run(None, feeds)

    return run


def report(label: str, times: tuple[dict[str, float], dict[str, float]], torch_too: bool) -> None:
    for kind, t in zip(("median", "best"), times):
        a, b, c = t["a"], t["b"], t["c"]
        line = (f"{label:<10} {kind:<6} {a * 1e3:9.1f} {b * 1e3:9.1f} {c * 1e3:9.1f}   {a / b:6.2f}x {c / b:6.3f}")
        if torch_too:
            speedup = t["t"] / t["r"]
            line += (f"   {t['t'] * 1e3:9.1f} {t['r'] * 1e3:9.1f} {speedup:6.2f}x   {a / b / speedup:6.3f}")
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats and 16 samples at batch 1")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7, quick 2)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 7)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device = torch.device("cpu")
    model, x, module, runner = resnet50_with_exits(args.batch)
    with torch.inference_mode():
        taken = runner(x).exit_index

    folder = Path(tempfile.mkdtemp())
    path = runner.export_onnx(folder / "routed.onnx", example_inputs=x[:1])
    routed = session(path, args.threads)
    outside = session(weights_outside(onnx.load(str(path))), args.threads)
    plain = session(plain_onnx(model, x, folder / "plain.onnx"), args.threads)
    pieces = export_pieces(runner, x[:1])
    piece_sessions = [session(p.model, args.threads) for p in pieces]
    xs = x.numpy()

    logits, onnx_taken = routed.run(None, {"x": xs})
    mix = np.bincount(onnx_taken, minlength=len(LAYERS) + 1).tolist()
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} thread(s), resnet50 224x224, "
          f"exits after {', '.join(LAYERS)}; samples leaving at exits 0/1/2/final: {mix} of {len(x)}; "
          f"exit_index as the runner's: {int((onnx_taken == taken.numpy()).sum())}/{len(x)}")
    print(f"{'batch':<10} {'time':<6} {'a plain':>9} {'b routed':>9} {'c ideal':>9}   {'a/b':>7} {'c/b':>6}"
          f"   {'t torch':>9} {'r runner':>9} {'t/r':>7}   {'(a/b)/(t/r)':>6}")

    def onnx_run(sess: ort.InferenceSession, inputs: np.ndarray) -> None:
        sess.run(None, {"x": inputs})

    t = timed([{"a": functools.partial(onnx_run, plain, xs), "b": functools.partial(onnx_run, routed, xs),
                "c": ideal(pieces, piece_sessions, xs, onnx_taken), "o": functools.partial(onnx_run, outside, xs)}],
              repeats, device)
    report(f"{len(x)}", t, torch_too=False)
    median, best = t
    print(f"{'':<10} weights in the outer scope (b'): median {median['o'] * 1e3:.1f} ms, b'/b "
          f"{median['o'] / median['b']:.2f}; best {best['o'] * 1e3:.1f} ms, b'/b {best['o'] / best['b']:.2f}",
          flush=True)

    # Batch 1: a subset of the same samples one at a time, with the same mix of exits.
    counts = [8, 4, 2, 2] if args.quick else [16, 8, 4, 4]
    picks = np.concatenate([np.flatnonzero(onnx_taken == e)[:n] for e, n in enumerate(counts)])
    singles = [xs[j:j + 1].copy() for j in picks]
    single_taken = [routed.run(None, {"x": s})[1] for s in singles]
    flips = sum(int(e[0] != onnx_taken[j]) for e, j in zip(single_taken, picks))
    units = [{"a": functools.partial(onnx_run, plain, s), "b": functools.partial(onnx_run, routed, s),
              "c": ideal(pieces, piece_sessions, s, e),
              "t": functools.partial(model, torch.from_numpy(s)), "r": functools.partial(runner, torch.from_numpy(s))}
             for s, e in zip(singles, single_taken)]
    t = timed(units, repeats, device)
    report(f"1 (x{len(singles)})", t, torch_too=True)
    if flips:
        print(f"({flips} of {len(singles)} samples take another exit at batch 1 than at batch {len(x)}: "
              "batch-size-dependent rounding near a threshold)")


if __name__ == "__main__":
    main()
