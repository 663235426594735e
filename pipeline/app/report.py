"""Reports: certified accuracy at fixed radii, ACR, a markdown table and a curve (docs/statistics.md, "Reports")."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from pipeline.store.metrics import certified_accuracy, summary_rows


def markdown_table(rows: list[dict[str, float | str]]) -> str:
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = []
        for key in headers:
            value = row[key]
            if isinstance(value, str):
                cells.append(value)
            elif key == "ACR":
                cells.append(f"{value:.3f}")
            elif key == "scales/image":
                cells.append(f"{value:.2f}")
            elif key == "forwards/image":
                cells.append(f"{value:.1f}")
            else:
                cells.append(f"{100 * value:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(tables: dict[str, pa.Table]) -> bytes:
    """PNG of certified accuracy as a function of radius, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    largest = max((float(np.max(t["radius"].to_numpy(), initial=0.0)) for t in tables.values()), default=1.0)
    grid = np.linspace(0.0, max(largest, 1.0) * 1.05, 200)
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, table in tables.items():
        axis.plot(grid, [certified_accuracy(table, r) for r in grid], label=name)
    axis.set_xlabel("L2 radius (input space [0,1])")
    axis.set_ylabel("certified accuracy")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def render_report(tables: dict[str, pa.Table], header: str) -> tuple[str, bytes]:
    """(report.md text, certified_accuracy.png bytes)."""
    table = markdown_table(summary_rows(tables))
    text = f"{header}\n\n{table}\n\n![certified accuracy](certified_accuracy.png)\n"
    return text, plot_curves(tables)
