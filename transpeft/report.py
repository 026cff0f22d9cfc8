"""The transfer report: adapters x base versions, as a Markdown table, a CSV and a heatmap image."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


Matrix = dict[str, dict[str, tuple[float, str]]]  # adapter -> base version -> (exact match, status)


def registry_matrix(records: dict[str, list]) -> Matrix:
    """The matrix from the registry's adapter records: mean exact match over the adapter's tasks."""
    matrix = {}
    for name, rows in records.items():
        matrix[name] = {r.base_version: (sum(r.metrics.values()) / len(r.metrics), r.status)
                        for r in rows if r.metrics}  # the newest version per base wins
    return matrix


def write_report(matrix: Matrix, out: Path, title: str) -> list[Path]:
    """transfer_report.md, transfer_report.csv and (unless the matrix is empty) transfer_heatmap.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    adapters = sorted(matrix)
    versions = sorted({v for row in matrix.values() for v in row})
    cells = [[matrix[a].get(v, (None, ""))[0] for v in versions] for a in adapters]

    def cell(i, j):
        value, status = matrix[adapters[i]].get(versions[j], (None, ""))
        return "-" if value is None else f"{100 * value:.1f}" + (f" ({status})" if status else "")

    lines = [f"# {title}", "", "Exact match (%) of each adapter on each base version.", "",
             "| adapter | " + " | ".join(versions) + " |", "|---|" + "---|" * len(versions)]
    lines += [f"| {a} | " + " | ".join(cell(i, j) for j in range(len(versions))) + " |" for i, a in enumerate(adapters)]
    markdown = out / "transfer_report.md"
    markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")

    table = out / "transfer_report.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["adapter", *versions])
        writer.writerows([a, *("" if v is None else round(v, 4) for v in row)] for a, row in zip(adapters, cells))

    if not adapters:  # nothing registered yet: the table says so, there is nothing to draw
        return [markdown, table]
    heatmap = out / "transfer_heatmap.png"
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(versions), 1.2 + 0.45 * len(adapters)))
    values = [[float("nan") if v is None else 100 * v for v in row] for row in cells]
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(versions)), versions)
    ax.set_yticks(range(len(adapters)), adapters)
    ax.set_xlabel("base version")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black")
    fig.colorbar(image, ax=ax, label="exact match (%)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(heatmap, dpi=120, bbox_inches="tight")  # keep the colour bar label inside
    plt.close(fig)
    return [markdown, table, heatmap]


def write_decisions(outcomes: list, out: Path, title: str) -> Path:
    """gate_decisions.md: per adapter, where it came from, its scores and what the gate decided."""
    def scores(values: dict | None) -> str:
        return "-" if values is None else ", ".join(f"{t} {100 * v:.1f}" for t, v in sorted(values.items()))

    lines = [f"# {title}", "", "Exact match (%) per task: on the old base (registry), transferred to the new "
             "base, the new base alone (zero-shot), and as made anew by the strategy that carried it "
             "(scaled, distilled or re-tuned; `labels`: whether that used the task's labelled rows).", "",
             "| adapter | from | decision | old | new | zero-shot | made anew | carried by | labels | why |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for o in sorted(outcomes, key=lambda o: o.adapter):
        why = "; ".join(o.reasons).replace("|", "/") or "-"
        lines.append(f"| {o.adapter} | {o.source_version} | **{o.decision}** | {scores(o.old)} | {scores(o.new)} "
                     f"| {scores(o.zero_shot)} | {scores(o.retuned)} | {o.strategy or '-'} | {o.labels} | {why} |")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gate_decisions.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
