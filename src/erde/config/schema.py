"""Typed run configuration: defaults, preset files, `key=value` overrides and validation.

OmegaConf structured configs give type checking and unknown-key errors for free; this module
turns their exceptions into messages that name the key and the fix, and checks what types cannot
express against one table next to the schema: `CHOICES` (the allowed strings; the methods
and loss options come from `erde.config.methods`) and `RANGES`. Enum-typed fields would do the
choices too, but OmegaConf writes an Enum's *name* to YAML (`KD_MASKED`, not `kd-masked`) and
hands code Enum objects, so the keys stay plain strings and the table checks them.

A config is data. YAML is read with a safe loader (no `!!python/...` tags), and an interpolation
may only name another key (`${train.lr}`) or an environment variable (`${oc.env:NAME}` or
`${oc.env:NAME,default}`); any other resolver is refused, whatever a program has registered
with OmegaConf, so no config can call code by name. Values are resolved when the config is
loaded, and a run folder's config.yaml records the resolved values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from erde.config.methods import (
    ENTROPY_EXITS,
    ENTROPY_TERMS,
    METHOD_TABLE,
    METHODS,
    PAIRINGS,
    STUDENT_METHODS,
    TEACHER_METHODS,
    or_list,
)
from erde.errors import ErdeError


@dataclass
class DataConfig:
    source: str = "digits"
    root: str | None = None
    download: bool = False
    verify: bool = True
    # Validation images held out of the training split: a count (>= 1) or a fraction (< 1).
    val_size: float = 5000
    augment: bool = True
    crop_padding: int = 4
    # Image folders: decoded into the device's memory, or streamed from the files by DataLoader
    # workers (erde.data.stream); auto streams a folder whose decoded images exceed the budget.
    stream: str = "auto"
    device_budget_gb: float | None = None  # null: a quarter of the host's (and GPU's) memory
    workers: int | None = None  # decoding processes; null: the cores, one left for training
    image_size: int | None = None  # streamed input size; null: the first image's shorter side
    eval_crop: float = 1.0  # streamed evaluation: centre crop of the resized image (0.875: 224/256)
    # Per-channel statistics on the 0..1 scale; null: computed from the training images.
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass
class ModelConfig:
    name: str = "resnet20"
    # "default", "stages", "every:K" or 1-based block indices such as "3,6".
    exits: str = "default"
    # Builder options, checked against the builder's signature (model.options.width_mult=0.5).
    options: dict[str, Any] = field(default_factory=dict)
    # The Python module that registers model.name (a plugin without an entry point).
    module: str | None = None
    # Backbone weights: a safetensors or PyTorch state-dict file, or true for timm/torchvision's.
    pretrained: str | None = None


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # one of CHOICES[key]; likewise every choice below
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of epochs
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    # Under torchrun on CUDA: BatchNorm statistics over the global batch, not each process's share.
    sync_bn: bool = False
    eval_batch_size: int = 1000
    checkpoint_every: int = 0  # keep a copy every N epochs (0: only `last`)
    freeze_backbone: bool = False  # train only the exit heads (erde.models.EarlyExitNet)
    tensorboard: bool = False


@dataclass
class DistillConfig:
    method: str = "teacher"  # a name in erde.config.methods.METHOD_TABLE
    teacher: str | None = None  # run folder of a finished teacher
    alpha: float = 0.5
    beta: float = 0.1  # docs/results.md, issue 13: 1 was below kd; 0.1 ties it
    temperature: float = 4.0
    pairing: str = "depth"
    entropy_term: str = "uniform-ce"
    entropy_exits: str = "all"
    exit_weights: list[float] | None = None
    # Reuse the teacher's outputs on the augmented training batches across students (exact; see
    # erde.distill.teacher_cache). Stored in teacher_cache_dir, by default
    # TEACHER_RUN/teacher-cache.
    teacher_cache: bool = True
    teacher_cache_dir: str | None = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class StageConfig:
    """One network of the protocol: its architecture and its schedule (the seed is set per run)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class EvalConfig:
    policy: str = "entropy"
    normalize: bool = False
    max_drop: float = 0.0  # accuracy points below the teacher allowed when calibrating on val
    budgets: list[float] = field(default_factory=lambda: [0.25, 0.5])  # fractions of full MACs


@dataclass
class ReproduceConfig:
    """The paper's protocol: one teacher, then one student per method, then the comparison."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: StageConfig = field(default_factory=StageConfig)
    student: StageConfig = field(default_factory=StageConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    methods: list[str] = field(default_factory=lambda: list(STUDENT_METHODS))
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    # Ablation grid: dotted student.*/distill.* key -> values, one run per combination
    # (erde.study.grid; typed by the schema when expanded).
    grid: dict[str, list[str]] = field(default_factory=dict)


CHOICES: dict[str, tuple[str, ...]] = {
    "train.schedule": ("cosine", "multistep", "constant"),
    # auto: bf16 where the device computes it natively, else fp32 (erde.device.resolve_precision).
    "train.precision": ("fp32", "bf16", "fp16", "auto"),
    "data.stream": ("auto", "always", "never"),
    "distill.method": tuple(METHODS),
    "distill.pairing": PAIRINGS,
    "distill.entropy_term": ENTROPY_TERMS,
    "distill.entropy_exits": ENTROPY_EXITS,
    # The exit policies (erde.evaluation.policy implements each one).
    "evaluate.policy": ("entropy", "maxprob"),
}


@dataclass(frozen=True)
class Range:
    """The finite numbers a key (or each item of a list key) accepts: low <= x (< x if
    `low_open`), and x <= high (< high if `high_open`) where `high` is set. `items` names what
    a list holds."""

    low: float
    high: float | None = None
    low_open: bool = False
    items: str = "values"
    high_open: bool = False

    def holds(self, x: float) -> bool:
        """Whether `x` is allowed (NaN and infinities never are)."""
        above = x > self.low if self.low_open else x >= self.low
        below = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return math.isfinite(x) and above and below

    def rule(self) -> str:
        """The rule as messages state it: '> 0', '>= 0', 'in (0, 1]' or 'in [0, 1)'."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


_POSITIVE, _NON_NEGATIVE = Range(0, low_open=True), Range(0)
RANGES: dict[str, Range] = {
    "train.epochs": _POSITIVE,
    "train.batch_size": _POSITIVE,
    "train.lr": _POSITIVE,
    "train.eval_batch_size": _POSITIVE,
    "distill.temperature": _POSITIVE,
    "train.weight_decay": _NON_NEGATIVE,
    # Above 1 the velocity grows without bound: momentum=7 trains to a loss in the thousands.
    "train.momentum": Range(0, 1, high_open=True),
    "train.gamma": Range(0, 1, low_open=True),
    "train.seed": _NON_NEGATIVE,
    "train.warmup_epochs": _NON_NEGATIVE,
    "distill.beta": _NON_NEGATIVE,
    "train.checkpoint_every": _NON_NEGATIVE,
    "data.val_size": _NON_NEGATIVE,
    "data.crop_padding": _NON_NEGATIVE,
    "data.device_budget_gb": _POSITIVE,
    "data.workers": _NON_NEGATIVE,
    "data.image_size": _POSITIVE,
    "data.eval_crop": Range(0, 1, low_open=True),
    "data.mean": Range(0, 1, items="per-channel means on the 0..1 scale"),
    "data.std": Range(0, low_open=True, items="per-channel standard deviations on the 0..1 scale"),
    "distill.alpha": Range(0, 1),
    "distill.exit_weights": Range(0, items="weights"),
    "train.milestones": Range(0, 1, low_open=True, items="fractions of the run"),
    "evaluate.budgets": Range(0, 1, low_open=True, items="fractions of the student's full MACs"),
    "evaluate.max_drop": Range(0),
}


def check_value(key: str, value: Any) -> None:
    """Check one value against `CHOICES` or `RANGES`; ErdeError with the key and the fix.

    `validate` runs it on every key of a config; library code that takes these values without a
    config (`erde.distill.losses`) runs it too, so both refuse the same values with the same words.
    """
    if key in CHOICES:
        choices = CHOICES[key]
        if value not in choices:
            raise ErdeError(f"{key}={value!r} is not allowed; choose one of {', '.join(choices)}")
    elif key in RANGES:
        r = RANGES[key]
        if value is None:
            return
        if isinstance(value, Sequence) and not isinstance(value, str):
            if not all(r.holds(float(x)) for x in value):
                raise ErdeError(f"{key}={list(value)} must be {r.items} {r.rule()}")
        elif not r.holds(float(value)):
            finite = "" if math.isfinite(value) else "a finite number "
            verb = "be" if r.high is None or finite else "lie"
            raise ErdeError(f"{key}={value} must {verb} {finite}{r.rule()}")
    else:
        raise KeyError(f"{key} has no entry in erde.config.schema.CHOICES or RANGES")


RESOLVERS = ("oc.env",)
_RESOLVER_CALL = re.compile(r"\$\{\s*([^\s:{}]+)\s*:")


def preset_names(kind: str = "train") -> list[str]:
    """Presets shipped inside the package, so `erde` works from any install, not only a checkout."""
    folder = resources.files("erde.config") / "presets" / kind
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_path(name_or_path: str, kind: str = "train") -> Path:
    """A YAML file path as given, or the file of a shipped preset (`kind`: train or reproduce)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ErdeError(
                f"config file {path} does not exist; give an existing YAML file or a "
                f"preset name ({', '.join(preset_names(kind))})"
            )
        return path
    shipped = resources.files("erde.config") / "presets" / kind / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise ErdeError(
            f"unknown {kind} preset {name_or_path!r}; choose one of "
            f"{', '.join(preset_names(kind))} or give a path to a .yaml file"
        )
    return Path(str(shipped))


def _read_yaml(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: the file is the user's
        reason = " ".join(str(exc).split())
        raise ErdeError(f"config file {path} is not valid YAML ({reason}); fix the file") from None
    if not isinstance(loaded, DictConfig):
        raise ErdeError(f"config file {path} must hold a mapping of sections (data:, model:, ...)")
    if not loaded:  # an empty or zero-byte file would silently mean "all defaults"
        raise ErdeError(
            f"config file {path} is empty; give at least one section (data:, model:, ...), "
            "or a preset name for the defaults"
        )
    return loaded


def _explain(exc: OmegaConfBaseException, where: str) -> ErdeError:
    key = getattr(exc, "full_key", None)
    subject = f"bad config key {key!r}" if key else "bad config value"
    reason = str(exc).splitlines()[0]
    return ErdeError(
        f"{subject} in {where}: {reason}; see `erde config` for every key and its type"
    )


def _check_resolvers(value: Any, where: str, key: str = "") -> None:
    """Refuse interpolations that call a resolver other than `RESOLVERS` (see the module doc)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_resolvers(v, where, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_resolvers(v, where, f"{key}[{i}]")
    elif isinstance(value, str):
        for name in _RESOLVER_CALL.findall(value):
            if name not in RESOLVERS:
                raise ErdeError(
                    f"{key}={value!r} in {where} calls the resolver {name!r}; a config may only "
                    "name other keys (${section.key}) and environment variables "
                    "(${oc.env:NAME}), so write the value itself"
                )


def structured(schema: type, sources: list[tuple[str, Any]]) -> Any:
    """Merge (description, DictConfig | dotlist) sources onto `schema`'s defaults, type-checked.

    Overrides merge one by one, so a message names the one that is wrong.
    """
    cfg = OmegaConf.structured(schema)
    for where, source in sources:
        parts = [(f"override {item!r}", [item]) for item in source]
        for what, part in parts if isinstance(source, list) else [(where, source)]:
            try:
                part = OmegaConf.from_dotlist(part) if isinstance(part, list) else part
                _check_resolvers(OmegaConf.to_container(part, resolve=False), what)
                cfg = OmegaConf.merge(cfg, part)
            except OmegaConfBaseException as exc:
                raise _explain(exc, what) from None
    return cfg


def resolved(cfg: Any) -> Any:
    """The config object with interpolations replaced by their values."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise _explain(exc, "the config") from None


def check_overrides(overrides: list[str]) -> None:
    """Refuse an override without `=` before OmegaConf gives a less clear message for it."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ErdeError(
                f"override {item!r} is not of the form key=value (for example train.epochs=5)"
            )


def load_config(config: str | None = None, overrides: list[str] | None = None) -> Config:
    """The validated config: defaults <- preset or file <- key=value overrides."""
    overrides = list(overrides or [])
    check_overrides(overrides)
    sources: list[tuple[str, Any]] = []
    if config is not None:
        path = preset_path(config)
        sources.append((str(path), _read_yaml(path)))
    sources.append(("the command-line overrides", overrides))
    cfg = resolved(structured(Config, sources))
    validate(cfg)
    return cfg


def load_reproduce_config(
    preset: str,
    overrides: list[str] | None = None,
    grid: dict[str, list[str]] | None = None,
) -> ReproduceConfig:
    """A reproduce preset (shipped name or YAML file) with `key=value` overrides and `--grid`
    keys (each replacing that key's list in the preset's `grid:`), validated."""
    overrides = list(overrides or [])
    check_overrides(overrides)
    path = preset_path(preset, kind="reproduce")
    sources = [(str(path), _read_yaml(path)), ("the command-line overrides", overrides)]
    if grid:
        sources.append(("the --grid options", OmegaConf.create({"grid": grid})))
    cfg = resolved(structured(ReproduceConfig, sources))
    for method in cfg.methods:
        if method not in STUDENT_METHODS:
            raise ErdeError(f"methods contains {method!r}; students use {or_list(STUDENT_METHODS)}")
    if not cfg.methods or len(set(cfg.methods)) != len(cfg.methods):
        raise ErdeError(
            f"methods={list(cfg.methods)}: list each student method once, at least one of "
            f"{', '.join(STUDENT_METHODS)}"
        )
    for key in ("evaluate.policy", "evaluate.budgets", "evaluate.max_drop"):
        check_value(key, getattr(cfg.evaluate, key.split(".")[1]))
    _validate_stage(cfg, "teacher", "teacher", None)
    for method in cfg.methods:
        teacher = "teacher" if METHOD_TABLE[method].needs_teacher else None
        _validate_stage(cfg, "student", method, teacher)
    return cfg


def _validate_stage(cfg: ReproduceConfig, stage: str, method: str, teacher: str | None) -> None:
    """`validate` on one stage, its message naming the reproduce key to change
    (`student.train.epochs`, not the `train.epochs` of the stage's own config)."""
    try:
        validate(stage_config(cfg, stage, seed=0, method=method, teacher=teacher))
    except ErdeError as exc:
        message = re.sub(r"\b(train|model)\.", rf"{stage}.\1.", str(exc))
        raise ErdeError(f"the {stage} stage: {message}") from None


def stage_config(
    cfg: ReproduceConfig,
    stage: str,
    *,
    seed: int,
    method: str = "teacher",
    teacher: str | None = None,
) -> Config:
    """The `erde train` config of one run of the protocol."""
    part = getattr(cfg, stage)
    return Config(
        data=cfg.data,
        model=part.model,
        train=replace(part.train, seed=seed),
        distill=replace(cfg.distill, method=method, teacher=teacher),
    )


def validate(cfg: Config) -> None:
    """Ranges and choices that types alone cannot express: the table, then rules across keys."""
    for key in (*CHOICES, *RANGES):
        section, name = key.split(".")
        if hasattr(cfg, section):
            check_value(key, getattr(getattr(cfg, section), name))
    for key, value in cfg.model.options.items():  # the one place floats escape the table
        if isinstance(value, float) and not math.isfinite(value):
            raise ErdeError(f"model.options.{key}={value} must be a finite number")
    _validate_data(cfg.data)
    t, d = cfg.train, cfg.distill
    if t.warmup_epochs >= t.epochs:
        raise ErdeError(
            f"train.warmup_epochs={t.warmup_epochs} must be below train.epochs={t.epochs}; "
            f"set train.warmup_epochs to less than {t.epochs} (0 for none) or raise train.epochs"
        )
    needs_teacher = METHOD_TABLE[d.method].needs_teacher
    if needs_teacher and not d.teacher:
        raise ErdeError(
            f"distill.method={d.method} needs a teacher: set distill.teacher=RUN_DIR "
            "of a finished teacher run"
        )
    if not needs_teacher and d.teacher:
        raise ErdeError(
            f"distill.teacher is set but distill.method={d.method} uses no teacher; "
            f"drop distill.teacher or pick {or_list(TEACHER_METHODS)}"
        )


def _validate_data(d: DataConfig) -> None:
    """Data keys that only mean something together."""
    if (d.mean is None) != (d.std is None) or (d.mean and len(d.mean) != len(d.std)):
        raise ErdeError(
            f"data.mean={d.mean} and data.std={d.std}: give both, one value per channel, or "
            "neither (then both are computed from the training images)"
        )
    if d.mean is not None and len(d.mean) not in (1, 3):
        raise ErdeError(
            f"data.mean={d.mean} has {len(d.mean)} values; images have 1 (grey) or 3 (colour) "
            "channels"
        )
    if d.stream == "always" and d.source != "imagefolder":
        raise ErdeError(
            f"data.stream=always streams image folders (data.source=imagefolder); {d.source} is "
            "read whole into memory: use data.stream=auto"
        )
    streamed_only = [
        f"{key}={value:g}"
        for key, value, default in (
            ("data.image_size", d.image_size, None),
            ("data.eval_crop", d.eval_crop, 1.0),
        )
        if value != default
    ]
    if streamed_only and d.stream != "always":
        raise ErdeError(
            f"{' and '.join(streamed_only)} resize streamed images, but data.stream={d.stream} "
            "may decode the folder into memory, where images keep their size; set "
            "data.stream=always, or drop them"
        )


def to_yaml(cfg: Any) -> str:
    """The config as the YAML a run folder records (plain strings and numbers)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    """The config as plain dicts and lists, for JSON sidecars and comparisons."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


__all__ = [
    "CHOICES",
    "RANGES",
    "Config",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "ModelConfig",
    "ReproduceConfig",
    "StageConfig",
    "TrainConfig",
    "check_value",
    "load_config",
    "load_reproduce_config",
    "preset_names",
    "preset_path",
    "stage_config",
    "to_dict",
    "to_yaml",
    "validate",
]
