"""The demo report: what a base update did to the fleet, in one page (HTML and Markdown, with images).

Five arms per task and new base version, all exact match on the task's eval set:
    fine-tune on old     the adapter on the base it was trained on (v1)
    direct transfer      the plain v1 adapter, put on the new base as it is
    Trans-PEFT transfer  the Trans-PEFT v1 adapter, put on the new base as it is
    revalidated          what the revalidation registered on the new base (as it was, scaled, distilled or
                         re-tuned, or flagged), from the registry
    fine-tune on new     a plain adapter trained from scratch on the new base (dvc.yaml's plain-v2/v3)
plus, per adapter and new base, each of the gate's strategies as it was tried (direct, scaled, distill,
retune: its exact match, or not tried once an earlier one carried it), which one carried it and whether
that needed the task's labels; the gate's decision per adapter, per-layer weight drift (attention vs FFN)
between consecutive versions, and the compute the revalidation spent against re-training every adapter
from scratch.
"""

from __future__ import annotations

import html
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..adapters import read_manifest  # noqa: E402
from ..bases import BaseRef, load_base  # noqa: E402
from ..data import load_tasks  # noqa: E402
from ..drift import activation_similarity, layer_drift  # noqa: E402
from .family import task_inputs  # noqa: E402
from ..stages import ADAPTERS, BASES  # noqa: E402
from ..strategies import verdict  # noqa: E402
from ..tracking import AdapterRecord, Registry  # noqa: E402
from ..transfer import evaluate_adapters  # noqa: E402

ARMS = ("fine-tune on old", "direct transfer", "Trans-PEFT transfer", "revalidated (plain)",
        "revalidated (Trans-PEFT)", "fine-tune on new")
FAMILY = "demo"


def _served_on(registry: Registry, name: str, version: str):
    rows = [r for r in registry.adapter_versions(name) if r.base_version == version]
    return rows[-1] if rows else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def carried_over(record: AdapterRecord, tags: dict[str, str], metrics: dict[str, float],
                 strategies: list[str]) -> dict:
    """How one adapter was carried onto a new base, from its registry version's tags and its revalidation
    run's metrics: per strategy of the gate's order, its mean exact match over the adapter's tasks
    (``None``: tried, but it made no candidate, e.g. distill without the old base), or "not tried"
    when an earlier one carried it or the revalidation stopped; the one that carried it; its labels."""
    tried: dict[str, float | str | None] = {}
    for name in strategies:
        key = "exact_match" if name == "direct" else f"{name}_exact_match"
        scores = [metrics[f"{key}.{t}"] for t in record.metrics if f"{key}.{t}" in metrics]
        if name == "direct" or scores or f"seconds.{name}" in metrics:
            tried[name] = _mean(scores)
        else:
            tried[name] = "not tried"
    winner = tags.get("strategy", "none")
    return {"adapter": record.name, "from": record.transferred_from, "tried": tried,
            "carried by": winner if winner != "none" else "none (flagged)",
            "labels": {"true": "yes", "false": "no"}.get(tags.get("labels", ""), "-"),
            "used": tags.get("used", ""), "status": record.status}


def collect(uri: str, tasks: list[str], data_dir: Path, strategies: list[str]) -> dict:
    """Every number of the report, from the registry, the DVC pipeline's outputs and fresh evaluation;
    ``strategies``: the gate's order (params.yaml gate.strategies), one column each."""
    registry = Registry(uri)
    versions = [b.version for b in registry.bases(FAMILY)]
    old, new_versions = versions[0], versions[1:]
    task_data = {t.name: t for t in load_tasks(data_dir, tasks)}

    # The v1 fleet's own files, evaluated as they are on every later base (each base loaded once).
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for task in tasks:
            for run in ("plain-v1", "transpeft-v1"):
                record = _served_on(registry, f"{task}-{run}", old)
                files[(task, run)] = registry.download_adapter(record, Path(tmp) / f"{task}-{run}")
        as_is = {}
        for version in new_versions:
            model, tokenizer, info = load_base(BaseRef(str(BASES / version), family=FAMILY, version=version))
            scores = evaluate_adapters(model, tokenizer, info, list(files.values()), list(task_data.values()))
            for (task, run), path in files.items():
                as_is[(task, run, version)] = scores[str(path)][task]["exact_match"]

    arms: dict[str, dict[str, dict[str, float | None]]] = {}  # version -> task -> arm -> score
    # every adapter run of every revalidation of each version (a re-run adds none: all were in place)
    children = {version: [r for r in registry.runs("transfer", f"tags.base_version = '{version}'")
                          if "decision" in r.data.tags] for version in new_versions}
    decisions, carried = [], {}
    for version in new_versions:
        run_metrics = {r.info.run_id: r.data.metrics for r in children[version]}
        for task in tasks:
            plain, tp = (_served_on(registry, f"{task}-{r}", version) for r in ("plain-v1", "transpeft-v1"))
            fresh = ADAPTERS / f"plain-{version}" / task
            arms.setdefault(version, {})[task] = {
                "fine-tune on old": _served_on(registry, f"{task}-plain-v1", old).metrics[task],
                "direct transfer": as_is[(task, "plain-v1", version)],
                "Trans-PEFT transfer": as_is[(task, "transpeft-v1", version)],
                "revalidated (plain)": plain.metrics.get(task) if plain else None,
                "revalidated (Trans-PEFT)": tp.metrics.get(task) if tp else None,
                "fine-tune on new": (read_manifest(fresh).metrics[task]["exact_match"]
                                     if (fresh / "transpeft.json").is_file() else None),
            }
            for run, record in (("plain-v1", plain), ("transpeft-v1", tp)):
                if record is not None:
                    tags = registry.adapter_tags(record)
                    decisions.append({"adapter": record.name, "base": version, "from": record.transferred_from,
                                      "status": record.status, "served": record.serving,
                                      "exact match": record.metrics.get(task), "why": tags.get("gate", "")})
                    metrics = run_metrics.get(tags.get("revalidation_run", ""), {})
                    carried.setdefault(version, []).append(carried_over(record, tags, metrics, strategies))

    drift, similarity = {}, {}
    models = {v: load_base(BaseRef(str(BASES / v), family=FAMILY, version=v))[0] for v in versions}
    tokenizer = load_base(BaseRef(str(BASES / old), family=FAMILY, version=old))[1]
    probe = task_inputs()
    for a, b in zip(versions, versions[1:]):
        drift[f"{a} -> {b}"] = layer_drift(models[a], models[b])
        similarity[f"{a} -> {b}"] = activation_similarity(models[a], models[b], tokenizer, probe)

    compute = []
    for version in new_versions:
        # seconds.<strategy> and steps.<strategy>: every strategy tried, whether or not it carried the adapter
        runs = children[version]
        seconds = sum(v for r in runs for k, v in r.data.metrics.items() if k.startswith("seconds."))
        steps = int(sum(v for r in runs for k, v in r.data.metrics.items() if k.startswith("steps.")))
        trained = sum(any(k.startswith("steps.") for k in r.data.metrics) for r in runs)
        fleet = [registry.run(_served_on(registry, f"{t}-{r}", old).run_id).data.params
                 for t in tasks for r in ("plain-v1", "transpeft-v1")]
        scratch_steps = sum(int(p["steps"]) for p in fleet)
        compute.append({"update": f"-> {version}", "adapters": len(runs), "trained anew": trained,
                        "revalidation steps": steps, "re-train steps": scratch_steps,
                        "saving (steps)": f"{scratch_steps / max(steps, 1):.1f}x",
                        "revalidation s": round(seconds, 1),
                        "re-train s": round(sum(float(p["seconds"]) for p in fleet), 1)})
    return {"versions": versions, "tasks": tasks, "arms": arms, "decisions": decisions, "drift": drift,
            "similarity": similarity, "compute": compute, "strategies": strategies, "carried": carried}


# -- rendering ----------------------------------------------------------------------------------


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _tried(value, carried: bool) -> str:
    """A strategy's cell: its exact match and whether it carried the adapter (the gate stops there)."""
    if isinstance(value, str) or value is None:
        return value or "n/a"
    return verdict(value, carried)


def _arm_chart(version: str, rows: dict, out: Path) -> Path:
    tasks = list(rows)
    fig, ax = plt.subplots(figsize=(9, 3.4))
    width = 0.8 / len(ARMS)
    for i, arm in enumerate(ARMS):
        values = [100 * (rows[t][arm] or 0) for t in tasks]
        ax.bar([x + i * width for x in range(len(tasks))], values, width, label=arm)
    ax.set_xticks([x + width * (len(ARMS) - 1) / 2 for x in range(len(tasks))], tasks)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"v1 adapters on {version}: every arm")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    path = out / f"arms_{version}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _per_layer_chart(per_update: dict, path: Path, ylabel: str, title: str, ylim: tuple | None = None) -> Path:
    """Attention and FFN, one line each per update, over the decoder layers (drift or similarity rows)."""
    fig, ax = plt.subplots(figsize=(6, 3))
    for update, rows in per_update.items():
        layers = [r["layer"] for r in rows]
        ax.plot(layers, [r["attention"] for r in rows], marker="o", label=f"{update} attention")
        ax.plot(layers, [r["ffn"] for r in rows], marker="s", linestyle="--", label=f"{update} FFN")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.set_xticks(sorted({r["layer"] for rows in per_update.values() for r in rows}))
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _drift_chart(drift: dict, out: Path) -> Path:
    return _per_layer_chart(drift, out / "drift.png", "relative drift",
                            "Weight drift per layer: ||W_new - W_old|| / ||W_old||")


def _similarity_chart(similarity: dict, out: Path) -> Path:
    return _per_layer_chart(similarity, out / "similarity.png", "cosine similarity",
                            "Sub-layer outputs, old vs new version, on task inputs", ylim=(0, 1.02))


def _table(header: list[str], rows: list[list]) -> tuple[str, str]:
    """The same table as Markdown and as HTML."""
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return "\n".join(md), f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def render(data: dict, out: Path, timings: dict | None = None) -> tuple[Path, Path]:
    """report.md and report.html (with their PNGs) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md, page = ["# Adapters across base updates: the demo family", ""], []

    def section(title: str, text: str = "", table: tuple[str, str] | None = None, image: Path | None = None):
        md.extend([f"## {title}", ""] + ([text, ""] if text else []))
        page.append(f"<h2>{html.escape(title)}</h2>" + (f"<p>{html.escape(text)}</p>" if text else ""))
        if table:
            md.extend([table[0], ""])
            page.append(table[1])
        if image:
            md.extend([f"![{title}]({image.name})", ""])
            page.append(f'<img src="{image.name}" alt="{html.escape(title)}">')

    for version, rows in data["arms"].items():
        table = _table(["task", *ARMS], [[t, *(_pct(rows[t][a]) for a in ARMS)] for t in rows])
        section(f"v1 -> {version}: exact match (%) per arm",
                "Fine-tune on old is the v1 adapter on v1; the transfers are the v1 adapters on "
                f"{version} as they are; revalidated is what the revalidation registered on {version} "
                "(as it was, or carried by the gate's first strategy that passed, or flagged as it was; scored "
                "on the rows the gate scores); fine-tune on new is trained from scratch "
                f"on {version}.", table, _arm_chart(version, rows, out))
    names = data["strategies"]
    for version, rows in data["carried"].items():
        rows = sorted(rows, key=lambda r: r["adapter"])
        section(f"{data['versions'][0]} -> {version}: how each adapter was carried over",
                f"The gate's strategies on {version}, in its order ({', '.join(names)}): each one's exact match (%) "
                "on the rows the gate scores, ✓ where it passed the gate and carried the adapter, ✗ where it "
                "failed; not tried once an earlier one carried it; n/a where it could make no candidate. Labels: "
                "whether what serves needed the task's labelled rows.",
                _table(["adapter", "from", *names, "carried by", "labels needed", "used"],
                       [[r["adapter"], r["from"], *(_tried(r["tried"][n], n == r["carried by"]) for n in names),
                         r["carried by"], r["labels"], r["used"] or "-"] for r in rows]))
    decisions = sorted(data["decisions"], key=lambda d: (d["base"], d["adapter"]))
    section("Gate decisions", "Status on each new base: transferred (passed as it was), scaled, distilled or retuned "
            "(failed as it was, carried by that strategy), failed-gate (flagged, not served).",
            _table(["adapter", "base", "from", "status", "served", "exact match (%)", "why"],
                   [[d["adapter"], d["base"], d["from"], d["status"], "yes" if d["served"] else "no",
                     _pct(d["exact match"]), d["why"][:160]] for d in decisions]))
    drift_rows = [[update, r["layer"], r["attention"], r["ffn"]] for update, rows in data["drift"].items() for r in rows]
    section("Weight drift between consecutive versions", "Relative Frobenius drift of each decoder layer's attention "
            "and FFN weights.", _table(["update", "layer", "attention", "FFN"], drift_rows),
            _drift_chart(data["drift"], out))
    sim_rows = [[update, r["layer"], r["attention"], r["ffn"]] for update, rows in data["similarity"].items() for r in rows]
    section("Attention vs FFN output similarity between versions",
            "Cosine similarity of each decoder layer's attention output and FFN output, old version against new, "
            "on the demo tasks' inputs (1.0: unchanged). Real updates by continual pretraining keep attention "
            "outputs alike and move the FFNs; the mild update is built to, the strong one moves both.",
            _table(["update", "layer", "attention", "FFN"], sim_rows), _similarity_chart(data["similarity"], out))
    keys = ["update", "adapters", "trained anew", "revalidation steps", "re-train steps", "saving (steps)",
            "revalidation s", "re-train s"]
    section("Compute: revalidation vs re-training every adapter",
            "Optimizer steps the revalidation spent in the strategies that train (distill, retune), those that "
            "failed included (evaluation is a forward pass per eval set) against "
            "training every adapter of the fleet from scratch, as it was trained on v1; and the seconds measured "
            "inside the tasks (two adapters at a time on 2 CPU cores, so seconds compare less cleanly than steps).",
            _table(keys, [[c[k] for k in keys] for c in data["compute"]]))
    if timings:
        section("How long the story took", "", _table(["step", "seconds"], [[k, v] for k, v in timings.items()]))

    markdown = out / "report.md"
    markdown.write_text("\n".join(md) + "\n", encoding="utf-8")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;"
             "margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    page_html = out / "report.html"
    page_html.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>transpeft demo report</title>"
                         f"<style>{style}</style></head><body><h1>Adapters across base updates: the demo family"
                         f"</h1>{''.join(page)}</body></html>\n", encoding="utf-8")
    return markdown, page_html


def build_report(uri: str, tasks: list[str], data_dir: Path, out: Path, strategies: list[str],
                 timings: dict | None = None) -> Path:
    """Collect, render, and log the report to MLflow (experiment `report`); returns the HTML file."""
    _, page = render(collect(uri, tasks, data_dir, strategies), out, timings)
    registry = Registry(uri)
    run = registry.start_run("report", f"demo report {FAMILY}", {"base_family": FAMILY})
    registry.log_files(run, out, "report")
    registry.finish_run(run)
    return page
