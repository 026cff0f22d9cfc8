"""The transfer study's numbers, from its raw rows alone: the main table, the grid, the choice, the plots.

Pure functions of ``results.json`` rows (``transpeft.study`` writes them), so every figure of the
summary, of report.md and of the README can be recomputed from the committed rows:

    gap closed   (transpeft - direct) / (ft_new - direct), per seed, then mean and spread over seeds; for a
                 setting over all tasks, pooled: sum of the gains over sum of the gaps
    lead         transpeft - direct, per seed
    old cost     ft_old of the plain adapter - ft_old of the regularised one, per seed
    spread       the population standard deviation over seeds

The chosen setting (the defaults of params.yaml) is the one that transfers best, mean exact match on the
new bases over tasks, updates and seeds, among those costing at most ``max_old_cost`` on the old base.
The re-tune knee is the smallest budget whose re-tuned adapters reach 95 % of fine-tuning on the new base.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path

KNEE_SHARE = 0.95  # the re-tune budget is enough once it reaches this share of fine-tuning on the new base
NO_GAP = 0.01  # a seed whose ft_new - direct is below this has no gap to close


def _index(rows: list[dict]) -> dict[tuple, dict[int, float]]:
    """(update, task, arm, targets, p_c, p_i) -> {seed: exact match}."""
    cells: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in rows:
        cells[(r["update"], r["task"], r["arm"], r["targets"], r["p_c"], r["p_i"])][r["seed"]] = r["exact_match"]
    return cells


def spread(values: list[float]) -> dict:
    """Mean and population standard deviation, rounded for reading; None for no values."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.pstdev(values), 4), "n": len(values)}


def _paired(a: dict[int, float], b: dict[int, float]) -> list[tuple[float, float]]:
    return [(a[s], b[s]) for s in sorted(a) if s in b]


def gap_closed(cells, update: str, task: str, targets: str, p_c: float, p_i: float) -> list[float]:
    """Per seed: the share of the direct -> ft_new gap the regularised adapter closes."""
    tp = cells.get((update, task, "transpeft", targets, p_c, p_i), {})
    direct = cells.get((update, task, "direct", targets, 0.0, 0.0), {})
    new = cells.get((update, task, "ft_new", targets, 0.0, 0.0), {})
    return [(tp[s] - direct[s]) / (new[s] - direct[s]) for s in sorted(tp)
            if s in direct and s in new and new[s] - direct[s] >= NO_GAP]


def pooled_gap_closed(cells, update: str, tasks: list[str], targets: str, p_c: float, p_i: float) -> float | None:
    """Sum over tasks and seeds of (transpeft - direct) over the sum of (ft_new - direct): one share for a
    setting, which a task with almost no gap cannot swing the way a mean of per-task shares would."""
    gained = gap = 0.0
    for task in tasks:
        tp = cells.get((update, task, "transpeft", targets, p_c, p_i), {})
        direct = cells.get((update, task, "direct", targets, 0.0, 0.0), {})
        new = cells.get((update, task, "ft_new", targets, 0.0, 0.0), {})
        for s in tp:
            if s in direct and s in new:
                gained += tp[s] - direct[s]
                gap += new[s] - direct[s]
    return round(gained / gap, 4) if gap >= NO_GAP else None


def _settings(cells) -> list[tuple[str, float, float]]:
    return sorted({(k[3], k[4], k[5]) for k in cells if k[2] == "transpeft"})


def _updates_tasks(cells) -> tuple[list[str], list[str]]:
    return sorted({k[0] for k in cells}), sorted({k[1] for k in cells})


def old_cost(cells, targets: str, p_c: float, p_i: float) -> list[float]:
    """Per (task, seed): how much exact match on the old base the regularisers cost."""
    updates, tasks = _updates_tasks(cells)
    costs = []
    for task in tasks:
        seen_old = set()
        for update in updates:  # ft_old repeats per update of the same old base: count each once
            old = update.split("->")[0]
            if old in seen_old:
                continue
            seen_old.add(old)
            plain = cells.get((update, task, "ft_old", targets, 0.0, 0.0), {})
            reg = cells.get((update, task, "ft_old", targets, p_c, p_i), {})
            costs += [p - r for p, r in _paired(plain, reg)]
    return costs


def transferred(cells, targets: str, p_c: float, p_i: float) -> list[float]:
    """Every exact match of the setting's adapters on the new bases, as they are."""
    arm = "direct" if p_c == p_i == 0 else "transpeft"
    return [v for k, seeds in cells.items() if k[2] == arm and k[3:] == (targets, p_c, p_i) for v in seeds.values()]


def choose(rows: list[dict], max_old_cost: float) -> dict:
    """The setting that transfers best within the old-base cost budget (the defaults of params.yaml)."""
    cells = _index(rows)
    candidates = []
    for targets, p_c, p_i in _settings(cells):
        cost = statistics.fmean(old_cost(cells, targets, p_c, p_i) or [0.0])
        candidates.append({"targets": targets, "p_c": p_c, "p_i": p_i, "old_cost": round(cost, 4),
                           "transferred": round(statistics.fmean(transferred(cells, targets, p_c, p_i)), 4)})
    if not candidates:
        raise ValueError("the study has no regularised setting (p_c or p_i > 0) to choose from")
    within = [c for c in candidates if c["old_cost"] <= max_old_cost]
    best = max(within or candidates, key=lambda c: c["transferred"])
    plain = statistics.fmean(transferred(cells, best["targets"], 0.0, 0.0))
    why = (f"best mean transferred exact match, {100 * best['transferred']:.1f} % against {100 * plain:.1f} % direct, "
           f"at an old-base cost of {100 * best['old_cost']:.1f} points")
    if not within:
        why += f"; no setting stays within the {100 * max_old_cost:.0f}-point budget"
    return {**best, "within_cost": bool(within), "why": why}


def retune_curve(cells, update: str, targets: str, p_c: float, p_i: float) -> dict[int, list[float]]:
    """{steps: exact matches over tasks and seeds} of the adapter re-tuned from the given start."""
    curve: dict[int, list[float]] = defaultdict(list)
    for k, seeds in cells.items():
        if k[0] == update and k[2].startswith("retune@") and k[3:] == (targets, p_c, p_i):
            curve[int(k[2].split("@")[1])] += list(seeds.values())
    return dict(sorted(curve.items()))


def retune_knee(cells, chosen: dict) -> int | None:
    """Smallest budget whose re-tuned adapters (both starts, every update) reach KNEE_SHARE of ft_new."""
    updates, tasks = _updates_tasks(cells)
    budgets: dict[int, list[float]] = defaultdict(list)
    ft_new = []
    for update in updates:
        for start in ((0.0, 0.0), (chosen["p_c"], chosen["p_i"])):
            for steps, values in retune_curve(cells, update, chosen["targets"], *start).items():
                budgets[steps] += values
        ft_new += [v for t in tasks for v in cells.get((update, t, "ft_new", chosen["targets"], 0.0, 0.0), {}).values()]
    if not budgets or not ft_new:
        return None
    goal = KNEE_SHARE * statistics.fmean(ft_new)
    reached = [steps for steps, values in sorted(budgets.items()) if statistics.fmean(values) >= goal]
    return reached[0] if reached else max(budgets)


STRATEGY_ORDER = ("scaled", "distill", "distill-synthetic", "retune")
WITHIN = 0.02  # "within 2 points": of re-tuning (distill on stored prompts), of fine-tuning on the new base (the gate)


def strategies(rows: list[dict], cells, chosen: dict) -> dict | None:
    """Per update and task, each strategy's exact match, steps and seconds over seeds, whether it used labels,
    and the goals: distill on stored prompts against retune (points and seconds), the share of the gap from
    direct transfer to retune that distill on synthetic prompts recovers, and what the gate's order
    direct, scaled, distill, retune would serve (every adapter within 2 points of fine-tuning on the new
    base?) with how many labelled rows, against re-tuning every adapter that fails as transferred."""
    mine = [r for r in rows if r["arm"].startswith("strategy:")]
    if not mine:
        return None
    by: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in mine:
        by[(r["update"], r["task"], r["arm"].removeprefix("strategy:"))][r["seed"]] = r
    names = [n for n in STRATEGY_ORDER if any(k[2] == n for k in by)]
    updates = sorted({k[0] for k in by})
    tasks = sorted({k[1] for k in by})
    def cell(seeds: dict[int, dict]) -> dict:
        return {"exact_match": spread([r["exact_match"] for r in seeds.values()]),
                "transferred": spread([r["transferred"] for r in seeds.values()]),
                "steps": max(r["steps"] for r in seeds.values()),
                "seconds": spread([r["seconds"] for r in seeds.values()]),
                "labels": max(r["labels"] for r in seeds.values())}

    table = {u: {task: {n: cell(by[(u, task, n)]) for n in names if (u, task, n) in by} for task in tasks}
             for u in updates}
    goals = {}
    for u in updates:
        def pooled(name, task_list=tasks):
            return [by[(u, task, name)][s]["exact_match"] for task in task_list for s in sorted(by[(u, task, name)])
                    if (u, task, name) in by]
        goal = {}
        if {"distill", "retune"} <= set(names):
            d, r = pooled("distill"), pooled("retune")
            ds = [x["seconds"] for task in tasks for x in by[(u, task, "distill")].values()]
            rs = [x["seconds"] for task in tasks for x in by[(u, task, "retune")].values()]
            goal["distill_minus_retune"] = round(statistics.fmean(d) - statistics.fmean(r), 4)
            goal["distill_seconds_over_retune"] = round(sum(ds) / sum(rs), 3)
            goal["distill_within_2_points_at_no_more_compute"] = (goal["distill_minus_retune"] >= -WITHIN
                                                                 and goal["distill_seconds_over_retune"] <= 1.0)
        if {"distill-synthetic", "retune"} <= set(names):
            gained = gap = 0.0  # from the same adapter as transferred, on the same rows
            for task in tasks:
                for s, row in by.get((u, task, "distill-synthetic"), {}).items():
                    if s in by.get((u, task, "retune"), {}):
                        gained += row["exact_match"] - row["transferred"]
                        gap += by[(u, task, "retune")][s]["exact_match"] - row["transferred"]
            goal["synthetic_gap_recovered"] = round(gained / gap, 3) if gap > NO_GAP else None
            goal["synthetic_recovers_half"] = None if gap <= NO_GAP else gained / gap >= 0.5
        goals[u] = goal
    order = [n for n in names if n != "distill-synthetic"]  # the gate tries one kind of distillation
    return {"strategies": names, "table": table, "goals": goals, "gate": gate_choice(by, cells, chosen, order)}


def gate_choice(by: dict, cells, chosen: dict, names: list[str]) -> dict:
    """What the gate's order direct, then ``names`` would serve per update, task and seed, judged by the
    revalidation's own ``judge`` on the shipped gate (retention against the adapter on its old base, and
    the absolute floor; not the zero-shot rule, which needs the new base's own score, which the study does
    not measure): the chosen strategy, its score against fine-tuning on the new base, and the labelled rows
    it used against re-tuning every failure. The adapter's old and transferred scores are the strategy
    rows' own (the adapter they carried)."""
    from .params import Gate
    from .revalidate import judge

    gate = Gate(beat_zero_shot=False)
    t = chosen["targets"]
    out = {}
    for u in sorted({k[0] for k in by}):
        picks, short, labels_used, labels_retune_all = [], [], 0, 0
        for task in sorted({k[1] for k in by if k[0] == u}):
            first = by[(u, task, names[0])]
            old = {s: r["old"] for s, r in first.items()}
            transferred = {s: r["transferred"] for s, r in first.items()}
            new = cells.get((u, task, "ft_new", t, 0.0, 0.0), {})
            for seed, score in sorted(transferred.items()):
                passes = lambda value: judge({task: value}, {task: old[seed]}, {}, gate).passed  # noqa: E731
                pick, served, labels = "direct", score, 0
                if not passes(score):
                    retune = by.get((u, task, "retune"), {}).get(seed)
                    labels_retune_all += retune["labels"] if retune else 0
                    pick = None
                    for name in names:
                        row = by.get((u, task, name), {}).get(seed)
                        if row is not None and passes(row["exact_match"]):
                            pick, served, labels = name, row["exact_match"], row["labels"]
                            break
                    if pick is None:
                        pick, labels = "flagged", 0
                picks.append(pick)
                labels_used += labels
                if seed in new and served < new[seed] - WITHIN:
                    short.append({"task": task, "seed": seed, "served": served, "ft_new": new[seed], "by": pick})
        out[u] = {"chosen": dict(sorted(Counter(picks).items())), "within_2_points_of_ft_new": not short,
                  "short": short, "labels_used": labels_used, "labels_retune_every_failure": labels_retune_all}
    return out


def summarize(rows: list[dict], config, chosen: dict) -> dict:
    """The study's summary.json: the main table at the chosen setting, the grid, the re-tune curves."""
    cells = _index(rows)
    updates, tasks = _updates_tasks(cells)
    t, pc, pi = chosen["targets"], chosen["p_c"], chosen["p_i"]
    table = {}
    for update in updates:
        table[update] = {}
        for task in tasks:
            arm = lambda name, p=(0.0, 0.0): list(cells.get((update, task, name, t, *p), {}).values())  # noqa: E731
            lead = [a - b for a, b in _paired(cells.get((update, task, "transpeft", t, pc, pi), {}),
                                               cells.get((update, task, "direct", t, 0.0, 0.0), {}))]
            table[update][task] = {
                "ft_old": spread(arm("ft_old")), "direct": spread(arm("direct")),
                "transpeft": spread(arm("transpeft", (pc, pi))), "transpeft_old": spread(arm("ft_old", (pc, pi))),
                "ft_new": spread(arm("ft_new")), "lead": spread(lead),
                "gap_closed": spread(gap_closed(cells, update, task, t, pc, pi)),
            }
    grid = {}
    for update in updates:
        grid[update] = {}
        for targets, p_c, p_i in [(t_, 0.0, 0.0) for t_ in sorted({k[3] for k in cells})] + _settings(cells):
            arm = "direct" if p_c == p_i == 0 else "transpeft"
            new = [v for task in tasks for v in cells.get((update, task, arm, targets, p_c, p_i), {}).values()]
            grid[update][f"{targets} p_c={p_c} p_i={p_i}"] = {
                "targets": targets, "p_c": p_c, "p_i": p_i, "transferred": spread(new)["mean"],
                "gap_closed": None if arm == "direct" else pooled_gap_closed(cells, update, tasks, targets, p_c, p_i),
                "old_cost": spread(old_cost(cells, targets, p_c, p_i))["mean"]}
    retune = {update: {label: {str(s): spread(v)["mean"] for s, v in retune_curve(cells, update, t, *start).items()}
                       for label, start in (("direct", (0.0, 0.0)), ("transpeft", (pc, pi)))} for update in updates}
    knee = retune_knee(cells, chosen)
    carried = strategies(rows, cells, chosen)
    return {**({"strategies": carried} if carried else {}), "chosen": chosen,
            "defaults": {"target_modules": t, "p_c": pc, "p_i": pi, "retune_steps": knee},
            "table": table, "grid": grid, "retune": retune, "retune_knee": knee,
            "seeds": list(config.seeds), "updates": list(config.updates), "tasks": list(config.tasks),
            "adapter": {"r": config.r, "alpha": config.alpha, "steps": config.steps, "batch_size": config.batch_size,
                        "lr": config.lr}}


# -- rendering -----------------------------------------------------------------------------------


def _pm(cell: dict, scale: float = 100.0) -> str:
    if cell["mean"] is None:
        return "-"
    return f"{scale * cell['mean']:.1f} ± {scale * cell['std']:.1f}"


def main_table(summary: dict) -> str:
    """Markdown: per task and update, every arm at the chosen setting, mean ± spread over seeds."""
    c = summary["chosen"]
    lines = [f"| update | task | FT old | direct | Trans-PEFT ({c['targets']}, p_c {c['p_c']}, p_i {c['p_i']}) "
             "| FT new | gap closed | lead over direct | Trans-PEFT on old |", "|---|---|---|---|---|---|---|---|---|"]
    for update, tasks in summary["table"].items():
        for task, row in tasks.items():
            gap = row["gap_closed"]
            gap_text = "no gap" if gap["mean"] is None else f"{100 * gap['mean']:.0f} ± {100 * gap['std']:.0f} %"
            lead = row["lead"]
            lead_text = "-" if lead["mean"] is None else f"{100 * lead['mean']:+.1f} ± {100 * lead['std']:.1f}"
            lines.append(f"| {update} | {task} | {_pm(row['ft_old'])} | {_pm(row['direct'])} | {_pm(row['transpeft'])} "
                         f"| {_pm(row['ft_new'])} | {gap_text} | {lead_text} | {_pm(row['transpeft_old'])} |")
    return "\n".join(lines)


def grid_table(summary: dict) -> str:
    """Markdown: every setting's mean transferred exact match and gap closed per update, and its old-base cost."""
    updates = list(summary["grid"])
    head = ("| targets | p_c | p_i | " + " | ".join(f"{u}: transferred / gap closed (pooled)" for u in updates)
            + " | old-base cost |")
    lines = [head, "|---|---|---|" + "---|" * (len(updates) + 1)]
    for key in summary["grid"][updates[0]]:
        cells = [summary["grid"][u][key] for u in updates]
        first = cells[0]
        parts = []
        for cell in cells:
            gap = "-" if cell["gap_closed"] is None else f"{100 * cell['gap_closed']:.0f} %"
            parts.append(f"{100 * cell['transferred']:.1f} / {gap}")
        cost = "-" if first["p_c"] == first["p_i"] == 0 else f"{100 * first['old_cost']:.1f}"
        lines.append(f"| {first['targets']} | {first['p_c']} | {first['p_i']} | " + " | ".join(parts) + f" | {cost} |")
    return "\n".join(lines)


def retune_table(summary: dict) -> str:
    lines = ["| update | start | " + " | ".join(f"{s} steps" for s in _budgets(summary)) + " |",
             "|---|---|" + "---|" * len(_budgets(summary))]
    for update, starts in summary["retune"].items():
        for start, curve in starts.items():
            lines.append(f"| {update} | {start} | " + " | ".join(
                "-" if curve.get(s) is None else f"{100 * curve[s]:.1f}" for s in _budgets(summary)) + " |")
    return "\n".join(lines)


def _budgets(summary: dict) -> list[str]:
    return sorted({s for starts in summary["retune"].values() for c in starts.values() for s in c}, key=int)


def strategies_table(summary: dict) -> str:
    """Markdown: per update and task, each strategy's exact match ± spread, its steps and seconds, and labels."""
    carried = summary["strategies"]
    names = carried["strategies"]
    lines = ["| update | task | as transferred | " + " | ".join(f"{n}: exact match / seconds" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for update, tasks in carried["table"].items():
        for task, row in tasks.items():
            lines.append(f"| {update} | {task} | {_pm(row[names[0]]['transferred'])} | " + " | ".join(
                f"{_pm(row[n]['exact_match'])} / {row[n]['seconds']['mean']:.0f} s" if n in row else "-"
                for n in names) + " |")
    cells = [row for tasks in carried["table"].values() for row in tasks.values()]
    labels = ", ".join(f"{n} {'yes' if any(row[n]['labels'] for row in cells if n in row) else 'no'}" for n in names)
    return "\n".join(lines) + f"\n\nUses labelled rows: {labels}."


def strategies_goals(summary: dict) -> str:
    carried = summary["strategies"]
    lines = []
    for update, goal in carried["goals"].items():
        gate = carried["gate"][update]
        parts = []
        if "distill_minus_retune" in goal:
            parts.append(f"distill on stored prompts {100 * goal['distill_minus_retune']:+.1f} points against retune, "
                         f"at {goal['distill_seconds_over_retune']:.2f}x its seconds (goal: within 2 points at no "
                         "more: "
                         f"{'met' if goal['distill_within_2_points_at_no_more_compute'] else 'missed'})")
        if goal.get("synthetic_gap_recovered") is not None:
            parts.append(f"distill on synthetic prompts recovers {100 * goal['synthetic_gap_recovered']:.0f} % of the "
                         f"gap from direct transfer to retune (goal: half: "
                         f"{'met' if goal['synthetic_recovers_half'] else 'missed'})")
        chosen = ", ".join(f"{k} {v}" for k, v in gate["chosen"].items())
        parts.append(f"the gate's order serves {chosen}; every adapter within 2 points of fine-tuning on the new base: "
                     f"{'yes' if gate['within_2_points_of_ft_new'] else 'no, ' + str(len(gate['short'])) + ' short'}; "
                     f"labelled rows used {gate['labels_used']}, against {gate['labels_retune_every_failure']} to "
                     "re-tune every failure")
        lines.append(f"- **{update}**: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def report(summary: dict) -> str:
    c, d = summary["chosen"], summary["defaults"]
    return "\n".join([
        "# Transfer study", "",
        f"Seeds {summary['seeds']}; updates {', '.join(summary['updates'])}; one LoRA per task, setting and seed "
        f"(r {summary['adapter']['r']}, {summary['adapter']['steps']} steps), as the fleet trains them. Exact match "
        "in %, mean ± spread (population standard deviation) over seeds.", "",
        f"Chosen setting: {c['targets']}, p_c {c['p_c']}, p_i {c['p_i']}: {c['why']}.", "",
        main_table(summary), "",
        "## The grid", "", grid_table(summary), "",
        f"## Re-tuning from the transferred weights (mean over tasks and seeds); knee: {d['retune_steps']} steps", "",
        retune_table(summary), "",
        *(["## Carrying the chosen adapters over: the gate's strategies (mean ± spread over seeds)", "",
            strategies_table(summary), "", strategies_goals(summary), ""] if "strategies" in summary else [])])


def write_outputs(rows: list[dict], summary: dict, out: Path) -> list[Path]:
    """results.json, summary.json, report.md and the plots under ``out``."""
    from .study_plots import plot_gap_closed, plot_grid, plot_retune

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("results.json", json.dumps(rows, indent=1) + "\n"),
                       ("summary.json", json.dumps(summary, indent=2) + "\n"),
                       ("report.md", report(summary))):
        (out / name).write_text(text, encoding="utf-8")
        written.append(out / name)
    written += [plot_gap_closed(summary, out / "gap_closed.png"), plot_grid(summary, out / "grid.png"),
                plot_retune(summary, out / "retune.png")]
    return written
