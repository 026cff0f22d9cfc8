"""The ``transpeft`` command line: thin wrappers over the library, JSON output on request.

    transpeft bases build-demo --profile demo --out demo/bases
    transpeft data build-demo --out demo/data
    transpeft train --base demo/bases/v1 --data demo/data --p-c 0.1 --out adapters/tp-v1
    transpeft evaluate --base demo/bases/v1 --data demo/data adapters/tp-v1
    transpeft transfer adapters/tp-v1 --from demo/bases/v1 --to demo/bases/v2 --data demo/data
    transpeft study --quick --out /tmp/study
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_ERROR, EXIT_INCOMPATIBLE = 2, 3


def _examples(*lines: str) -> str:
    return "example:\n  " + "\n  ".join(lines)


def _parser(name: str, sub, help: str, *examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=_examples(*examples),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_base(p: argparse.ArgumentParser, flag: str = "--base", dest: str = "base", required: bool = True,
              what: str = "base") -> None:
    p.add_argument(flag, dest=dest, required=required, metavar="DIR_OR_HUB_ID",
                   help=f"{what}: a local model directory, or a hub id (then pin {flag}-revision)")
    p.add_argument(f"{flag}-revision", dest=f"{dest}_revision", help=f"commit or tag of a hub {what}")
    p.add_argument(f"{flag}-family", dest=f"{dest}_family",
                   help="family name (default: the name in family.json beside the version folders, else the parent "
                        "folder's)")
    p.add_argument(f"{flag}-version", dest=f"{dest}_version", help="version name (default: the directory name)")


def _base_ref(args, dest: str = "base"):
    from .bases import BaseRef

    return BaseRef(getattr(args, dest), getattr(args, f"{dest}_revision"),
                   getattr(args, f"{dest}_family"), getattr(args, f"{dest}_version"))


def _add_placement(p: argparse.ArgumentParser, default: str = "auto") -> None:
    from .placement import CPU_BF16_MIN_HIDDEN, DTYPES

    p.add_argument("--device", help=f"cpu, cuda or cuda:<index> (default: {default}; auto: the GPU if there is one)")
    p.add_argument("--dtype", choices=("auto", *DTYPES),
                   help=f"the base weights' dtype (default: {default}; auto: bf16 on a GPU, and on a CPU with bf16 "
                        f"kernels for bases {CPU_BF16_MIN_HIDDEN} wide or more, else fp32)")


def _placement(args, default=None):
    """The --device/--dtype choice, each falling back to ``default`` (a Placement) or auto."""
    from .placement import Placement

    default = default or Placement()
    return Placement(args.device or default.device, args.dtype or default.dtype)


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _emit(args, payload: dict, text: str, errors: list[str] = ()) -> None:
    """Results to stdout (JSON with --json, else text); errors to stderr, one `error:` line each."""
    print(json.dumps(payload, indent=2, default=str) if args.json else text)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)


def _metrics_table(rows: dict[str, dict], columns=("exact_match", "token_accuracy", "answer_loss")) -> str:
    lines = [f"{'task':<14}" + "".join(f"{c:>16}" for c in columns)]
    for task, metrics in rows.items():
        lines.append(f"{task:<14}" + "".join(f"{metrics[c]:>16.3f}" for c in columns))
    return "\n".join(lines)


# -- commands ---------------------------------------------------------------------------------


def cmd_bases_build_demo(args) -> int:
    from .demo.family import build_demo_family

    summary = build_demo_family(Path(args.out), profile=args.profile, progress=not args.json, quick=args.quick,
                                name=args.family)
    similarity = ", ".join(f"{pair} attention {s['attention']:.3f} / FFN {s['ffn']:.3f}"
                           for pair, s in summary["similarity"].items())
    _emit(args, summary, f"built demo base family ({args.profile}) in {args.out}: v1, v2, v3\n"
                         f"output similarity on task inputs: {similarity}")
    return 0


def cmd_bases_fingerprint(args) -> int:
    from .bases import describe_base

    _, _, info = describe_base(_base_ref(args))
    _emit(args, info.as_dict(), f"{info.family}/{info.version}  {info.fingerprint}")
    return 0


def cmd_data_build_demo(args) -> int:
    from .demo.tasks import build_demo_tasks

    names = build_demo_tasks(Path(args.out), seed=args.seed, n_train=args.n_train, n_eval=args.n_eval)
    _emit(args, {"tasks": names, "out": args.out}, f"wrote {len(names)} tasks to {args.out}: {', '.join(names)}")
    return 0


def cmd_data_validate(args) -> int:
    from .data import load_tasks

    tasks = load_tasks(args.data, args.tasks)
    payload = {t.name: {"kind": t.kind, "train": len(t.train), "eval": len(t.eval), "hash": t.content_hash,
                        "duplicates": {split: t.duplicates(split) for split in ("train", "eval")}} for t in tasks}
    text = "\n".join(f"{n:<14} {v['kind']:<13} train {v['train']:>6}  eval {v['eval']:>5}  "
                     + (", ".join(f"{k} rows repeated in {split}" for split, k in v["duplicates"].items() if k)
                        or "ok") for n, v in payload.items())
    _emit(args, payload, text)
    return 0


def cmd_train(args) -> int:
    from .bases import load_base
    from .data import load_tasks
    from .config import MethodConfig, TrainConfig, from_flags
    from .train import train_adapter

    method = from_flags(MethodConfig, args, rename={"name": "method"})
    config = from_flags(TrainConfig, args)
    tasks = load_tasks(args.data, args.tasks)
    model, tokenizer, base = load_base(_base_ref(args), _placement(args))
    registry = _registry(args)
    if registry:  # refuse before spending the training time
        registry.base(base.family, base.version)
    _, manifest, result = train_adapter(model, tokenizer, base, tasks, method, config, args.out, progress=not args.json)
    payload = {"adapter": args.out, "base": f"{base.family}/{base.version}", "placement": manifest.training["placement"],
               "metrics": manifest.metrics,
               "final_loss": result.losses[-1], "seconds": round(result.seconds, 1),
               "tokens_per_second": round(result.tokens_per_second)}
    if registry:
        from .tracking import adapter_name
        from .versioning import dvc_hash

        name = adapter_name(Path(args.out))
        run_id = registry.log_training(name, Path(args.out), manifest,
                                       extra_tags={"dvc_data_hash": dvc_hash(args.data) or "untracked"})
        record = registry.register_adapter(name, Path(args.out), base, "trained", manifest.metrics, run_id,
                                           manifest=manifest)
        payload["registered"] = {"model": f"adapter-{name}", "version": record.model_version, "run_id": run_id}
    _emit(args, payload, f"saved {args.out} (trained on {payload['base']}, {payload['seconds']} s)\n"
                         + _metrics_table(manifest.metrics)
                         + (f"\nregistered as adapter-{name} version {record.model_version}" if registry else ""))
    return 0


def _registry(args):
    """The tracking registry when --track was given (checked reachable now), else None."""
    if not getattr(args, "track", False):
        return None
    from .tracking import Registry

    return Registry(args.tracking_uri)


def cmd_evaluate(args) -> int:
    from .bases import load_base
    from .data import load_tasks
    from .placement import placed
    from .transfer import evaluate_adapters

    tasks = load_tasks(args.data, args.tasks)
    registry = _registry(args)  # checked reachable before the work starts
    model, tokenizer, base = load_base(_base_ref(args), _placement(args))
    results = evaluate_adapters(model, tokenizer, base, [Path(a) for a in args.adapters], tasks,
                                batch_size=args.batch_size, progress=not args.json)
    text, errors = [], []
    for adapter, rows in results.items():
        if "error" in rows:
            errors.append(rows["error"])
            continue
        if registry:
            from .tracking import adapter_name

            registry.log_evaluation(adapter_name(Path(adapter)), base, rows)
        text += [f"== {adapter} on {base.family}/{base.version}", _metrics_table(rows)]
    _emit(args, {"base": base.as_dict(), "placement": placed(model), "results": results}, "\n".join(text), errors)
    return EXIT_ERROR if errors else 0


def cmd_transfer(args) -> int:
    import tempfile
    from dataclasses import replace

    from .bases import lend_base
    from .data import load_tasks
    from .revalidate import close_revalidation, open_revalidation, plan_folders, record_outcome, revalidate
    from .transfer import evaluate_adapters

    registry = _registry(args)
    # judged as transferred: carrying a failing adapter some other way is the revalidation flow's, not this command's
    gate = replace(_gate(args.params), strategies=("direct",))
    folders = [Path(a) for a in args.adapters]
    old, old_label = None, "recorded at training"
    if args.source:
        with lend_base(_base_ref(args, "source"), placement=_placement(args)) as slot:
            scored = evaluate_adapters(slot.model, slot.tokenizer, slot.info, folders, load_tasks(args.data))
        old = {k: {t: m["exact_match"] for t, m in v.items()} for k, v in scored.items() if "error" not in v}
        old_label = f"{slot.info.family}/{slot.info.version}"
    with lend_base(_base_ref(args, "target"), placement=_placement(args)) as slot, \
            tempfile.TemporaryDirectory() as workdir:
        target = slot.info
        if registry:
            registry.base(target.family, target.version)  # registered, or refused before any work
        plan = plan_folders(target, folders, old)
        parent = open_revalidation(registry, target, plan) if registry else None
        outcomes = []
        for folder, candidate in zip(folders, plan.candidates):
            outcomes.append(revalidate(slot, folder, candidate, Path(args.data), gate, Path(workdir)))
            if registry:
                outcomes[-1] = record_outcome(registry, parent, target, outcomes[-1])
        if registry:
            close_revalidation(registry, parent, target, plan, outcomes, crashed=[], whole_family=False)
    new_base = f"{target.family}/{target.version}"
    payload = {"new_base": new_base, "placement": outcomes[0].placement if outcomes else "", "old_metric": old_label,
               "adapters": {str(f): o.as_dict() for f, o in zip(folders, outcomes)}}
    if registry:
        payload["run_id"] = parent
    lines, errors = [], []
    for folder, o in zip(folders, outcomes):
        if o.decision == "failed":  # could not be evaluated: an error, not a result
            errors.append(f"{folder} could not be carried to {new_base}: " + "; ".join(o.reasons))
            continue
        lines.append(f"== {folder}: {o.decision} ({o.source_version or '?'} -> {new_base}; old metric {old_label})")
        if o.new:
            lines.append(f"{'task':<14}{'old EM':>10}{'new EM':>10}{'retention':>11}")
            for task, new in o.new.items():
                before = o.old.get(task)
                retention = f"{new / before:.2f}" if before else "-"
                lines.append(f"{task:<14}{before or 0:>10.3f}{new:>10.3f}{retention:>11}")
        lines += [f"  - {reason}" for reason in o.reasons]
    _emit(args, payload, "\n".join(lines), errors)
    failures = {o.failure for o in outcomes if o.decision == "failed"}
    return EXIT_INCOMPATIBLE if "incompatible" in failures else EXIT_ERROR if failures else 0


def _gate(params_file: str):
    """The gate of ``params_file`` when there is one, else the gate's defaults (params.yaml's)."""
    from .params import Gate, load_params

    return load_params(params_file).gate if Path(params_file).is_file() else Gate()


def cmd_bases_register(args) -> int:
    from .bases import BaseLoadError, describe_base, recorded_family
    from .events import (BASE_REGISTERED, TRANSFER_DEPLOYMENT, EventNotDelivered, announcement, check_reachable,
                         emit, prefect_api_url)

    ref = _base_ref(args)
    if ref.is_local and not ref.family and not recorded_family(ref.source):  # a folder's name is no family's name
        raise BaseLoadError(f"base {ref.source}: which family is it? Give --base-family NAME, or write family.json "
                            f'with {{"family": "NAME"}} beside its version folders')
    registry = _registry(args)
    api_url = None if args.no_event else prefect_api_url(args.prefect_api_url)
    if api_url:
        check_reachable(api_url)  # before registering, so the common failure changes nothing
    _, _, info = describe_base(ref)
    record = registry.register_base(info, parent=args.parent)
    payload = dict(record.__dict__)
    text = (f"registered base {record.family}/{record.version} as base-{record.family} "
            f"version {record.model_version} ({record.fingerprint})")
    if api_url:
        event = announcement(record, "transpeft-cli")
        try:
            payload["event_id"] = emit(event, api_url)
        except EventNotDelivered as e:
            print(f"error: base {record.family}/{record.version} IS registered (base-{record.family} version "
                  f"{record.model_version}), but its revalidation did not start: {e}\n"
                  f"start it with: prefect deployment run '{TRANSFER_DEPLOYMENT}' -p family={record.family} "
                  f"-p version={record.version}\n"
                  "or leave it to the nightly run, whose reconciler revalidates every base left without one",
                  file=sys.stderr)
            return EXIT_ERROR
        text += (f"\nemitted {BASE_REGISTERED} (event {payload['event_id']}) to {api_url}: "
                 f"it starts {TRANSFER_DEPLOYMENT} for {record.family}/{record.version}")
    _emit(args, payload, text)
    return 0


def cmd_bases_list(args) -> int:
    records = _registry(args).bases(args.family)
    lines = [f"{'family':<12}{'version':<10}{'parent':<10}{'mlflow':<8}fingerprint"]
    lines += [f"{r.family:<12}{r.version:<10}{r.parent or '-':<10}{r.model_version:<8}{r.fingerprint[:23]}"
              for r in records]
    _emit(args, {"bases": [r.__dict__ for r in records]}, "\n".join(lines))
    return 0


def cmd_adapters_list(args) -> int:
    from .report import registry_matrix

    records = _registry(args).adapters()
    matrix = registry_matrix(records)
    versions = sorted({v for row in matrix.values() for v in row})
    serving = {name: {r.base_version for r in rows if r.serving} for name, rows in records.items()}
    lines = [f"{'adapter':<20}" + "".join(f"{v:>24}" for v in versions)]
    for name, row in sorted(matrix.items()):
        cells = ["-" if v not in row else f"{100 * row[v][0]:5.1f} {row[v][1]}" + ("*" if v in serving[name] else "")
                 for v in versions]
        lines.append(f"{name:<20}" + "".join(f"{c:>24}" for c in cells))
    lines.append("mean exact match (%) over the adapter's tasks, registry status; * = served on that base")
    _emit(args, {name: [r.__dict__ for r in rows] for name, rows in records.items()}, "\n".join(lines))
    return 0


def cmd_story(args) -> int:
    from .demo.story import StoryError, run_story

    try:
        run_story(Path(args.report))
    except StoryError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def cmd_study(args) -> int:
    from dataclasses import replace

    from .demo.family import PROFILES, ensure_demo_family
    from .demo.tasks import ensure_demo_tasks
    from .params import load_params
    from .study import Inputs, run_study

    params = load_params(args.params)
    config = params.study
    if config is None:
        print(f"error: {args.params} has no study key", file=sys.stderr)
        return EXIT_ERROR
    def say(line: str) -> None:  # progress; on stderr when stdout carries the JSON result
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    if args.profile:  # a self-built family of that size, built here unless already there
        ensure_demo_family(Path(args.bases), args.profile, quick=args.quick, say=say)
        profile = PROFILES[args.profile].quick() if args.quick else PROFILES[args.profile]
        ensure_demo_tasks(Path(args.data), profile.n_train, profile.n_eval)
    overrides = {k: v for k, v in (("seeds", args.seeds), ("workers", args.workers), ("steps", args.steps)) if v}
    config = replace(config, **overrides)
    config = config.quick() if args.quick else config
    if args.render:
        from .study import render

        results = Path(args.out) / "results.json"
        if not results.is_file():
            print(f"error: --render needs {results}; run the study first", file=sys.stderr)
            return EXIT_ERROR
        summary = render(json.loads(results.read_text()), config, Path(args.out))
        _emit(args, summary, f"re-rendered {args.out}/ from {results}")
        return 0
    versions = sorted({v for pair in config.pairs for v in pair})
    inputs = Inputs(bases={v: str(Path(args.bases) / v) for v in versions}, family=params.bases.family,
                    data=args.data, workdir=args.workdir, placement=_placement(args, params.placement))
    if args.strategies_only:
        from .study import run_strategies

        if not config.strategies or not (Path(args.out) / "results.json").is_file():
            print(f"error: --strategies-only needs study.strategies in {args.params} and {args.out}/results.json "
                  "from a study already run", file=sys.stderr)
            return EXIT_ERROR
        summary = run_strategies(config, inputs, Path(args.out), say=say)
    else:
        summary = run_study(config, inputs, Path(args.out), say=say)
    from .study_results import main_table

    text = main_table(summary) + f"\n\nre-tune knee: {summary['retune_knee']} steps; wrote {args.out}/"
    if args.track:
        from .tracking import log_study, tracking_uri

        text += f"\nMLflow run {log_study(tracking_uri(args.tracking_uri), summary, Path(args.out))} (experiment study)"
    _emit(args, summary, text)
    return 0


def cmd_stack(args) -> int:
    from . import stack

    try:
        if args.scale:
            os.environ["TRANSPEFT_SCALE"] = "1"  # read by Stack.find, and kept by the components it starts
        local = stack.Stack.find(args.project)
        if args.stack_command == "status":
            report = stack.status(local)
            _emit(args, report, stack.format_status(report))
        else:
            getattr(stack, args.stack_command)(local, say=lambda line: print(line, flush=True))
    except stack.StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .config import MethodConfig, TrainConfig, add_flags

    parser = argparse.ArgumentParser(prog="transpeft", description="Train, transfer and evaluate PEFT adapters across base model updates (Trans-PEFT).",
                                     epilog=_examples("transpeft story --report demo-report"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    bases = _parser("bases", sub, "base models: build the demo family, fingerprint a base",
                    "transpeft bases build-demo --profile test --out demo/bases")
    bases_sub = bases.add_subparsers(dest="bases_command", required=True)
    p = _parser("build-demo", bases_sub, "build the demo base family v1 (pretrained), v2 and v3 (updated)",
                "transpeft bases build-demo --profile demo --out demo/bases")
    p.add_argument("--profile", choices=("test", "demo", "gpu"), default="demo",
                   help="test: seconds, for tests; demo: about 5 minutes on 2 CPU cores; gpu: 27.5 M parameters, "
                        "100 M tokens, for a GPU")
    p.add_argument("--quick", action="store_true", help="the profile's shapes in a few steps (a smoke run)")
    p.add_argument("--out", required=True, help="directory to write v1/, v2/, v3/ and family.json to")
    p.add_argument("--family", help="the family's name, in family.json: its versions register under it (default: "
                                    "the --out folder's name)")
    _add_json(p)
    p.set_defaults(func=cmd_bases_build_demo)
    p = _parser("fingerprint", bases_sub, "print a base's family, version and fingerprint",
                "transpeft bases fingerprint --base demo/bases/v2 --json")
    _add_base(p)
    _add_json(p)
    p.set_defaults(func=cmd_bases_fingerprint)
    p = _parser("register", bases_sub, "register a base version in the MLflow registry (idempotent) and "
                "announce it to Prefect, which starts the revalidation of every adapter of its family",
                "transpeft bases register --base demo/bases/v2 --base-family demo --parent v1")
    _add_base(p)
    p.add_argument("--parent", help="the version this one was continued from (must be registered)")
    _add_tracking(p, always=True)
    p.add_argument("--prefect-api-url", help="Prefect server the transpeft.base.registered event goes to "
                                             "(default: $PREFECT_API_URL, else http://127.0.0.1:4200/api)")
    p.add_argument("--no-event", action="store_true",
                   help="register only: no event, so no revalidation starts (the nightly run catches up)")
    _add_json(p)
    p.set_defaults(func=cmd_bases_register)
    p = _parser("list", bases_sub, "list the registered base versions", "transpeft bases list --family demo")
    p.add_argument("--family", help="only this family")
    _add_tracking(p, always=True)
    _add_json(p)
    p.set_defaults(func=cmd_bases_list)

    adapters = _parser("adapters", sub, "the adapter registry", "transpeft adapters list --json")
    adapters_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    p = _parser("list", adapters_sub, "each adapter's metric and status on every base version",
                "transpeft adapters list")
    _add_tracking(p, always=True)
    _add_json(p)
    p.set_defaults(func=cmd_adapters_list)

    data = _parser("data", sub, "task data: build the demo tasks, validate a data folder",
                   "transpeft data validate demo/data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = _parser("build-demo", data_sub, "write the demo tasks as JSONL train/eval splits",
                "transpeft data build-demo --out demo/data")
    p.add_argument("--out", required=True, help="directory to write one folder per task to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, help="training rows per task (default: the demo's own size)")
    p.add_argument("--n-eval", type=int, help="evaluation rows per task (default: the demo's own size); "
                   "lookup asks at most 120, add 247")
    _add_json(p)
    p.set_defaults(func=cmd_data_build_demo)
    p = _parser("validate", data_sub, "check every row of every task; bad rows are named by file and line",
                "transpeft data validate demo/data --tasks reverse,sort")
    p.add_argument("data", help="folder of task folders")
    _add_tasks(p)
    _add_json(p)
    p.set_defaults(func=cmd_data_validate)

    p = _parser("train", sub, "fine-tune one adapter with Trans-PEFT on one or more tasks",
                "transpeft train --base demo/bases/v1 --data demo/data --p-c 0.1 --out adapters/tp-v1",
                "transpeft train --base Qwen/Qwen2-0.5B --base-revision <commit> --data my-tasks \\",
                "    --method dora --r 8 --target-modules q_proj,v_proj --out adapters/support-v1")
    _add_base(p)
    p.add_argument("--data", required=True, help="folder of task folders")
    _add_tasks(p)
    p.add_argument("--out", required=True, help="adapter folder to write (replaced atomically)")
    add_flags(p, MethodConfig, rename={"name": "method"})  # --method, --r, ..., checked as they are parsed
    add_flags(p, TrainConfig)
    _add_placement(p)
    _add_tracking(p)
    _add_json(p)
    p.set_defaults(func=cmd_train)

    p = _parser("evaluate", sub, "score adapters on a base loaded once (exact match, token accuracy, loss)",
                "transpeft evaluate --base demo/bases/v2 --data demo/data adapters/plain-v1 adapters/tp-v1")
    _add_base(p)
    p.add_argument("--data", required=True, help="folder of task folders")
    _add_tasks(p)
    p.add_argument("adapters", nargs="+", help="adapter folders")
    p.add_argument("--batch-size", type=int, default=32)
    _add_placement(p)
    _add_tracking(p)
    _add_json(p)
    p.set_defaults(func=cmd_evaluate)

    p = _parser("transfer", sub, "put adapters on a new base (loaded once) and judge them by the gate, as the "
                                 "revalidation flow does: decision, old vs new metric, and with --track the same "
                                 "MLflow record",
                "transpeft transfer adapters/tp-v1 --from demo/bases/v1 --to demo/bases/v2 --data demo/data",
                "transpeft transfer adapters/* --to demo/bases/v2 --data demo/data --track")
    p.add_argument("adapters", nargs="+", help="adapter folders")
    _add_base(p, "--to", dest="target", what="new base")
    _add_base(p, "--from", dest="source", required=False, what="old base (default: the metrics recorded at training)")
    p.add_argument("--data", required=True, help="folder of task folders")
    p.add_argument("--params", default="params.yaml",
                   help="the params file whose gate judges each adapter (default: params.yaml; where there is none, "
                        "the gate's defaults); a failing adapter is flagged here, never re-tuned")
    _add_placement(p)
    _add_tracking(p)
    _add_json(p)
    p.set_defaults(func=cmd_transfer)

    p = _parser("story", sub, "the whole product story on the demo family (make demo): data and bases with DVC, "
                              "the local stack, the fleet on v1, v2 and v3 revalidated by themselves, the report",
                "transpeft story --report demo-report")
    p.add_argument("--report", default="demo-report", help="where to write report.html, report.md and images")
    p.set_defaults(func=cmd_story)
    p = _parser("study", sub, "the transfer study: plain vs Trans-PEFT adapters over a grid of settings, seeds and "
                              "base updates, with re-tune curves; raw rows, summary, report and plots",
                "transpeft study                                   # params.yaml's study (= dvc repro study)",
                "transpeft study --quick --out /tmp/study           # the whole path in a minute, measures nothing",
                "transpeft study --strategies-only                 # re-measure only the gate's strategies",
                "transpeft study --profile gpu --bases study-gpu/bases --data study-gpu/data --out study/gpu \\",
                "    --device cuda --dtype bfloat16 --workers 1")
    p.add_argument("--params", default="params.yaml", help="the params file whose study key to run")
    p.add_argument("--bases", default="pipeline/bases", help="folder holding one folder per base version")
    p.add_argument("--data", default="pipeline/data", help="folder of task folders")
    p.add_argument("--out", default="study", help="where results.json, summary.json, report.md and plots go")
    p.add_argument("--workdir", default="pipeline/study", help="where finished jobs are kept, for resuming")
    p.add_argument("--profile", choices=("test", "demo", "gpu"),
                   help="build that demo family into --bases and its tasks into --data first, unless already there")
    p.add_argument("--quick", action="store_true", help="two settings, two seeds, a few steps: a smoke run")
    p.add_argument("--render", action="store_true",
                   help="train nothing: rebuild summary.json, report.md and the plots from OUT/results.json")
    p.add_argument("--strategies-only", action="store_true",
                   help="only the strategies phase (study.strategies), on the study in OUT/results.json")
    p.add_argument("--seeds", type=lambda s: tuple(int(x) for x in s.split(",")), help="comma-separated seeds")
    p.add_argument("--steps", type=int, help="adapter training steps (default: study.steps)")
    p.add_argument("--workers", type=int, help="parallel training processes (default: study.workers)")
    _add_placement(p, "params.yaml's placement")
    _add_tracking(p)
    _add_json(p)
    p.set_defaults(func=cmd_study)

    p = _parser("stack", sub, "the local stack: Prefect server, MLflow server, webhook receiver and a worker "
                              "serving prefect.yaml's deployments, all on 127.0.0.1, state under the project",
                "transpeft stack up", "transpeft stack status",
                "PREFECT_PORT=4300 MLFLOW_PORT=5300 TRANSPEFT_WEBHOOK_PORT=5355 transpeft stack up")
    p.add_argument("stack_command", choices=("up", "down", "status"),
                   help="up: start what is not running and deploy (idempotent); down: stop all; status: one "
                        "line per component")
    p.add_argument("--project", help="the directory holding prefect.yaml (default: the current one or above)")
    p.add_argument("--scale", action="store_true",
                   help="the at-scale configuration on this machine: PostgreSQL under both servers, artifacts in an "
                        "S3-compatible server, the fan-out on a Dask scheduler and two workers (TRANSPEFT_SCALE=1)")
    _add_json(p)
    p.set_defaults(func=cmd_stack)
    return parser


def _add_tracking(p: argparse.ArgumentParser, always: bool = False) -> None:
    if always:
        p.set_defaults(track=True)
    else:
        p.add_argument("--track", action="store_true",
                       help="log runs to MLflow and register the adapters (the base must be registered)")
    p.add_argument("--tracking-uri", help="MLflow tracking server (default: $MLFLOW_TRACKING_URI, "
                                          "else http://127.0.0.1:5000)")


def _add_tasks(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", type=lambda s: [x for x in s.split(",") if x],
                   help="comma-separated task names (default: every task in the folder)")


def main(argv: list[str] | None = None) -> int:
    from . import auth
    from .adapters import AdapterFileError, AdapterNotSaved
    from .bases import BaseLoadError
    from .data import DataError
    from .events import EventNotDelivered
    from .placement import PlacementError
    from .regularisers import NoFFNFound
    from .tracking import NotRegistered, RegistryConflict, TrackingUnavailable
    from .train import TrainingDiverged
    from .transfer import IncompatibleBase

    args = build_parser().parse_args(argv)
    if getattr(args, "json", False):  # MLflow prints "View run ... at" on stdout when a run ends: not JSON
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        auth.from_files()  # secrets in *_FILE files into the variables MLflow's and Prefect's clients read
        return args.func(args)
    except IncompatibleBase as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INCOMPATIBLE
    except (AdapterFileError, AdapterNotSaved, BaseLoadError, DataError, EventNotDelivered, NoFFNFound, PlacementError,
            TrainingDiverged,
            TrackingUnavailable, NotRegistered, RegistryConflict, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
