"""Training curves as a PNG, from the metrics.jsonl the loop writes."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = [
    ("loss", ["loss", "eval/loss"]),
    ("reward accuracy", ["rewards/accuracies", "eval/rewards/accuracies"]),
    ("reward margin", ["rewards/margins", "eval/rewards/margins"]),
    ("rewards", ["rewards/chosen", "rewards/rejected"]),
]


def plot_metrics(metrics_file: str | Path, out_png: str | Path) -> Path | None:
    """Four panels (loss, accuracy, margin, rewards); train lines solid, eval points dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    if not records:
        return None
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (title, keys) in zip(axes, PANELS):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                xs, ys = zip(*points)
                style = "o--" if key.startswith("eval/") else "-"
                ax.plot(xs, ys, style, label=key, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
