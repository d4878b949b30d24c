"""Typed run configuration: defaults, preset files, `key=value` overrides and validation.

OmegaConf structured configs give type checking and unknown-key errors for free; this module only
turns their exceptions into messages that name the key and the fix.

A config is data. YAML is read with a safe loader (no `!!python/...` tags), and an interpolation
may only name another key (`${train.lr}`) or an environment variable (`${oc.env:NAME}` or
`${oc.env:NAME,default}`); any other resolver is refused, whatever a program has registered
with OmegaConf, so no config can call code by name. Values are resolved when the config is
loaded, and a run folder's config.yaml records the resolved values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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


@dataclass
class ModelConfig:
    name: str = "resnet20"
    # "default", "stages", "every:K" or 1-based block indices such as "3,6".
    exits: str = "default"


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | multistep | constant
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of epochs
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    # Under torchrun on CUDA: BatchNorm statistics over the global batch, not each process's share.
    sync_bn: bool = False
    eval_batch_size: int = 1000
    checkpoint_every: int = 0  # keep a copy every N epochs (0: only `last`)
    tensorboard: bool = False


@dataclass
class DistillConfig:
    method: str = "teacher"  # teacher | ce | kd | kd-masked | erde
    teacher: str | None = None  # run folder of a finished teacher
    alpha: float = 0.5
    beta: float = 1.0
    temperature: float = 4.0
    pairing: str = "depth"  # same | depth | final
    entropy_term: str = "uniform-ce"  # uniform-ce | neg-entropy
    entropy_exits: str = "all"  # all | intermediate
    exit_weights: list[float] | None = None


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
    policy: str = "entropy"  # entropy | maxprob
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
    methods: list[str] = field(default_factory=lambda: ["ce", "kd", "kd-masked", "erde"])
    evaluate: EvalConfig = field(default_factory=EvalConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "train.schedule": ("cosine", "multistep", "constant"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "distill.method": ("teacher", "ce", "kd", "kd-masked", "erde"),
    "distill.pairing": ("same", "depth", "final"),
    "distill.entropy_term": ("uniform-ce", "neg-entropy"),
    "distill.entropy_exits": ("all", "intermediate"),
}


RESOLVERS = ("oc.env",)
_RESOLVER_CALL = re.compile(r"\$\{\s*([^\s:{}]+)\s*:")


def preset_names(kind: str = "train") -> list[str]:
    """Presets shipped inside the package, so `erde` works from any install, not only a checkout."""
    folder = resources.files("erde") / "configs" / kind
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
    shipped = resources.files("erde") / "configs" / kind / f"{name_or_path}.yaml"
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


def load_reproduce_config(preset: str, overrides: list[str] | None = None) -> ReproduceConfig:
    """A reproduce preset (shipped name or YAML file) with `key=value` overrides, validated."""
    overrides = list(overrides or [])
    check_overrides(overrides)
    path = preset_path(preset, kind="reproduce")
    sources = [(str(path), _read_yaml(path)), ("the command-line overrides", overrides)]
    cfg = resolved(structured(ReproduceConfig, sources))
    for method in cfg.methods:
        if method not in CHOICES["distill.method"][1:]:
            raise ErdeError(f"methods contains {method!r}; students use ce, kd, kd-masked or erde")
    if not cfg.methods or len(set(cfg.methods)) != len(cfg.methods):
        raise ErdeError(
            f"methods={list(cfg.methods)}: list each student method once, at least one of "
            "ce, kd, kd-masked, erde"
        )
    e = cfg.evaluate
    if e.policy not in ("entropy", "maxprob"):
        raise ErdeError(f"evaluate.policy={e.policy!r}: use entropy or maxprob")
    if any(not 0.0 < b <= 1.0 for b in e.budgets):
        raise ErdeError(
            f"evaluate.budgets={list(e.budgets)}: budgets are fractions of the student's full "
            "MACs in (0, 1], e.g. [0.25, 0.5]"
        )
    if not e.max_drop >= 0:
        raise ErdeError(f"evaluate.max_drop={e.max_drop} must be >= 0 accuracy points")
    validate(stage_config(cfg, "teacher", seed=0))
    for method in cfg.methods:
        teacher = None if method == "ce" else "teacher"
        validate(stage_config(cfg, "student", seed=0, method=method, teacher=teacher))
    return cfg


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
    """Ranges and choices that types alone cannot express."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ErdeError(f"{key}={value!r} is not allowed; choose one of {', '.join(choices)}")
    t, d = cfg.train, cfg.distill
    positive = {
        "train.epochs": t.epochs,
        "train.batch_size": t.batch_size,
        "train.lr": t.lr,
        "train.eval_batch_size": t.eval_batch_size,
        "distill.temperature": d.temperature,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ErdeError(f"{key}={value} must be > 0")
    non_negative = {
        "train.weight_decay": t.weight_decay,
        "train.momentum": t.momentum,
        "train.warmup_epochs": t.warmup_epochs,
        "distill.beta": d.beta,
        "train.checkpoint_every": t.checkpoint_every,
        "data.val_size": cfg.data.val_size,
        "data.crop_padding": cfg.data.crop_padding,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ErdeError(f"{key}={value} must be >= 0")
    if not 0.0 <= d.alpha <= 1.0:
        raise ErdeError(f"distill.alpha={d.alpha} must lie in [0, 1]")
    if t.warmup_epochs >= t.epochs:
        raise ErdeError(
            f"train.warmup_epochs={t.warmup_epochs} must be below train.epochs={t.epochs}"
        )
    if any(not 0.0 < m <= 1.0 for m in t.milestones):
        raise ErdeError(
            f"train.milestones={list(t.milestones)} must be fractions of the run in (0, 1]"
        )
    needs_teacher = d.method in ("kd", "kd-masked", "erde")
    if needs_teacher and not d.teacher:
        raise ErdeError(
            f"distill.method={d.method} needs a teacher: set distill.teacher=RUN_DIR "
            "of a finished teacher run"
        )
    if not needs_teacher and d.teacher:
        raise ErdeError(
            f"distill.teacher is set but distill.method={d.method} uses no teacher; "
            "drop distill.teacher or pick kd, kd-masked or erde"
        )


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


__all__ = [
    "Config",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "ModelConfig",
    "ReproduceConfig",
    "StageConfig",
    "TrainConfig",
    "load_config",
    "load_reproduce_config",
    "preset_names",
    "preset_path",
    "stage_config",
    "to_dict",
    "to_yaml",
    "validate",
]
