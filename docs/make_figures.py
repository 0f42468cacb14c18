"""Draw the figures of the docs (deterministic: fixed seeds, no timestamps in the files).

    python docs/make_figures.py            # all of them
    python docs/make_figures.py exits      # one: easy-hard, exits or accuracy

- ``docs/img/easy-hard.png`` (concepts page): easy and hard points of a two-class problem.
- ``docs/img/exits.svg`` (home page): exit heads on a ResNet-18, each stage as long as its share of
  the MACs (counted by ``bx.list_exit_points``), and where samples leave.
- ``docs/img/accuracy-vs-macs.png`` (home page): the demo's accuracy-against-compute plot, from a
  run of ``python -m branchify.commands.demo`` (trains for a minute or two on digits).

Needs matplotlib and scikit-learn (``pip install -e ".[dev]"``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed, and the same pixels on every machine

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

SEED = 7
IMG = Path(__file__).parent / "img"
OUT = IMG / "easy-hard.png"
EXITS_OUT = IMG / "exits.svg"
ACCURACY_OUT = IMG / "accuracy-vs-macs.png"
COLOURS = ("#1f77b4", "#d62728")


def two_classes(n: int = 600, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Points in a box, labelled by which side of a wavy curve they fall on."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-3, 3, size=(n * 2, 2))
    margin = x[:, 1] - (0.9 * np.sin(1.4 * x[:, 0]) + 0.35 * x[:, 0])
    keep = np.abs(margin) > 0.12  # a thin empty strip keeps the classes separable by the true curve
    x, margin = x[keep][:n], margin[keep][:n]
    return x, (margin > 0).astype(int)


def hard_band(linear: LogisticRegression, x: np.ndarray, y: np.ndarray) -> float:
    """The smallest half-width (in distance to the line) outside which the straight line makes no mistake."""
    distance = linear.decision_function(x) / np.linalg.norm(linear.coef_)
    wrong = linear.predict(x) != y
    return float(np.abs(distance[wrong]).max()) if wrong.any() else 0.0


def draw(path: Path = OUT) -> dict[str, float]:
    x, y = two_classes()
    linear = LogisticRegression().fit(x, y)
    expressive = SVC(kernel="rbf", C=30.0, gamma=1.0).fit(x, y)
    half_width = hard_band(linear, x, y)
    distance = linear.decision_function(x) / np.linalg.norm(linear.coef_)
    hard = np.abs(distance) <= half_width
    easy = ~hard
    facts = {
        "easy_share": float(easy.mean()),
        "linear_on_easy": float((linear.predict(x[easy]) == y[easy]).mean()),
        "linear_on_hard": float((linear.predict(x[hard]) == y[hard]).mean()),
        "expressive_on_hard": float((expressive.predict(x[hard]) == y[hard]).mean()),
    }

    grid = np.linspace(-3, 3, 400)
    gx, gy = np.meshgrid(grid, grid)
    cells = np.c_[gx.ravel(), gy.ravel()]
    line = linear.decision_function(cells).reshape(gx.shape) / np.linalg.norm(linear.coef_)
    curve = expressive.decision_function(cells).reshape(gx.shape)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), sharex=True, sharey=True)
    for ax in axes:
        ax.contourf(gx, gy, np.abs(line) <= half_width, levels=[0.5, 1.5], colors=["#f2e6c9"])
        for label in (0, 1):
            mask = y == label
            ax.scatter(*x[mask & easy].T, s=10, color=COLOURS[label], alpha=0.35, linewidths=0)
            ax.scatter(*x[mask & hard].T, s=18, facecolors="none", edgecolors=COLOURS[label], linewidths=0.9)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    left, right = axes
    left.contour(gx, gy, line, levels=[0], colors="black", linewidths=1.6)
    left.contour(gx, gy, line, levels=[-half_width, half_width], colors="black", linewidths=0.9, linestyles="--")
    left.set_title(
        f"A straight line: right on all {facts['easy_share']:.0%} of points outside the band,\n"
        f"{facts['linear_on_hard']:.0%} of the (hollow) points inside it", fontsize=10)
    right.contour(gx, gy, line, levels=[0], colors="black", linewidths=0.8, alpha=0.4)
    right.contour(gx, gy, curve, levels=[0], colors="#2ca02c", linewidths=1.8)
    right.set_title(
        "An expressive boundary (green): needed only inside the band,\n"
        f"where it gets {facts['expressive_on_hard']:.0%} of the points right", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return facts


def stage_fractions(exit_layers: tuple[str, ...] = ("layer1", "layer2")) -> list[tuple[str, float]]:
    """Each stage of a ResNet-18 on 32x32 inputs with the share of the MACs up to its end."""
    import torch
    import torchvision

    import branchify as bx

    model = torchvision.models.resnet18(num_classes=10)
    points = {p.name: p.macs_fraction for p in bx.list_exit_points(model, torch.zeros(1, 3, 32, 32))}
    stages = [("stem", points["maxpool"])]
    stages += [(f"layer{i}", points[f"layer{i}"]) for i in range(1, 5)]
    stages.append(("fc", 1.0))
    assert all(layer in dict(stages) for layer in exit_layers)
    return stages


def draw_exits(path: Path = EXITS_OUT) -> dict[str, float]:
    """The backbone's stages in a row, as long as their MACs, with two exit heads and three samples."""
    stages = stage_fractions()
    ends = dict(stages)
    exits = [("layer1", "exit 0"), ("layer2", "exit 1")]
    width, left = 10.0, 1.3  # the backbone spans [left, left + width]: x = left + width * MAC fraction
    x_of = lambda fraction: left + width * fraction  # noqa: E731
    colours = {"easy": "#2ca02c", "medium": "#ff7f0e", "hard": "#d62728"}

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "branchify", "font.size": 10})
    fig, ax = plt.subplots(figsize=(12.5, 4.6))
    ax.set_xlim(-0.2, 13.6)
    ax.set_ylim(-3.4, 2.4)
    ax.axis("off")

    def box(x0, x1, y0, y1, text, face, edge="#333333", size=10, **kw):
        ax.add_patch(FancyBboxPatch((x0, y0), x1 - x0, y1 - y0, boxstyle="round,pad=0,rounding_size=0.08",
                                    facecolor=face, edgecolor=edge, linewidth=1.1))
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, text, ha="center", va="center", fontsize=size, **kw)

    def arrow(start, end, colour="#333333", width=1.3, style="-|>", **kw):
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=colour,
                                     linewidth=width, shrinkA=0, shrinkB=0, **kw))

    # The backbone: the unmodified model, stage by stage.
    y0, y1 = 0.0, 0.8
    box(-0.1, 0.9, y0, y1, "input", "white")
    arrow((0.9, 0.4), (left, 0.4))
    start = 0.0
    for name, end in stages:
        x0, x1 = x_of(start), x_of(end)
        if name == "fc":  # too thin to see at its true length
            x1 = x0 + 0.35
        box(x0, x1, y0, y1, name, "#dbe6f4" if name != "fc" else "#c7d7ee", size=10 if name != "fc" else 8)
        start = end
    final_x = x_of(1.0) + 0.35
    arrow((final_x, 0.4), (final_x + 0.45, 0.4))
    box(final_x + 0.45, final_x + 1.75, y0, y1, "final\nprediction", "white", size=9)

    # The exit heads: attached after a stage, reading its activation.
    for layer, label in exits:
        x = x_of(ends[layer])
        arrow((x, y0), (x, -0.55))
        box(x - 0.85, x + 0.85, -1.25, -0.55, f"{label} head\npool + linear", "#fdf0d5", size=8.5)
        arrow((x, -1.25), (x, -1.65))
        ax.text(x, -1.95, "confident: leave\nnot: go on", ha="center", va="center", fontsize=8.5, style="italic")

    # Three samples, each drawn up to where it leaves; the line's length is the compute it costs.
    lanes = [("easy", "leaves at exit 0", ends["layer1"], 1.45), ("medium", "leaves at exit 1", ends["layer2"], 1.8),
             ("hard", "runs to the end", 1.0, 2.15)]
    for kind, where, fraction, y in lanes:
        arrow((x_of(0.0), y), (x_of(fraction), y), colour=colours[kind], width=2.2)
        ax.plot([x_of(fraction)], [y], "o", color=colours[kind], ms=6)
        ax.plot([x_of(fraction)] * 2, [y1, y], color=colours[kind], linewidth=0.8, linestyle=":")
        ax.text(x_of(fraction) + 0.15, y, f"{kind}: {where}, {fraction:.0%} of the MACs",
                color=colours[kind], fontsize=9, va="center")

    # The compute axis under everything.
    ax.plot([x_of(0), x_of(1)], [-2.6, -2.6], color="#888888", linewidth=0.8)
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        ax.plot([x_of(fraction)] * 2, [-2.65, -2.55], color="#888888", linewidth=0.8)
        ax.text(x_of(fraction), -2.75, f"{fraction:.0%}", ha="center", va="top", fontsize=8, color="#555555")
    ax.text(x_of(0.5), -3.0, "MACs spent so far, as a share of the original model's\n(the model you already "
            "have, a ResNet-18 on 32x32 inputs: each stage is drawn as long as its MACs)", ha="center", va="top",
            fontsize=8.5, color="#555555")

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", pad_inches=0.05, metadata={"Date": None, "Creator": None})
    plt.close(fig)
    plt.rcdefaults()
    return {layer: ends[layer] for layer, _ in exits}


def draw_accuracy(path: Path = ACCURACY_OUT) -> Path:
    """The demo's accuracy-against-compute plot: a fresh run of the demo, its PNG copied here."""
    import shutil
    import tempfile

    from branchify.commands import demo

    with tempfile.TemporaryDirectory() as folder:
        demo.main(["--out", folder, "--no-progress"])
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(folder) / "accuracy_vs_macs.png", path)
    return path


if __name__ == "__main__":
    import sys

    wanted = set(sys.argv[1:]) or {"easy-hard", "exits", "accuracy"}
    if "easy-hard" in wanted:
        facts = draw()
        print(f"wrote {OUT}: " + ", ".join(f"{k}={v:.3f}" for k, v in facts.items()))
    if "exits" in wanted:
        fractions = draw_exits()
        print(f"wrote {EXITS_OUT}: " + ", ".join(f"{k} at {v:.1%} of the MACs" for k, v in fractions.items()))
    if "accuracy" in wanted:
        print(f"wrote {draw_accuracy()}")
