"""The transfer study's charts, drawn from its summary: gap closed, the grid, the re-tune curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ARM_LABELS = {"ft_old": "fine-tune on old", "direct": "direct transfer", "transpeft": "Trans-PEFT transfer",
              "ft_new": "fine-tune on new"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gap_closed(summary: dict, path: Path) -> Path:
    """Top: every arm per task and update; bottom: the share of the gap Trans-PEFT closes. Error bars: spread."""
    updates = list(summary["table"])
    tasks = list(next(iter(summary["table"].values())))
    c = summary["chosen"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7.0, 1.6 * len(tasks) * len(updates)), 6.4))
    groups = [(u, t) for u in updates for t in tasks]
    width = 0.8 / len(ARM_LABELS)
    for i, (arm, label) in enumerate(ARM_LABELS.items()):
        cells = [summary["table"][u][t][arm] for u, t in groups]
        top.bar([g + i * width for g in range(len(groups))], [100 * (x["mean"] or 0) for x in cells], width,
                yerr=[100 * (x["std"] or 0) for x in cells], capsize=2, label=label)
    names = [f"{t}\n{u}" for u, t in groups]
    top.set_xticks([g + width * (len(ARM_LABELS) - 1) / 2 for g in range(len(groups))], names, fontsize=8)
    top.set_ylabel("exact match (%)")
    top.set_ylim(0, 105)
    top.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    gaps = [summary["table"][u][t]["gap_closed"] for u, t in groups]
    bottom.bar(range(len(groups)), [100 * (g["mean"] or 0) for g in gaps],
               yerr=[100 * (g["std"] or 0) for g in gaps], capsize=3, color="tab:green")
    bottom.axhline(80, color="gray", linestyle="--", linewidth=1, label="80 %")
    bottom.legend(fontsize=7, loc="upper right")
    bottom.axhline(0, color="black", linewidth=0.8)
    bottom.set_xticks(range(len(groups)), names, fontsize=8)
    bottom.set_ylabel("gap closed (%)")
    bottom.set_title(f"(Trans-PEFT - direct) / (fine-tune on new - direct); {c['targets']}, p_c {c['p_c']}, "
                     f"p_i {c['p_i']}; {len(summary['seeds'])} seeds", fontsize=9)
    return _save(fig, path)


def plot_grid(summary: dict, path: Path) -> Path:
    """Mean transferred exact match per setting, one panel per targets and update."""
    updates = list(summary["grid"])
    cells = list(next(iter(summary["grid"].values())).values())
    targets = sorted({c["targets"] for c in cells})
    p_cs = sorted({c["p_c"] for c in cells})
    p_is = sorted({c["p_i"] for c in cells})
    fig, axes = plt.subplots(len(targets), len(updates), figsize=(4.0 * len(updates) + 1.2, 3.0 * len(targets)),
                             squeeze=False, constrained_layout=True)
    for row, t in enumerate(targets):
        for col, u in enumerate(updates):
            ax = axes[row][col]
            values = [[None] * len(p_cs) for _ in p_is]
            for c in summary["grid"][u].values():
                if c["targets"] == t:
                    values[p_is.index(c["p_i"])][p_cs.index(c["p_c"])] = c["transferred"]
            shown = [[100 * v if v is not None else float("nan") for v in r] for r in values]
            image = ax.imshow(shown, vmin=0, vmax=100, cmap="viridis", origin="lower", aspect="auto")
            for y, r in enumerate(shown):
                for x, v in enumerate(r):
                    if v == v:  # not NaN
                        ax.text(x, y, f"{v:.0f}", ha="center", va="center", fontsize=8,
                                color="white" if v < 60 else "black")
            ax.set_xticks(range(len(p_cs)), [str(p) for p in p_cs])
            ax.set_yticks(range(len(p_is)), [str(p) for p in p_is])
            ax.set_xlabel("p_c")
            ax.set_ylabel("p_i")
            ax.set_title(f"{t}, {u}", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="transferred exact match (%)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_retune(summary: dict, path: Path) -> Path:
    """Exact match after re-tuning N steps from the transferred weights, against fine-tuning on the new base."""
    updates = list(summary["retune"])
    fig, axes = plt.subplots(1, len(updates), figsize=(4.2 * len(updates), 3.2), squeeze=False)
    for ax, update in zip(axes[0], updates):
        for start, curve in summary["retune"][update].items():
            steps = [0] + [int(s) for s in curve]
            arm = summary["table"][update]
            zero = sum(arm[t][start]["mean"] or 0 for t in arm) / len(arm)
            ax.plot(steps, [100 * zero] + [100 * (v or 0) for v in curve.values()], marker="o",
                    label=f"from {ARM_LABELS[start]}")
        ft_new = sum(summary["table"][update][t]["ft_new"]["mean"] or 0 for t in summary["table"][update])
        ax.axhline(100 * ft_new / len(summary["table"][update]), color="gray", linestyle="--",
                   label="fine-tune on new")
        if summary.get("retune_knee"):
            ax.axvline(summary["retune_knee"], color="tab:red", linewidth=0.8, linestyle=":", label="knee")
        ax.set_title(update, fontsize=9)
        ax.set_xlabel("re-tuning steps")
        ax.set_ylabel("exact match (%), mean of tasks")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=7)
    return _save(fig, path)
