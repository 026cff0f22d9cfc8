"""The demo comparison: does an adapter survive the base update, with and without Trans-PEFT?

Per task, four arms (the paper's table, on our self-built family):

    Fine-tune on v1 (eval v1)   plain LoRA trained and scored on the old base
    Direct Transfer v1 -> vN    that adapter loaded as-is onto the updated base
    Trans-PEFT v1 -> vN         LoRA trained on v1 with knowledge dropping/masking, loaded onto vN
    Fine-tune on vN (eval vN)   the upper bound: re-tuning on the new base with the data

Everything lands under one working directory and is reused when the run is repeated with the same
settings (bases, data, and each adapter, matched by base fingerprint and training config).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..adapters import AdapterFileError, read_manifest
from ..bases import BaseRef, load_base
from ..data import load_tasks
from ..evaluate import evaluate_adapters
from ..methods import MethodConfig
from ..train import TrainConfig, train_adapter
from .family import build_demo_family
from .tasks import build_demo_tasks


@dataclass(frozen=True)
class ComparisonProfile:
    steps: int
    batch_size: int
    lr: float
    r: int
    p_c: float
    p_i: float
    n_train: int | None  # None: the demo tasks' own sizes
    n_eval: int | None
    targets: tuple[str, ...] = ("v2", "v3")


PROFILES = {
    "test": ComparisonProfile(steps=8, batch_size=8, lr=3e-3, r=8, p_c=0.1, p_i=0.0, n_train=64, n_eval=24),
    # 500 steps: at 300, reverse and sort on v1 still swing by 20 points from seed to seed.
    "demo": ComparisonProfile(steps=500, batch_size=32, lr=3e-3, r=16, p_c=0.1, p_i=0.0, n_train=None, n_eval=None),
}


def arm_names(target: str) -> list[str]:
    return ["Fine-tune on v1 (eval v1)", f"Direct Transfer v1 -> {target}", f"Trans-PEFT v1 -> {target}",
            f"Fine-tune on {target} (eval {target})"]


def _ensure_family(bases: Path, profile: str, progress: bool) -> None:
    family = bases / "family.json"
    if family.exists() and f'"profile": "{profile}"' in family.read_text():
        return
    build_demo_family(bases, profile=profile, progress=progress)


def _ensure_adapter(out: Path, base_dir: Path, tasks, config: TrainConfig, method: MethodConfig, progress: bool) -> Path:
    """Train unless ``out`` already holds this adapter for this exact base and config."""
    model, tokenizer, base = load_base(BaseRef(str(base_dir), family="demo"))
    try:
        manifest = read_manifest(out)
        wanted = asdict(config)
        if (manifest.base.fingerprint == base.fingerprint and manifest.method == method
                and all(manifest.training.get(k) == v for k, v in wanted.items())):
            return out
    except AdapterFileError:
        pass
    train_adapter(model, tokenizer, base, tasks, method, config, out, progress=progress)
    return out


def run_comparison(out: Path, profile: str = "demo", progress: bool = True) -> dict:
    """Build (or reuse) the family, tasks and adapters under ``out``; return the comparison table."""
    settings = PROFILES[profile]
    bases, data, adapters = out / "bases", out / "data", out / "adapters"
    timings = {}

    start = time.perf_counter()
    _ensure_family(bases, profile, progress)
    if not (data / "_profile").exists() or (data / "_profile").read_text() != profile:
        build_demo_tasks(data, seed=0, n_train=settings.n_train, n_eval=settings.n_eval)
        (data / "_profile").write_text(profile)
    tasks = load_tasks(data)
    timings["bases_and_data_s"] = round(time.perf_counter() - start, 1)

    method = MethodConfig(name="lora", r=settings.r, alpha=float(settings.r))
    plain = TrainConfig(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr)
    regularised = TrainConfig(**{**asdict(plain), "p_c": settings.p_c, "p_i": settings.p_i})

    start = time.perf_counter()
    trained = {"plain-v1": _ensure_adapter(adapters / "plain-v1", bases / "v1", tasks, plain, method, progress),
               "transpeft-v1": _ensure_adapter(adapters / "transpeft-v1", bases / "v1", tasks, regularised, method,
                                               progress)}
    for target in settings.targets:
        trained[f"plain-{target}"] = _ensure_adapter(adapters / f"plain-{target}", bases / target, tasks, plain,
                                                     method, progress)
    timings["train_s"] = round(time.perf_counter() - start, 1)

    start = time.perf_counter()
    scores = {}
    for version in ("v1", *settings.targets):
        model, tokenizer, base = load_base(BaseRef(str(bases / version), family="demo"))
        names = ["plain-v1", "transpeft-v1"] + ([f"plain-{version}"] if version != "v1" else [])
        results = evaluate_adapters(model, tokenizer, base, [trained[n] for n in names], tasks, progress=progress)
        for name in names:
            scores[(name, version)] = results[str(trained[name])]
    timings["evaluate_s"] = round(time.perf_counter() - start, 1)

    table = {}
    for task in tasks:
        row = {"kind": task.kind, "Trans-PEFT on v1 (eval v1)": scores[("transpeft-v1", "v1")][task.name]["exact_match"]}
        for target in settings.targets:
            ft_v1, direct, trans, ft_new = arm_names(target)
            row[ft_v1] = scores[("plain-v1", "v1")][task.name]["exact_match"]
            row[direct] = scores[("plain-v1", target)][task.name]["exact_match"]
            row[trans] = scores[("transpeft-v1", target)][task.name]["exact_match"]
            row[ft_new] = scores[(f"plain-{target}", target)][task.name]["exact_match"]
        table[task.name] = row

    return {"profile": profile, "settings": asdict(settings), "exact_match": table, "seconds": timings,
            "commands": commands(out, settings)}


def commands(out: Path, s: ComparisonProfile) -> list[str]:
    """The CLI commands that produce the same numbers, one step each."""
    train = (f"transpeft train --data {out}/data --steps {s.steps} --batch-size {s.batch_size} --lr {s.lr} "
             f"--r {s.r} --alpha {float(s.r)}")
    lines = [f"transpeft bases build-demo --profile {'test' if s is PROFILES['test'] else 'demo'} --out {out}/bases",
             f"transpeft data build-demo --out {out}/data"
             + (f" --n-train {s.n_train} --n-eval {s.n_eval}" if s.n_train else ""),
             f"{train} --base {out}/bases/v1 --out {out}/adapters/plain-v1",
             f"{train} --base {out}/bases/v1 --p-c {s.p_c} --p-i {s.p_i} --out {out}/adapters/transpeft-v1"]
    for target in s.targets:
        lines.append(f"{train} --base {out}/bases/{target} --out {out}/adapters/plain-{target}")
    for target in s.targets:
        lines.append(f"transpeft evaluate --base {out}/bases/{target} --data {out}/data "
                     f"{out}/adapters/plain-v1 {out}/adapters/transpeft-v1 {out}/adapters/plain-{target}")
    return lines


def format_table(result: dict) -> str:
    """Exact match (%) per task and arm, one block per updated base, then the commands."""
    targets = result["settings"]["targets"]
    lines = [f"Exact match (%) on the demo tasks, profile {result['profile']}"]
    for target in targets:
        arms = arm_names(target)
        lines += ["", f"{'task':<12}{'kind':<14}" + "".join(f"{a:>{max(len(a), 8) + 2}}" for a in arms)]
        for task, row in result["exact_match"].items():
            lines.append(f"{task:<12}{row['kind']:<14}"
                         + "".join(f"{100 * row[a]:>{max(len(a), 8) + 2}.1f}" for a in arms))
    lines += ["", "Produced by (same numbers, step by step):"] + [f"  {c}" for c in result["commands"]]
    lines.append(f"Time: {result['seconds']}")
    return "\n".join(lines)
