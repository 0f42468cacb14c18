"""Draw the figures of the docs (deterministic: fixed seed, no timestamps in the PNG).

    python docs/make_figures.py        # writes docs/img/easy-hard.png

Needs matplotlib and scikit-learn (``pip install -e ".[dev]"``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed, and the same pixels on every machine

import matplotlib.pyplot as plt
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

SEED = 7
OUT = Path(__file__).parent / "img" / "easy-hard.png"
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


if __name__ == "__main__":
    facts = draw()
    print(f"wrote {OUT}: " + ", ".join(f"{k}={v:.3f}" for k, v in facts.items()))
