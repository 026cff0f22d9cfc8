"""Stage report: the adapters x base versions view of pipeline/metrics as Markdown, CSV and a heatmap."""

from __future__ import annotations

import json
import sys

from ..params import load_params
from ..report import write_report
from . import METRICS, REPORT


def main() -> int:
    params = load_params()
    matrix = {}
    for path in sorted(METRICS.glob("*/*.json")):
        row = json.loads(path.read_text())
        trained_on = row.pop("trained_on")
        matrix[f"{path.stem} / {path.parent.name}"] = {
            v: (em, "trained" if v == trained_on else "transferred") for v, em in row.items()}
    title = params.report.get("title", f"Transfer of adapters across {params.bases.family} versions")
    written = write_report(matrix, REPORT, title)
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
