"""bench.png: tok/s, bytes per token and hit rate against the budget, PREDICTED beside measured.

matplotlib is optional (``pip install 'offload-engine[plot]'``) and imported only here.
One legend, below the panels, names every line of every panel (solid: measured, dashed:
PREDICTED), so no panel's legend hides a line; log axes are labelled in plain numbers.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
PANELS = (("decode_tokens_per_s", "predicted_tokens_per_s", "decode tokens/s", 1.0),
          ("h2d_bytes_per_token", "predicted_bytes_per_token", "host->device MB per token",
           1e-6),
          ("hit_rate", "predicted_hit_rate", "hit rate", 1.0))


def plot(rows: list, path, title: str) -> bool:
    """Draw the figure; False (and a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plot was drawn (bench.csv has every number): "
              "pip install 'offload-engine[plot]'")
        return False
    figure = draw(rows, title)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def draw(rows: list, title: str):
    """The figure: one panel per PANELS entry and one shared legend below them."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    figure, axes = plt.subplots(1, len(PANELS), figsize=(15, 5))
    series = sorted({(r["policy"], r["prefetch_depth"], r["batch"]) for r in rows})
    for axis, (measured, predicted, label, scale) in zip(axes, PANELS, strict=True):
        for index, key in enumerate(series):
            mine = sorted((r for r in rows if (r["policy"], r["prefetch_depth"], r["batch"])
                           == key), key=lambda r: _budget(r))
            budgets = [_budget(r) / 2**30 for r in mine]
            name = f"{key[0]} depth {key[1]} batch {key[2]}"
            color = f"C{index}"
            axis.plot(budgets, [r[measured] * scale for r in mine], "o-", color=color,
                      label=f"{name} measured")
            axis.plot(budgets, [r[predicted] * scale for r in mine], "o--", color=color,
                      markerfacecolor="none", alpha=0.8, label=f"{name} PREDICTED")
        axis.set_xlabel("weight budget (GiB; rightmost = unbounded)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_yscale("log")
    plain = FuncFormatter(lambda value, _position: f"{value:g}")  # 60, not 6x10^1
    axes[0].yaxis.set_major_formatter(plain)
    axes[0].yaxis.set_minor_formatter(plain)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8,
                  title="every panel: solid = measured, dashed = PREDICTED", title_fontsize=8)
    figure.suptitle(title, fontsize=10)
    rows_of_legend = -(-len(labels) // 4) + 1
    figure.tight_layout(rect=(0, 0.05 * rows_of_legend, 1, 1))
    return figure


def _budget(row: dict) -> int:
    """The arena budget of a row; unbounded is drawn at the model's total cached bytes."""
    value = row["budget_bytes"]
    return row["predicted_total_bytes"] if value is None else value
