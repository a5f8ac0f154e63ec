"""``python -m flame.utils.plot <dump_folder> [<dump_folder> ...] [-o out.png]``

Loss, validation loss and learning rate against steps, and loss against tokens, for one or many
runs (one line per run, named after its dump folder), read from each run's ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def read_metrics(folder: str) -> list[dict[str, Any]]:
    """The records of ``<folder>/metrics.jsonl``; raises FileNotFoundError with the path."""
    path = os.path.join(folder, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(folders: list[str], output: str, names: list[str] | None = None) -> str:
    """Draw the four panels for ``folders`` into ``output`` (PNG, 1600 x 1000 pixels); return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = names or [os.path.basename(os.path.abspath(f)) for f in folders]
    fig, axes = plt.subplots(2, 2, figsize=(16, 10), dpi=100)
    panels = [
        (axes[0][0], "step", "loss", "training loss"),
        (axes[0][1], "step", "validation_loss", "validation loss"),
        (axes[1][0], "step", "lr", "learning rate"),
        (axes[1][1], "tokens_seen", "loss", "training loss against tokens"),
    ]
    for folder, name in zip(folders, names, strict=True):
        records = read_metrics(folder)
        for ax, x_key, y_key, _ in panels:
            points = [(r[x_key], r[y_key]) for r in records if r.get(x_key) is not None and r.get(y_key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=name, marker="o" if len(points) < 20 else None)
    for ax, x_key, _, title in panels:
        ax.set_title(title)
        ax.set_xlabel("tokens" if x_key == "tokens_seen" else "step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flame.utils.plot", description=__doc__.split("\n\n")[1])
    parser.add_argument("folders", nargs="+", help="dump folders holding metrics.jsonl")
    parser.add_argument("-o", "--output", default="", help="PNG to write (default: <first folder>/metrics.png)")
    parser.add_argument("--names", default="", help="comma list of legend names (default: the folder names)")
    args = parser.parse_args(argv)
    missing = [f for f in args.folders if not os.path.isfile(os.path.join(f, "metrics.jsonl"))]
    if missing:
        print(f"flame.utils.plot: error: no metrics.jsonl in {', '.join(missing)}", file=sys.stderr)
        return 2
    names = args.names.split(",") if args.names else None
    if names and len(names) != len(args.folders):
        print(
            f"flame.utils.plot: error: --names has {len(names)} names for {len(args.folders)} folders", file=sys.stderr
        )
        return 2
    output = args.output or os.path.join(args.folders[0], "metrics.png")
    print(plot_runs(args.folders, output, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
