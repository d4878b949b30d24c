"""Typed run configuration: defaults, preset files, `key=value` overrides and validation.

OmegaConf structured configs give type checking and unknown-key errors for free; this module
turns their exceptions into messages that name the key and the fix, and checks what types cannot
express against each key's record (`erde.config.records`), written once beside its field: the
allowed strings (the methods and loss options come from `erde.config.methods`) or the range, the
help line, and how grids, comparisons and the tuner treat the key; `records()` collects them.
Enum-typed fields would do the choices too, but OmegaConf writes an Enum's *name* to YAML
(`KD_MASKED`, not `kd-masked`) and hands code Enum objects, so the keys stay plain strings and
their records check them.

A config is data. YAML is read with a safe loader (no `!!python/...` tags), and an interpolation
may only name another key (`${train.lr}`) or an environment variable (`${oc.env:NAME}` or
`${oc.env:NAME,default}`); any other resolver is refused, whatever a program has registered
with OmegaConf, so no config can call code by name. Values are resolved when the config is
loaded, and a run folder's config.yaml records the resolved values.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from erde.config.methods import (
    ENTROPY_EXITS,
    ENTROPY_TERMS,
    PAIRINGS,
    PAPER_METHODS,
    check_option,
    get_method,
    load_method_module,
    methods,
    methods_table,
    option_records,
    or_list,
    student_methods,
    teacher_methods,
)
from erde.config.preset_names import preset_names
from erde.config.records import (
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    Range,
    Record,
    Search,
    key,
    walk_records,
)
from erde.errors import ErdeError, excerpt


@dataclass
class DataConfig:
    source: str = field(
        default="digits",
        metadata=key(
            "where the images come from: digits, cifar10, cifar100, svhn, npz, imagefolder"
        ),
    )
    root: str | None = field(
        default=None,
        metadata=key(
            "folder of the data set (absolute, or relative to where erde runs)", experiment=False
        ),
    )
    download: bool = field(
        default=False,
        metadata=key(
            "download an official data set into data.root where the network allows",
            experiment=False,
        ),
    )
    verify: bool = field(
        default=True, metadata=key("check the official archives' checksums", experiment=False)
    )
    # Held-out images: a count (>= 1) or a fraction (< 1), as scikit-learn's train_test_split.
    val_size: float = field(
        default=0.1,
        metadata=key(
            "images held out of training for validation (seeded by train.seed, stratified): "
            "a count or a fraction (< 1)",
            range=NON_NEGATIVE,
        ),
    )
    train_size: float | None = field(
        default=None,
        metadata=key(
            "training images used, for a quick run on part of the data: a stratified subset "
            "(seeded by train.seed) of those left after validation, a count or a fraction (< 1) "
            "(null: all)",
            range=POSITIVE,
        ),
    )
    test_size: float | None = field(
        default=None,
        metadata=key(
            "images of a root/<class>/ image folder held out for testing (stratified, the same "
            "for every seed): a count or a fraction (< 1) (null: 0.2)",
            range=POSITIVE,
        ),
    )
    augment: bool = field(
        default=True, metadata=key("random crop and horizontal flip of training images")
    )
    crop_padding: int = field(
        default=4,
        metadata=key("pixels of zero padding before the random crop", range=NON_NEGATIVE),
    )
    # Image folders: decoded into the device's memory, or streamed from the files by DataLoader
    # workers (erde.data.stream); auto streams a folder whose decoded images exceed the budget.
    stream: str = field(
        default="auto",
        metadata=key(
            "image folders: decode into memory (never), stream the files (always), or "
            "stream above data.device_budget_gb (auto)",
            choices=("auto", "always", "never"),
        ),
    )
    device_budget_gb: float | None = field(
        default=None,
        metadata=key(
            "decoded size above which auto streams (null: a quarter of the host's memory, and "
            "of the GPU's)",
            range=POSITIVE,
        ),
    )
    workers: int | None = field(
        default=None,
        metadata=key(
            "processes decoding streamed images (null: the cores, one left for training)",
            range=NON_NEGATIVE,
            experiment=False,
        ),
    )
    image_size: int | None = field(
        default=None,
        metadata=key(
            "input size: in memory every image resized once (shorter side, centre crop); "
            "streamed, the RandomResizedCrop target (null: as they are; streamed: the first "
            "image's shorter side)",
            range=POSITIVE,
        ),
    )
    eval_crop: float = field(
        default=1.0,  # 0.875: 224/256
        metadata=key(
            "streamed evaluation: resize to image_size / eval_crop, crop the centre",
            range=Range(0, 1, low_open=True),
        ),
    )
    # Per-channel statistics on the 0..1 scale; null: computed from the training images.
    mean: list[float] | None = field(
        default=None,
        metadata=key(
            "per-channel mean on the 0..1 scale (null: from the training images)",
            range=Range(0, 1, items="per-channel means on the 0..1 scale"),
        ),
    )
    std: list[float] | None = field(
        default=None,
        metadata=key(
            "per-channel std on the 0..1 scale (null: from the training images)",
            range=Range(
                0, low_open=True, items="per-channel standard deviations on the 0..1 scale"
            ),
        ),
    )


@dataclass
class ModelConfig:
    name: str = field(
        default="resnet20",
        metadata=key(
            "registered model (`erde models` lists them)",
            experiment=False,  # already in a comparison's label
        ),
    )
    exits: str = field(
        default="default",
        metadata=key(
            '"default", "stages", "every:K" or 1-based block indices such as "3,6" or [3, 6]'
        ),
    )
    # paper: the paper's head on the 2x2-pooled map; pool: on the globally pooled map (fewer
    # weights and MACs, for edge use; docs/benchmarks.md "Exit heads").
    head: str = field(
        default="paper",
        metadata=key(
            "early-exit head: paper (BN-ReLU-2x2 pool-linear) or pool (global pool)",
            choices=("paper", "pool"),
        ),
    )
    # Checked against the builder's signature (model.options.width_mult=0.5).
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata=key("builder options, checked against its signature (model.options.width=16)"),
    )
    module: str | None = field(
        default=None,
        metadata=key("Python module that registers model.name (a plugin without an entry point)"),
    )
    # A safetensors or PyTorch state-dict file, or true for timm/torchvision's.
    pretrained: str | None = field(
        default=None,
        metadata=key("backbone weights (safetensors or state dict), or true for the library's"),
    )


@dataclass
class TrainConfig:
    epochs: int = field(default=30, metadata=key("passes over the training split", range=POSITIVE))
    batch_size: int = field(
        default=128, metadata=key("images per step, over all processes together", range=POSITIVE)
    )
    lr: float = field(default=0.1, metadata=key("peak learning rate (SGD)", range=POSITIVE))
    momentum: float = field(
        default=0.9,
        # Above 1 the velocity grows without bound: momentum=7 trains to a loss in the thousands.
        metadata=key("SGD momentum", range=Range(0, 1, high_open=True)),
    )
    nesterov: bool = field(default=True, metadata=key("Nesterov momentum"))
    weight_decay: float = field(default=5e-4, metadata=key("L2 weight decay", range=NON_NEGATIVE))
    schedule: str = field(
        default="cosine",
        metadata=key(
            "learning-rate schedule after the warmup",
            choices=("cosine", "multistep", "constant"),
        ),
    )
    milestones: list[float] = field(
        default_factory=lambda: [0.5, 0.75],
        metadata=key(
            "multistep: where the rate drops, as fractions of the epochs",
            range=Range(0, 1, low_open=True, items="fractions of the run"),
        ),
    )
    gamma: float = field(
        default=0.1,
        metadata=key(
            "multistep: factor applied at each milestone", range=Range(0, 1, low_open=True)
        ),
    )
    warmup_epochs: float = field(
        default=0.0,
        metadata=key("linear warmup length in epochs (below train.epochs)", range=NON_NEGATIVE),
    )
    seed: int = field(
        default=0,
        metadata=key(
            "seed of initialisation, split, batches and augmentation",
            range=SEED,
            experiment=False,  # a comparison counts seeds, it does not group by them
        ),
    )
    device: str = field(
        default="auto", metadata=key("auto, cpu, cuda, cuda:N or mps", experiment=False)
    )
    precision: str = field(
        default="fp32",
        # auto: bf16 where the device computes it natively, else fp32 (erde.device).
        metadata=key(
            "fp32, bf16 or fp16 autocast; auto picks bf16 where it is native",
            choices=("fp32", "bf16", "fp16", "auto"),
        ),
    )
    channels_last: bool = field(
        default=False,
        metadata=key(
            "channels-last memory layout (faster convolutions on some hardware)",
            experiment=False,
        ),
    )
    threads: int = field(
        default=0,
        # 0: the cores idle at start (erde.train.threads), so a busy machine does not collapse.
        metadata=key(
            "CPU threads per process (0: the cores idle at start; OMP_NUM_THREADS also sets it)",
            range=NON_NEGATIVE,
            experiment=False,
        ),
    )
    compile: bool = field(default=False, metadata=key("torch.compile the model", experiment=False))
    sync_bn: bool = field(
        default=False,
        metadata=key("under torchrun on CUDA: BatchNorm statistics over the global batch"),
    )
    eval_batch_size: int = field(
        default=1000,
        metadata=key("images per validation batch, per process", range=POSITIVE, experiment=False),
    )
    checkpoint_every: int = field(
        default=0,
        metadata=key(
            "keep a copy of the weights every N epochs (0: only the last)",
            range=NON_NEGATIVE,
            experiment=False,
        ),
    )
    freeze_backbone: bool = field(
        default=False,
        metadata=key("train only the exit heads"),  # erde.models.EarlyExitNet
    )
    tensorboard: bool = field(
        default=False,
        metadata=key("write TensorBoard events into the run folder", experiment=False),
    )


_SAME_MODEL = "it does not change what a run learns"


@dataclass
class DistillConfig:
    method: str = field(
        default="teacher",
        metadata=key(
            "the loss: a registered method (erde's or a plugin's)",
            choices=(),  # the registered ones, filled in by `records()`
            experiment=False,  # already in a comparison's label
            ungridded="list the methods in methods=[...] instead",
        ),
    )
    module: str | None = field(
        default=None,
        metadata=key(
            "Python module that registers distill.method (a plugin without an entry point)",
            experiment=False,  # the method's name is in a comparison's label
            ungridded="give the module once; it may register several methods",
        ),
    )
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata=key("a plugin method's own keys (distill.options.NAME=VALUE)"),
    )
    teacher: str | None = field(
        default=None,
        metadata=key(
            "run folder of a finished teacher (methods with a teacher)",
            experiment=False,
            ungridded="pass --teacher instead",
        ),
    )
    alpha: float = field(
        default=0.5,
        metadata=key(
            "weight of the distillation term against the label term",
            range=Range(0, 1),
            term="kd",
            search=Search(0.1, 0.9),
        ),
    )
    beta: float = field(
        default=0.1,  # docs/results.md, issue 13: 1 was below kd; 0.1 ties it
        metadata=key(
            "erde: weight of the entropy term where the teacher is wrong",
            range=NON_NEGATIVE,
            term="entropy",
            search=Search(0.03, 3.0, log=True),
        ),
    )
    temperature: float = field(
        default=4.0,
        metadata=key(
            "softmax temperature of the distillation term",
            range=POSITIVE,
            term="kd",
            search=Search(1.0, 8.0, log=True),
        ),
    )
    pairing: str = field(
        default="depth",
        metadata=key(
            "which teacher exit each student exit learns from", choices=PAIRINGS, term="teacher"
        ),
    )
    entropy_term: str = field(
        default="uniform-ce",
        metadata=key(
            "erde: uniform-target cross-entropy or negative entropy",
            choices=ENTROPY_TERMS,
            term="entropy",
            search=Search(),
        ),
    )
    entropy_exits: str = field(
        default="all",
        metadata=key(
            "erde: the exits the entropy term applies to",
            choices=ENTROPY_EXITS,
            term="entropy",
            search=Search(),
        ),
    )
    exit_weights: list[float] | None = field(
        default=None,
        metadata=key("per-exit loss weights (default: all 1)", range=Range(0, items="weights")),
    )
    # Reuse the teacher's outputs on the augmented training batches across students (exact; see
    # erde.distill.teacher_cache).
    teacher_cache: bool = field(
        default=True,
        metadata=key(
            "reuse the teacher's outputs across students (exact)",
            experiment=False,
            ungridded=_SAME_MODEL,
        ),
    )
    teacher_cache_dir: str | None = field(
        default=None,
        metadata=key(
            "where that cache lives (default: TEACHER_RUN/teacher-cache)",
            experiment=False,
            ungridded=_SAME_MODEL,
        ),
    )


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
    policy: str = field(
        default="entropy",
        # Registered names (erde.evaluation.policies) are checked where the registry is in
        # reach, before any run starts (erde.study.protocol_policy); config sits below it.
        metadata=key("exit score: a registered exit policy (entropy, maxprob, margin, a plugin's)"),
    )
    module: str | None = field(
        default=None,
        metadata=key(
            "Python module that registers evaluate.policy (a plugin without an entry point)"
        ),
    )
    normalize: bool = field(
        default=False,
        metadata=key("score divided by the policy's normalizer (entropy: log(classes))"),
    )
    max_drop: float = field(
        default=0.0,
        metadata=key(
            "accuracy points below the teacher allowed when choosing on val", range=Range(0)
        ),
    )
    budgets: list[float] = field(
        default_factory=lambda: [0.25, 0.5],
        metadata=key(
            "MACs budgets reported, as fractions of the student's full MACs",
            range=Range(0, 1, low_open=True, items="fractions of the student's full MACs"),
        ),
    )


@dataclass
class ReproduceConfig:
    """The paper's protocol: one teacher, then one student per method, then the comparison."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: StageConfig = field(default_factory=StageConfig)
    student: StageConfig = field(default_factory=StageConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    methods: list[str] = field(
        default_factory=lambda: list(PAPER_METHODS),
        metadata=key("the student methods to train and compare"),
    )
    static_models: list[str] = field(
        default_factory=list,
        metadata=key(
            "the static baseline: one plain student (no early exits, KD from the teacher's last "
            "exit) per model named, drawn as the static frontier by the comparison"
        ),
    )
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    # Typed by the schema when expanded (erde.study.grid).
    grid: dict[str, list[str]] = field(
        default_factory=dict,
        metadata=key("ablation grid: student.*/distill.* key -> values, one run per combination"),
    )


@functools.cache
def _both() -> dict[str, Record]:
    """Walked once: the fields never change while the program runs."""
    return {**walk_records(Config), **walk_records(ReproduceConfig)}


def records(schema: type | None = None) -> dict[str, Record]:
    """{dotted key: record} of every key of `schema` (a config dataclass), or of both the train
    and the reproduce schema where None (`train.lr` and `student.train.lr` alike): the one
    description of the keys that validation, `erde config`, grids, grouping and the tuner read.
    The registered methods complete it: the choices of `distill.method`, and each method's own
    keys (`distill.options.NAME`)."""
    table = dict(_both() if schema is None else walk_records(schema))
    if "distill.method" in table:
        table["distill.method"] = replace(table["distill.method"], choices=methods())
        table.update(option_records())
    return table


def check_value(key: str, value: Any, table: dict[str, Record] | None = None) -> None:
    """Check one value against its key's record (allowed values or range); ErdeError with the
    key and the fix. `key` is dotted as the user writes it (`student.train.lr`, `train.lr`).

    `validate` runs it on every key of a config; library code that takes these values without a
    config (`erde.distill.losses`) runs it too, so both refuse the same values with the same words.
    """
    record = (records() if table is None else table).get(key)
    if record is None:
        raise KeyError(f"{key} has no record in erde.config.schema")
    if record.choices is not None:
        if value not in record.choices:
            raise ErdeError(
                f"{key}={value!r} is not allowed; choose one of {', '.join(record.choices)}"
            )
    elif record.range is not None and value is not None:
        r = record.range
        if isinstance(value, Sequence) and not isinstance(value, str):
            if not all(r.holds(x if isinstance(x, int) else float(x)) for x in value):
                raise ErdeError(f"{key}={list(value)} must be {r.items} {r.rule()}")
        elif not r.holds(value if isinstance(value, int) else float(value)):
            finite = "" if isinstance(value, int) or math.isfinite(value) else "a finite number "
            verb = "be" if r.high is None or finite else "lie"
            raise ErdeError(f"{key}={value} must {verb} {finite}{r.rule()}")


RESOLVERS = ("oc.env",)
_RESOLVER_CALL = re.compile(r"\$\{\s*([^\s:{}]+)\s*:")


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
    except RecursionError:
        raise ErdeError(
            f"config file {path} nests lists or mappings deeper than erde reads; a config is "
            "sections of keys and values: fix the file"
        ) from None
    except Exception as exc:  # yaml.YAMLError and friends: the file is the user's
        reason = excerpt(exc, 300)
        raise ErdeError(f"config file {path} is not valid YAML ({reason}); fix the file") from None
    if not isinstance(loaded, DictConfig):
        raise ErdeError(f"config file {path} must hold a mapping of sections (data:, model:, ...)")
    if not loaded:  # an empty or zero-byte file would silently mean "all defaults"
        raise ErdeError(
            f"config file {path} is empty; give at least one section (data:, model:, ...), "
            "or a preset name for the defaults"
        )
    return loaded


def read_recorded(path: Path, schema: type) -> Any:
    """A config that erde recorded (a study's reproduce.yaml), read like the user's files: a
    damaged or hostile one is one message, and keys added since take their defaults."""
    return structured(schema, [(str(path), _read_yaml(path))])


def _explain(exc: OmegaConfBaseException, where: str) -> ErdeError:
    key = getattr(exc, "full_key", None)
    subject = f"bad config key {excerpt(repr(key), 80)}" if key else "bad config value"
    reason = excerpt(str(exc).splitlines()[0], 200)
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
                    f"{key}={excerpt(repr(value))} in {where} calls the resolver {name!r}; a "
                    "config may only "
                    "name other keys (${section.key}) and environment variables "
                    "(${oc.env:NAME}), so write the value itself"
                )


def _exits_as_text(part: DictConfig) -> None:
    """`model.exits` is text ("3,6"), and the list [3, 6] that `erde macs --exits`, the
    messages and the Python API offer says the same: a list there becomes that text."""
    for section in (part, part.get("teacher"), part.get("student")):
        model = section.get("model") if isinstance(section, DictConfig) else None
        node = model._get_node("exits") if isinstance(model, DictConfig) else None
        if isinstance(node, ListConfig):
            items = OmegaConf.to_container(node, resolve=False)
            model.exits = ",".join(map(str, items)) if items else "[]"


def structured(schema: type, sources: list[tuple[str, Any]]) -> Any:
    """Merge (description, DictConfig | dotlist) sources onto `schema`'s defaults, type-checked.

    Overrides merge one by one, so a message names the one that is wrong.
    """
    cfg = OmegaConf.structured(schema)
    for where, source in sources:
        parts = [(f"override {excerpt(repr(item), 100)}", [item]) for item in source]
        for what, part in parts if isinstance(source, list) else [(where, source)]:
            try:
                part = OmegaConf.from_dotlist(part) if isinstance(part, list) else part
                _exits_as_text(part)
                _check_resolvers(OmegaConf.to_container(part, resolve=False), what)
                cfg = OmegaConf.merge(cfg, part)
            except OmegaConfBaseException as exc:
                raise _explain(exc, what) from None
            except RecursionError:
                raise ErdeError(
                    f"{what} nests lists or mappings deeper than erde reads; give each key a "
                    "plain value (see `erde config` for every key and its type)"
                ) from None
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


def load_config(
    config: str | None = None, overrides: list[str] | None = None, *, recorded: bool = False
) -> Config:
    """The validated config: defaults <- preset or file <- key=value overrides. `recorded`: the
    file is a run folder's, whose `distill.module` is imported only when trusted."""
    overrides = list(overrides or [])
    check_overrides(overrides)
    sources: list[tuple[str, Any]] = []
    if config is not None:
        path = preset_path(config)
        sources.append((str(path), _read_yaml(path)))
    sources.append(("the command-line overrides", overrides))
    cfg = resolved(structured(Config, sources))
    validate(cfg, source=str(config) if recorded else None)
    return replace(cfg, distill=with_method_defaults(cfg.distill))


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
    load_method_module(cfg.distill.module)
    students = student_methods()
    for method in cfg.methods:
        if method not in students:
            plugin = (
                ""
                if method in methods()
                else " (a plugin's: name the module that registers it, distill.module=MODULE)"
            )
            raise ErdeError(
                f"methods contains {method!r}; students use {or_list(students)}{plugin}"
            )
    if not cfg.methods or len(set(cfg.methods)) != len(cfg.methods):
        raise ErdeError(
            f"methods={list(cfg.methods)}: list each student method once, at least one of "
            f"{', '.join(students)}"
        )
    evaluate = {k: r for k, r in records(ReproduceConfig).items() if k.startswith("evaluate.")}
    _check_records(cfg, evaluate)
    _validate_stage(cfg, "teacher", "teacher", None)
    for method in cfg.methods:
        teacher = "teacher" if get_method(method).needs_teacher else None
        _validate_stage(cfg, "student", method, teacher)
    return cfg


def _validate_stage(cfg: ReproduceConfig, stage: str, method: str, teacher: str | None) -> None:
    """`validate` on one stage, its message naming the stage and the reproduce keys to change
    (`student.train.epochs`, not the `train.epochs` of the stage's own config). Its own seed
    too: `erde tune` seeds its runs and sampler with it."""
    seed = getattr(cfg, stage).train.seed
    try:
        validate(stage_config(cfg, stage, seed=seed, method=method, teacher=teacher), stage=stage)
    except ErdeError as exc:
        raise ErdeError(f"the {stage} stage: {exc}") from None


def stage_key(stage: str | None, key: str) -> str:
    """`train.lr` as the reproduce config spells it in `stage` (`student.train.lr`); keys the
    stages share (`data.*`, `distill.*`), and every key where `stage` is None, stay as they are."""
    if stage is None or key.split(".")[0] not in _STAGE_SECTIONS:
        return key
    return f"{stage}.{key}"


_STAGE_SECTIONS = frozenset(f.name for f in dataclasses.fields(StageConfig))


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
    distill = replace(cfg.distill, method=method, teacher=teacher)
    return Config(
        data=cfg.data,
        model=part.model,
        train=replace(part.train, seed=seed),
        distill=with_method_defaults(distill),
    )


def with_method_defaults(d: DistillConfig) -> DistillConfig:
    """`d` with its method's own keys (`distill.options`) at their defaults where not given, so
    a run records every value its loss read; a copy, never the caller's dict."""
    own = get_method(d.method).defaults()
    return replace(d, options={**own, **d.options})


def _check_records(cfg: Any, table: dict[str, Record], stage: str | None = None) -> None:
    """`check_value` on every key of `table` whose record has a rule, named for `stage`."""
    for dotted, record in table.items():
        if dotted.startswith("distill.options."):  # a method's own keys: `_check_options`
            continue
        if record.choices is not None or record.range is not None:
            value = functools.reduce(getattr, dotted.split("."), cfg)
            check_value(stage_key(stage, dotted), value)


def validate(cfg: Config, stage: str | None = None, source: str | None = None) -> None:
    """Ranges and choices that types alone cannot express: the records, then rules across keys.
    `stage`: the reproduce stage `cfg` is one run of, so messages name its keys as the reproduce
    config spells them (`student.train.epochs`). `source`: the run file `cfg` was read from,
    whose method module is imported only when trusted."""
    load_method_module(cfg.distill.module, source)
    method = get_method(cfg.distill.method)
    _check_records(cfg, records(Config), stage)
    _check_options(cfg.distill)
    options = stage_key(stage, "model.options")
    for option, value in cfg.model.options.items():  # the one place floats escape the records
        if isinstance(value, float) and not math.isfinite(value):
            raise ErdeError(f"{options}.{option}={value} must be a finite number")
    _validate_data(cfg.data)
    t, d = cfg.train, cfg.distill
    if t.warmup_epochs >= t.epochs:
        warmup, epochs = stage_key(stage, "train.warmup_epochs"), stage_key(stage, "train.epochs")
        raise ErdeError(
            f"{warmup}={t.warmup_epochs} must be below {epochs}={t.epochs}; "
            f"set {warmup} to less than {t.epochs} (0 for none) or raise {epochs}"
        )
    needs_teacher = method.needs_teacher
    if needs_teacher and not d.teacher:
        raise ErdeError(
            f"distill.method={d.method} needs a teacher: set distill.teacher=RUN_DIR "
            "of a finished teacher run"
        )
    if not needs_teacher and d.teacher:
        raise ErdeError(
            f"distill.teacher is set but distill.method={d.method} uses no teacher; "
            f"drop distill.teacher or pick {or_list(teacher_methods())}"
        )
    plain = cfg.model.exits.strip().strip("[]").strip() == ""
    if not method.early_exits and not plain:
        exits = stage_key(stage, "model.exits")
        raise ErdeError(
            f"distill.method={d.method} trains a plain network without early exits, but "
            f"{exits}={cfg.model.exits!r}; set {exits}=[] (`erde reproduce` lists the sizes in "
            "static_models and sets it)"
        )


def _check_options(d: DistillConfig) -> None:
    """Each of `distill.options` a key some registered method declares, of its type and range
    (`check_option`); the values are typed in place (2 for a float key is 2.0)."""
    known = {k: m.keys[k] for m in methods_table().values() for k in m.keys}
    for name, value in list(d.options.items()):
        if name not in known:
            mine = get_method(d.method).keys
            offer = f"its keys are {', '.join(mine)}" if mine else "it has no keys of its own"
            raise ErdeError(
                f"distill.options.{name}: no registered method declares this key "
                f"(distill.method={d.method}: {offer}); fix the name, or name the module that "
                "registers its method in distill.module"
            )
        d.options[name] = check_option(f"distill.options.{name}", value, known[name])


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
    if d.test_size is not None and d.source != "imagefolder":
        raise ErdeError(
            f"data.test_size={d.test_size:g} holds test images out of an image folder "
            f"(data.source=imagefolder); {d.source} comes with its own test split: drop "
            "data.test_size"
        )
    if d.stream == "always" and d.source != "imagefolder":
        raise ErdeError(
            f"data.stream=always streams image folders (data.source=imagefolder); {d.source} is "
            "read whole into memory: use data.stream=auto"
        )
    if d.eval_crop != 1.0 and d.stream != "always":
        raise ErdeError(
            f"data.eval_crop={d.eval_crop:g} crops streamed images at evaluation, but "
            f"data.stream={d.stream} may decode the images into memory, where they are resized "
            "once (data.image_size) and not cropped again; set data.stream=always, or drop it"
        )


def to_yaml(cfg: Any) -> str:
    """The config as the YAML a run folder records (plain strings and numbers)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    """The config as plain dicts and lists, for JSON sidecars and comparisons."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


__all__ = [
    "Config",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "ModelConfig",
    "Range",
    "Record",
    "ReproduceConfig",
    "StageConfig",
    "TrainConfig",
    "check_value",
    "load_config",
    "load_reproduce_config",
    "preset_names",
    "preset_path",
    "records",
    "stage_config",
    "stage_key",
    "to_dict",
    "to_yaml",
    "validate",
]
