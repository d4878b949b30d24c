"""`erde config`: a resolved config as YAML with every key's type, default, rule and help.

The help lines live in `HELP`, one table next to the schema (as `CHOICES` and `RANGES` are);
`tests/test_config_help.py` checks that every key of both schemas has one, so a new key cannot
ship undocumented. The rule of a key comes from `CHOICES`/`RANGES` themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from erde.config.schema import (
    CHOICES,
    RANGES,
    load_config,
    load_reproduce_config,
    preset_names,
)
from erde.errors import ErdeError

HELP: dict[str, str] = {
    "data.source": "where the images come from: digits, cifar10, cifar100, svhn, npz, imagefolder",
    "data.root": "folder of the data set (absolute, or relative to where erde runs)",
    "data.download": "download an official data set into data.root where the network allows",
    "data.verify": "check the official archives' checksums",
    "data.val_size": "images held out of training for validation: a count or a fraction (< 1)",
    "data.augment": "random crop and horizontal flip of training images",
    "data.crop_padding": "pixels of zero padding before the random crop",
    "data.stream": "image folders: decode into memory (never), stream the files (always), or "
    "stream above data.device_budget_gb (auto)",
    "data.device_budget_gb": "decoded size above which auto streams (null: a quarter of the "
    "host's memory, and of the GPU's)",
    "data.workers": "processes decoding streamed images (null: the cores, one left for training)",
    "data.image_size": "streamed input size, RandomResizedCrop target (null: the first image's "
    "shorter side)",
    "data.eval_crop": "streamed evaluation: resize to image_size / eval_crop, crop the centre",
    "data.mean": "per-channel mean on the 0..1 scale (null: from the training images)",
    "data.std": "per-channel std on the 0..1 scale (null: from the training images)",
    "model.name": "registered model (`erde models` lists them)",
    "model.exits": '"default", "stages", "every:K" or 1-based block indices such as "3,6"',
    "model.options": "builder options, checked against its signature (model.options.width=16)",
    "model.module": "Python module that registers model.name (a plugin without an entry point)",
    "model.pretrained": "backbone weights (safetensors or state dict), or true for the library's",
    "train.epochs": "passes over the training split",
    "train.batch_size": "images per step, over all processes together",
    "train.lr": "peak learning rate (SGD)",
    "train.momentum": "SGD momentum",
    "train.nesterov": "Nesterov momentum",
    "train.weight_decay": "L2 weight decay",
    "train.schedule": "learning-rate schedule after the warmup",
    "train.milestones": "multistep: where the rate drops, as fractions of the epochs",
    "train.gamma": "multistep: factor applied at each milestone",
    "train.warmup_epochs": "linear warmup length in epochs (below train.epochs)",
    "train.seed": "seed of initialisation, split, batches and augmentation",
    "train.device": "auto, cpu, cuda, cuda:N or mps",
    "train.precision": "fp32, bf16 or fp16 autocast; auto picks bf16 where it is native",
    "train.channels_last": "channels-last memory layout (faster convolutions on some hardware)",
    "train.compile": "torch.compile the model",
    "train.sync_bn": "under torchrun on CUDA: BatchNorm statistics over the global batch",
    "train.eval_batch_size": "images per validation batch, per process",
    "train.checkpoint_every": "keep a copy of the weights every N epochs (0: only the last)",
    "train.freeze_backbone": "train only the exit heads",
    "train.tensorboard": "write TensorBoard events into the run folder",
    "distill.method": "the loss: teacher, ce, kd, kd-masked or erde",
    "distill.teacher": "run folder of a finished teacher (methods with a teacher)",
    "distill.alpha": "weight of the distillation term against the label term",
    "distill.beta": "erde: weight of the entropy term where the teacher is wrong",
    "distill.temperature": "softmax temperature of the distillation term",
    "distill.pairing": "which teacher exit each student exit learns from",
    "distill.entropy_term": "erde: uniform-target cross-entropy or negative entropy",
    "distill.entropy_exits": "erde: the exits the entropy term applies to",
    "distill.exit_weights": "per-exit loss weights (default: all 1)",
    "distill.teacher_cache": "reuse the teacher's outputs across students (exact)",
    "distill.teacher_cache_dir": "where that cache lives (default: TEACHER_RUN/teacher-cache)",
    "methods": "the student methods to train and compare",
    "evaluate.policy": "exit score: entropy or 1 - max probability",
    "evaluate.normalize": "entropy divided by log(classes)",
    "evaluate.max_drop": "accuracy points below the teacher allowed when choosing on val",
    "evaluate.budgets": "MACs budgets reported, as fractions of the student's full MACs",
    "grid": "ablation grid: student.*/distill.* key -> values, one run per combination",
}


def table_key(key: str) -> str:
    """`teacher.train.lr` -> `train.lr`: the stages share the train schema's table entries."""
    parts = key.split(".")
    return ".".join(parts[1:]) if parts[0] in ("teacher", "student") else key


def rule(key: str) -> str:
    """The allowed values as `erde config` prints them, or '' where the type says it all."""
    key = table_key(key)
    if key in CHOICES:
        return "one of " + ", ".join(CHOICES[key])
    if key in RANGES:
        return RANGES[key].rule()
    return ""


def _flow(value: Any) -> str:
    """One value in YAML flow style (`[0.5, 0.75]`, `null`, `cosine`)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10_000).strip()[1:-1]


def _type_name(field: dataclasses.Field) -> str:
    return field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")


def annotated_yaml(cfg: Any, prefix: str = "", indent: str = "") -> str:
    """`cfg` (a config dataclass) as YAML, each key followed by `# type, default, rule: help`."""
    defaults = type(cfg)()
    lines = []
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{f.name}:")
            lines.append(annotated_yaml(value, key + ".", indent + "  ").rstrip("\n"))
            continue
        notes = [_type_name(f), f"default {_flow(getattr(defaults, f.name))}", rule(key)]
        note = ", ".join(n for n in notes if n)
        help_line = HELP.get(table_key(key), "")
        lines.append(f"{indent}{f.name}: {_flow(value)}  # {note}: {help_line}")
    return "\n".join(lines) + "\n"


def schema_keys(schema: type, prefix: str = "") -> list[str]:
    """Every leaf key of a config dataclass, dotted."""
    keys = []
    for f in dataclasses.fields(schema):
        value = getattr(schema(), f.name)
        if dataclasses.is_dataclass(value):
            keys += schema_keys(type(value), prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def show_config(
    name: str | None, overrides: list[str] | None = None, *, reproduce: bool = False
) -> str:
    """What `erde config` prints: a train config, or a reproduce one where `reproduce` is set or
    `name` is a reproduce preset (the two kinds' preset names never overlap)."""
    if reproduce or name in preset_names("reproduce"):
        if name is None:
            raise ErdeError("--reproduce needs a preset name or a YAML file")
        return annotated_yaml(load_reproduce_config(name, overrides))
    return annotated_yaml(load_config(name, overrides))
