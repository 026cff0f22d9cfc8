"""Every configuration model, defined once, and the one way they are checked.

``TrainConfig``, ``MethodConfig``, ``BottleneckConfig`` and ``StudyConfig`` here, and params.yaml's
sections in ``params``, are frozen dataclasses that pydantic validates on construction (and on
``dataclasses.replace``), with the value types below: one ``Probability`` ([0, 1), for p_c, p_i and
dropout alike), ``Count`` (>= 1), ``Literal`` choices. A bad value raises ``ConfigError`` naming its
key and what it allows, e.g. ``p_c must be in [0, 1), got 1.5``; params.yaml's loader names the
dotted key, the command line the flag. ``add_flags`` and ``from_flags`` make a model's fields the
command line's flags, so a new training knob is one line of ``TrainConfig``.

Light by design (no torch, no transformers): params.yaml loads without the training stack.
"""

from __future__ import annotations

import argparse
import functools
import types
from dataclasses import fields, is_dataclass
from typing import Annotated, Any, Callable, Literal, Union, get_args, get_origin, get_type_hints

from pydantic import (AfterValidator, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, WrapValidator,
                      field_validator)
from pydantic.dataclasses import dataclass

from . import defaults

# -- value types --------------------------------------------------------------------------------


class Invalid(ValueError):
    """A value its key does not allow; the message continues the key: ``p_c`` + ``must be in [0, 1), got 1.5``."""


class ConfigError(ValueError):
    """A configuration model refused its values; the message names each bad key and what it allows."""

    def __init__(self, message: str, error: ValidationError | None = None):
        super().__init__(message)
        self.error = error  # pydantic's, to be re-worded with other key names (params.yaml's, the flags')


def rule(allowed: str, test: Callable[[Any], bool]) -> AfterValidator:
    """A constraint whose error reads ``<key> must be <allowed>, got <value>``."""

    def check(value):
        if not test(value):
            raise Invalid(f"must be {allowed}, got {value!r}")
        return value

    return AfterValidator(check)


def nonempty(hint: str) -> AfterValidator:
    """A collection that may not be empty; the error reads ``<key> is empty; <hint>``."""

    def check(value):
        if not value:
            raise Invalid(f"is empty; {hint}")
        return value

    return AfterValidator(check)


# A whole number given where a float is declared stays an int, as it did before validation existed,
# so manifests, tracked parameters and study job ids keep their bytes (alpha: 16 stays 16).
Real = Annotated[float, WrapValidator(lambda value, convert: value if type(value) is int else convert(value))]
Probability = Annotated[Real, rule("in [0, 1)", lambda p: 0 <= p < 1)]  # p_c, p_i, dropout, warmup
Count = Annotated[int, rule(">= 1", lambda n: n >= 1)]
PositiveReal = Annotated[Real, rule("> 0", lambda x: x > 0)]

MethodName = Literal["lora", "dora", "ia3", "bottleneck"]  # methods.METHODS, one entry each
Variant = Literal["serial", "parallel"]
Sublayer = Literal["attention", "ffn"]
SUBLAYERS: tuple[str, ...] = get_args(Sublayer)
Activation = Literal["relu", "gelu", "silu", "tanh"]  # bottleneck.ACTIVATIONS
Precision = Literal["auto", "fp32", "bf16"]
TooLong = Literal["refuse", "truncate"]  # batching.TOO_LONG
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")  # the reference scripts' LoRA targets


def config(cls):
    """Make ``cls`` a frozen dataclass validated by pydantic: unknown keys are refused, values are
    converted to their declared types, and a bad one raises ConfigError naming it."""
    model = dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)
    validate = model.__init__

    @functools.wraps(validate)
    def __init__(self, *args, **kwargs):
        try:
            validate(self, *args, **kwargs)
        except ValidationError as e:
            raise ConfigError("; ".join(describe(e, model)), e) from None

    model.__init__ = __init__
    return model


@functools.lru_cache(maxsize=None)
def _adapter(kind) -> TypeAdapter:
    return TypeAdapter(kind)


def check(kind, value, key: str):
    """``value`` validated as ``kind`` (e.g. Probability), or ConfigError naming ``key``."""
    try:
        return _adapter(kind).validate_python(value)
    except ValidationError as e:
        raise ConfigError("; ".join(describe(e, key=lambda loc: ".".join(map(str, (key, *loc)))))) from None


# -- error messages -----------------------------------------------------------------------------


def dotted(loc: tuple) -> str:
    return ".".join(map(str, loc))


def describe(error: ValidationError, root: type | None = None, key: Callable[[tuple], str] = dotted) -> list[str]:
    """One line per error, naming the key (``key(loc)``: dotted, or a flag) and what it allows."""
    lines = []
    for e in error.errors(include_url=False):
        loc, kind = tuple(e["loc"]), e["type"]
        where = key(loc)
        if kind.startswith("missing"):
            lines.append(f"missing {'item' if loc and isinstance(loc[-1], int) else 'key'} {where}")
        elif kind in ("extra_forbidden", "unexpected_keyword_argument"):
            known = _known(root, loc[:-1])
            lines.append(f"unknown key {where}" + (f" (known: {', '.join(sorted(known))})" if known else ""))
        elif kind == "value_error":
            cause = e["ctx"]["error"]
            lines.append(f"{where} {cause}".strip() if isinstance(cause, Invalid) else
                         f"{where}: {cause}" if where else str(cause))
        elif kind == "dataclass_type":
            lines.append(f"{where} must be a mapping, got {type(e['input']).__name__}".strip())
        else:  # pydantic's own: "Input should be a valid integer" -> "<key> must be a valid integer, got ..."
            msg, got = e["msg"], repr(e["input"])
            got = got if len(got) <= 80 else got[:77] + "..."
            if msg.startswith("Input should be"):
                lines.append(f"{where} must be{msg.removeprefix('Input should be')}, got {got}".strip())
            else:
                lines.append(f"{where}: {msg[0].lower()}{msg[1:]}, got {got}" if where else f"{msg}, got {got}")
    return lines


def _bare(kind):
    """``kind`` without Annotated and Optional around it."""
    while True:
        origin = get_origin(kind)
        if origin is Annotated:
            kind = get_args(kind)[0]
        elif origin in (Union, types.UnionType) and type(None) in get_args(kind) and len(get_args(kind)) == 2:
            kind = next(a for a in get_args(kind) if a is not type(None))
        else:
            return kind


def _known(root, loc: tuple) -> list[str]:
    """The keys the dataclass at ``loc`` under ``root`` has (for "unknown key ... (known: ...)")."""
    kind = root
    for part in loc:
        kind = _bare(kind)
        origin, args = get_origin(kind), get_args(kind)
        if isinstance(kind, type) and is_dataclass(kind):
            kind = get_type_hints(kind, include_extras=True).get(part)
        elif origin is dict:
            kind = args[1]
        elif origin is tuple and isinstance(part, int):
            kind = args[0] if args[-1] is Ellipsis else args[part] if part < len(args) else None
        else:
            return []
    kind = _bare(kind)
    return [f.name for f in fields(kind)] if isinstance(kind, type) and is_dataclass(kind) else []


# -- the models ---------------------------------------------------------------------------------

TargetModules = Annotated[tuple[str, ...], nonempty("leave it unset for the method's default")]


@config
class MethodConfig:
    name: MethodName = Field("lora", description="PEFT method: lora, dora, ia3, bottleneck")
    r: Count = Field(16, description="LoRA/DoRA rank, or the bottleneck width")
    alpha: Real = Field(32.0, description="LoRA/DoRA scaling numerator (scale = alpha / r)")
    dropout: Probability = Field(0.0, description="dropout inside the adapter")
    target_modules: TargetModules | None = Field(
        None, description="LoRA/DoRA: module names, or all-linear (default: the attention projections, q,k,v,o "
                          "on Llama, as the transfer study chose); IA3: module names (default: peft's); "
                          "bottleneck: sub-layers 'attention' and/or 'ffn' (default: both)")
    variant: Variant = Field("serial", description="bottleneck only: serial or parallel")

    @field_validator("target_modules")
    @classmethod
    def _bottleneck_sublayers(cls, targets, info):
        if info.data.get("name") == "bottleneck" and targets and set(targets) - set(SUBLAYERS):
            raise Invalid(f"must be sub-layers {' and/or '.join(SUBLAYERS)} for the bottleneck adapter, got {targets}")
        return targets


@config
class BottleneckConfig:
    bottleneck_size: Count = Field(64, description="width of the adapter's middle layer")
    variant: Variant = Field("serial", description="serial or parallel")
    sublayers: Annotated[tuple[Sublayer, ...], nonempty("name attention, ffn or both")] = Field(
        SUBLAYERS, description="after attention, ffn, or both")
    non_linearity: Activation = Field("relu", description="one of " + ", ".join(get_args(Activation)))
    dropout: Probability = Field(0.0, description="dropout inside the adapter")
    scaling: Real = Field(1.0, description="multiplier on the adapter's output")


@config
class TrainConfig:
    steps: Count = Field(300, description="optimizer steps")
    batch_size: Count = Field(32, description="examples per micro-batch")
    grad_accum: Count = Field(1, description="micro-batches per optimizer step")
    lr: PositiveReal = Field(3e-3, description="peak learning rate")
    warmup: Probability = Field(0.06, description="fraction of steps spent warming up, then cosine decay")
    weight_decay: Real = 0.0
    max_grad_norm: Real = 1.0
    p_i: Probability = Field(defaults.P_I, description="Trans-PEFT knowledge masking probability, in [0, 1) "
                                                       "(default: the transfer study's choice)")
    p_c: Probability = Field(defaults.P_C, description="Trans-PEFT knowledge dropping probability, in [0, 1) "
                                                       "(default: the transfer study's choice)")
    seed: int = 0
    gradient_checkpointing: bool = Field(
        False, description="recompute each layer's activations in backward instead of keeping them (less memory, "
                           "about a third more compute); Trans-PEFT's draws are replayed exactly")
    precision: Precision = Field("auto", description="auto (bf16 on GPU, fp32 on CPU), fp32 or bf16")
    max_length: Annotated[int, rule(">= 2 tokens (or None)", lambda n: n >= 2)] | None = Field(
        None, description="tokens per training row at most (prompt, answer and special tokens); None: no cap")
    too_long: TooLong = Field(
        "refuse", description="rows over max_length: refuse (an error with their count) or truncate (drop the start "
                              "of the prompt); either way the count is in the manifest")
    group_by_length: bool = Field(
        True, description="batch rows of similar length together, so that little compute goes to padding")


def _none_if_empty(targets):  # study.targets: [] or null, as before: the method's default targets
    return targets or None


@config
class StudyConfig:
    """What the study measures; params.yaml's ``study`` key, validated on construction."""

    tasks: tuple[str, ...]
    updates: tuple[str, ...]  # "old->new" base versions, e.g. "v1->v2"
    seeds: tuple[int, ...] = (0, 1, 2)
    targets: dict[str, Annotated[tuple[str, ...] | None, BeforeValidator(_none_if_empty)]] = Field(
        default_factory=lambda: {"qkvo": QKVO, "all-linear": (defaults.ALL_LINEAR,)})  # name -> LoRA target modules
    grid: tuple[tuple[str, Probability, Probability], ...] = (  # (targets, p_c, p_i)
        ("qkvo", 0.0, 0.0), ("qkvo", 0.1, 0.0))
    r: Count = 16
    alpha: Real = 16.0
    steps: Count = 300
    batch_size: Count = 32
    lr: PositiveReal = 3e-3
    warmup: Probability = 0.06
    retune_steps: tuple[int, ...] = (10, 25, 50, 100)
    max_old_cost: Real = 0.02  # the chosen setting may cost at most this much exact match on the old base
    workers: Count = 2  # processes; the CPU cores are split between them
    # The ways of carrying the chosen adapter over (transpeft/strategies.py; distill-synthetic: distill with
    # prompts the old base writes), each given strategy_steps optimizer steps where it trains.
    strategies: tuple[Literal["scaled", "distill", "distill-synthetic", "retune"], ...] = ()
    strategy_steps: Count = defaults.RETUNE_STEPS
    prompts_per_task: Count = 256

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("study.tasks is empty; name the tasks to measure")
        for update in self.updates:
            old, sep, new = update.partition("->")
            if not sep or not old or not new or old == new:
                raise ValueError(f"study.updates: {update!r} is not 'old->new', e.g. v1->v2")
        if not self.updates:
            raise ValueError("study.updates is empty; name at least one, e.g. v1->v2")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"study.seeds must be distinct and non-empty, got {self.seeds}")
        if not self.targets:
            raise ValueError("study.targets is empty; e.g. {qkvo: [q_proj, k_proj, v_proj, o_proj], all-linear: null}")
        for cell in self.grid:
            if cell[0] not in self.targets:
                raise ValueError(f"study.grid: {cell} is not [targets, p_c, p_i] with targets one of "
                                 f"{', '.join(self.targets)}")
        used = {cell[0] for cell in self.grid}
        plain = {cell[0] for cell in self.grid if cell[1] == cell[2] == 0}
        if used - plain:
            raise ValueError(f"study.grid needs [{sorted(used - plain)[0]}, 0, 0]: the direct-transfer arm of those "
                             "targets is the plain adapter")
        if len(set(self.grid)) == len(plain):
            raise ValueError("study.grid has no setting with p_c or p_i > 0 to compare with direct transfer")
        if not self.retune_steps or min(self.retune_steps) < 1:
            raise ValueError(f"study.retune_steps must be positive step budgets, got {self.retune_steps}")

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [tuple(u.split("->")) for u in self.updates]

    def settings(self) -> list[tuple[str, float, float]]:
        """The grid's (targets, p_c, p_i) cells, each once, in order."""
        return list(dict.fromkeys((t, float(pc), float(pi)) for t, pc, pi in self.grid))

    def quick(self) -> StudyConfig:
        """Two settings, two seeds, a few steps: checks the whole path in a minute, measures nothing."""
        from dataclasses import replace

        targets = self.grid[0][0]
        strongest = max((c for c in self.grid if c[0] == targets), key=lambda c: c[1] + c[2])
        return replace(self, seeds=self.seeds[:2], targets={targets: self.targets[targets]},
                       grid=((targets, 0.0, 0.0), strongest), steps=4, retune_steps=(2,), batch_size=8)


# -- command-line flags -------------------------------------------------------------------------


def _flag(name: str, rename: dict) -> str:
    return "--" + rename.get(name, name).replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, model, skip=(), rename: dict | None = None) -> None:
    """One --flag per field of ``model``: its description and default as the help, its type checked as the
    command line is parsed (``error: argument --p-c: must be in [0, 1), got 1.5``, exit 2). Booleans get
    --x/--no-x, tuples are comma-separated. ``rename``: field -> flag name, e.g. {"name": "method"}."""
    rename = rename or {}
    for name, info in model.__pydantic_fields__.items():
        if name in skip:
            continue
        flag, dest = _flag(name, rename), rename.get(name, name)
        help_text = (info.description or "") + f" (default: {info.default})"
        kind = _bare(info.annotation)
        if kind is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=info.default,
                                help=help_text)
            continue
        listed = get_origin(kind) is tuple
        parser.add_argument(flag, dest=dest, type=_flag_type(info, listed), default=info.default,
                            help=help_text + ("; comma-separated" if listed else ""))


def _flag_type(info, listed: bool):
    kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation

    def parse(text: str):
        value = tuple(x.strip() for x in text.split(",") if x.strip()) if listed else text
        try:
            return _adapter(kind).validate_python(value)
        except ValidationError as e:
            raise argparse.ArgumentTypeError("; ".join(describe(e))) from None

    return parse


def from_flags(model, args: argparse.Namespace, rename: dict | None = None):
    """The ``model`` the parsed flags describe; a bad combination is a ValueError naming the flags."""
    rename = rename or {}
    values = {name: getattr(args, rename.get(name, name)) for name in model.__pydantic_fields__
              if hasattr(args, rename.get(name, name))}
    try:
        return model(**values)
    except ConfigError as e:
        if e.error is None:
            raise
        def flags(loc: tuple) -> str:
            return _flag(str(loc[0]), rename) + "".join(f".{part}" for part in loc[1:]) if loc else ""

        raise ConfigError("; ".join(describe(e.error, model, key=flags)), e.error) from None
