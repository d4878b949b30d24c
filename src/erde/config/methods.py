"""The training methods: a registry that the loss, the config, grids, the tuner, comparisons and
`reproduce` all read, for erde's own methods and the user's alike (`register_method`).

A method is described by the terms of its loss (docs/method.md, "Losses"), whether it needs a
teacher, and its own config keys: `ce` has the label cross-entropy alone; `kd` adds the KL term
to the teacher on every sample, `kd-masked` only where the paired teacher exit is right, and
`erde` also the maximum-entropy term where that teacher exit is wrong; `self-kd` distils the
earlier exits from the student's own last exit, with no teacher; `static` is `kd` on a plain
network without early exits (its one exit learns from the teacher's last), the baseline that
`erde compare` draws as the static frontier. A plugin method names these
terms and may add its own (`loss=`, a function per exit; `erde.distill.losses.ExitContext`),
with keys under `distill.options.*` that validation, `erde config`, grids and the tuner read from
their records as they read erde's own.

Plugins come in as models do (`erde.config.plugins`): an installed package's entry point in the
group `erde.methods`, or the module a config names in `distill.module`, which the run records, so
that `evaluate`, `compare` and `reproduce` import it again (a run folder's module only when
trusted).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from erde.config import plugins
from erde.config.records import Range, Record, Search
from erde.errors import ErdeError

KDWhere = Literal["all", "teacher-right"]

# The loss terms erde computes (docs/method.md, "Losses"), and which of them read a teacher.
TERMS: dict[str, str] = {
    "ce": "label cross-entropy",
    "kd": "KL to the paired teacher exit, every sample",
    "kd-masked": "KL to the paired teacher exit where it is right",
    "entropy": "maximum entropy where the paired teacher exit is wrong",
    "self-kd": "KL of each earlier exit to the student's own detached last exit",
}
TEACHER_TERMS = frozenset({"kd", "kd-masked", "entropy"})

# The loss's options (docs/method.md, "Losses"); `erde.distill.losses` implements each one.
PAIRINGS: tuple[str, ...] = ("same", "depth", "final")
ENTROPY_TERMS: tuple[str, ...] = ("uniform-ce", "neg-entropy")
ENTROPY_EXITS: tuple[str, ...] = ("all", "intermediate")
# The keys of `distill` erde owns; a plugin's own keys live in `distill.options` under other names.
BUILTIN_KEYS = frozenset(
    {"method", "module", "options", "teacher", "alpha", "beta", "temperature", "pairing"}
    | {"entropy_term", "entropy_exits", "exit_weights", "teacher_cache", "teacher_cache_dir"}
)
_NAME = re.compile(r"[a-z0-9][a-z0-9_.+-]*")


@dataclass(frozen=True)
class MethodKey:
    """One of a method's own config keys (`distill.options.NAME`): its default, help line,
    allowed values or range, and tuning space (`search`; None: `erde tune` leaves it alone)."""

    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    range: Range | None = None
    search: Search | None = None


@dataclass(frozen=True)
class Method:
    """What one method trains on; the engine and the config ask this, never the method's name."""

    name: str
    terms: tuple[str, ...] = ("ce",)
    teacher: bool = False
    # A student of the protocol (`erde reproduce` trains one per listed method); False: the teacher.
    student: bool = True
    # False: a plain network without early exits (`model.exits=[]`), one point on the curve.
    early_exits: bool = True
    # The method's own per-exit term (`erde.distill.losses.ExitContext` says what it gets).
    loss: Callable[..., Any] | None = field(default=None, compare=False)
    keys: Mapping[str, MethodKey] = field(default_factory=dict)
    module: str = "erde"  # the module that registered it

    @property
    def needs_teacher(self) -> bool:
        """Whether training needs a finished teacher run (`distill.teacher`)."""
        return self.teacher

    @property
    def kd(self) -> KDWhere | None:
        """Where the KL term to the teacher applies; None: no such term."""
        if "kd" in self.terms:
            return "all"
        return "teacher-right" if "kd-masked" in self.terms else None

    @property
    def entropy(self) -> bool:
        """Whether the maximum-entropy term is in the loss."""
        return "entropy" in self.terms

    @property
    def distils(self) -> bool:
        """Whether the loss learns from soft targets (a teacher's, or its own last exit's), so it
        weighs the label term by `distill.alpha` and reads `distill.temperature`."""
        return self.teacher or "self-kd" in self.terms

    def reads(self, term: str) -> bool:
        """Whether keys of a record's `term` change what this method trains."""
        if term == "teacher":
            return self.teacher
        if term == "kd":
            return self.distils
        if term == "entropy":
            return self.entropy
        return term == self.name  # a method's own key

    def defaults(self) -> dict[str, Any]:
        """The method's own keys with their defaults."""
        return {k: v.default for k, v in self.keys.items()}


METHOD_TABLE: dict[str, Method] = {}


def register_method(
    name: str,
    *,
    terms: Sequence[str] = ("ce",),
    loss: Callable[..., Any] | None = None,
    teacher: bool | None = None,
    keys: Mapping[str, MethodKey] | None = None,
    student: bool = True,
    early_exits: bool = True,
    module: str | None = None,
) -> Method:
    """Register a training method; every command finds it by `name` (`distill.method=NAME`).

    `terms`: erde's loss terms it uses (`TERMS`); `loss`: its own per-exit term, a function
    `(student_logits, labels, teacher_logits or None, ctx) -> per-sample tensor` added to them
    (`erde.distill.losses.ExitContext`); `teacher`: whether it needs a teacher (default: whether
    a term reads one); `keys`: its own config keys, `distill.options.KEY`; `early_exits=False`:
    it trains a plain network (`model.exits=[]`), a point of the static frontier. A mistake is
    refused here, naming the method and the fix, before any run starts.
    """
    module = module or _caller_module()
    where = f"method {name!r} ({module})"
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ErdeError(
            f"{where}: a method name is lowercase letters, digits and - _ . + (it names run "
            "folders); rename it"
        )
    terms = tuple(terms)
    unknown = [t for t in terms if t not in TERMS]
    if unknown:
        raise ErdeError(
            f"{where} names the loss term {unknown[0]!r}; erde's terms are "
            f"{or_list(list(TERMS))}: fix the name, or compute your own term in loss="
        )
    if not terms and loss is None:
        raise ErdeError(f"{where} has no loss: name erde's terms (terms=) or give loss=")
    if "kd" in terms and "kd-masked" in terms:
        raise ErdeError(f"{where} names both kd and kd-masked; keep one KL term to the teacher")
    reads_teacher = bool(TEACHER_TERMS & set(terms))
    teacher = reads_teacher if teacher is None else bool(teacher)
    if reads_teacher and not teacher:
        raise ErdeError(
            f"{where}: teacher=False, but the terms {or_list(sorted(TEACHER_TERMS & set(terms)))} "
            "read a teacher; drop them or set teacher=True"
        )
    own = dict(keys or {})
    for key, spec in own.items():
        _check_key(where, name, key, spec)
    method = Method(name, terms, teacher, student, early_exits, loss, own, module)
    old = METHOD_TABLE.get(name)
    if old is not None and old != method:
        raise ErdeError(
            f"{where}: the method {name!r} is already registered by {old.module}; give yours "
            "another name"
        )
    METHOD_TABLE[name] = method
    return method


def _check_key(where: str, name: str, key: str, spec: MethodKey) -> None:
    if not isinstance(spec, MethodKey):
        raise ErdeError(f"{where}: key {key!r} must be an erde.MethodKey(default, help, ...)")
    if key in BUILTIN_KEYS or not re.fullmatch(r"[a-z_][a-z0-9_]*", key):
        what = f"is erde's own distill.{key}" if key in BUILTIN_KEYS else "is not a plain name"
        raise ErdeError(
            f"{where} declares the key {key!r}, which {what}; rename it (a method's own keys "
            "are distill.options.NAME, NAME in lowercase letters, digits and _)"
        )
    for other in METHOD_TABLE.values():
        if key in other.keys and other.name != name and other.keys[key] != spec:
            raise ErdeError(
                f"{where} declares the key {key!r}, which method {other.name!r} declares "
                "otherwise; rename it"
            )
    try:
        check_option(f"distill.options.{key}", spec.default, spec)
    except ErdeError as exc:
        raise ErdeError(f"{where}: the default of key {key!r}: {exc}") from None


def check_option(dotted: str, value: Any, spec: MethodKey) -> Any:
    """A value of a method's own key, of its default's type (an int passes for a float) and in
    its range or choices; returns it typed."""
    kind = type(spec.default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if spec.default is not None and type(value) is not kind:
        raise ErdeError(
            f"{dotted}={value!r} must be a {kind.__name__}, like its default {spec.default!r}"
        )
    if spec.choices is not None and value not in spec.choices:
        choices = ", ".join(spec.choices)
        raise ErdeError(f"{dotted}={value!r} is not allowed; choose one of {choices}")
    if spec.range is not None and isinstance(value, (int, float)) and not spec.range.holds(value):
        raise ErdeError(f"{dotted}={value} must be {spec.range.rule()}")
    return value


def key_record(method: Method, key: str) -> Record:
    """The record of one of a method's own keys, as the schema's keys have theirs."""
    spec = method.keys[key]
    help = f"{method.name}: {spec.help}"
    return Record(help, spec.choices, spec.range, search=spec.search, term=method.name)


def option_records() -> dict[str, Record]:
    """{`distill.options.KEY`: record} of every registered method's own keys."""
    return {
        f"distill.options.{k}": key_record(m, k) for m in methods_table().values() for k in m.keys
    }


def option_spec(dotted: str) -> MethodKey | None:
    """The declaration of a method's own key (`distill.options.NAME`), None for any other key."""
    prefix, _, name = dotted.rpartition(".")
    if prefix != "distill.options":
        return None
    return next((m.keys[name] for m in methods_table().values() if name in m.keys), None)


def methods_table() -> dict[str, Method]:
    """Every registered method: erde's and those of the installed plugins' entry points."""
    plugins.load_entry_points("method")
    return METHOD_TABLE


def get_method(name: str) -> Method:
    """The registered method of a name, or ErdeError naming the registered ones and the fix."""
    if name not in METHOD_TABLE:
        plugins.load_entry_points("method")
    method = METHOD_TABLE.get(name)
    if method is None:
        raise ErdeError(
            f"distill.method={name!r} is not a registered method; choose one of "
            f"{', '.join(METHOD_TABLE)}, or name the module that registers it "
            "(distill.module=my_pkg.methods, or an erde.methods entry point)"
        )
    return method


def methods() -> tuple[str, ...]:
    """The names of every registered method."""
    return tuple(methods_table())


def student_methods() -> tuple[str, ...]:
    """The methods that train a student (all but `teacher`)."""
    return tuple(n for n, m in methods_table().items() if m.student)


def static_methods() -> tuple[str, ...]:
    """The methods that train a plain network without early exits: the static frontier."""
    return tuple(n for n, m in methods_table().items() if not m.early_exits)


def teacher_methods() -> tuple[str, ...]:
    """The methods that need a teacher."""
    return tuple(n for n, m in methods_table().items() if m.needs_teacher)


def load_method_module(module: str | None, source: str | None = None) -> None:
    """Import the plugin module a config names in `distill.module`; `source`: the run file that
    names it, whose module is imported only when trusted (`erde.config.plugins`)."""
    if not module:
        return
    if source is not None:
        plugins.check_trusted(module, source, "method")
    plugins.import_plugin(module, "distill.module", source)


def or_list(names: tuple[str, ...] | list[str]) -> str:
    """'a, b or c': how messages offer a choice among names."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _caller_module() -> str:
    frame = sys._getframe(2)  # register_method's caller
    return str(frame.f_globals.get("__name__", "?"))


# erde's own methods, registered as a plugin's are (docs/method.md, "Losses").
register_method("teacher", student=False, module="erde")
for _name, _terms in (
    ("ce", ("ce",)),
    ("kd", ("ce", "kd")),
    ("kd-masked", ("ce", "kd-masked")),
    ("erde", ("ce", "kd-masked", "entropy")),
    ("self-kd", ("ce", "self-kd")),
):
    register_method(_name, terms=_terms, module="erde")
# The static baseline: KD on a network without early exits (`erde.evaluation.frontier`).
register_method("static", terms=("ce", "kd"), early_exits=False, module="erde")
# The students `erde reproduce` trains where a config lists none: the paper's comparison.
PAPER_METHODS: tuple[str, ...] = ("ce", "kd", "kd-masked", "erde")

__all__ = [
    "ENTROPY_EXITS",
    "ENTROPY_TERMS",
    "METHOD_TABLE",
    "PAIRINGS",
    "PAPER_METHODS",
    "TERMS",
    "Method",
    "MethodKey",
    "check_option",
    "get_method",
    "load_method_module",
    "methods",
    "option_records",
    "option_spec",
    "or_list",
    "register_method",
    "static_methods",
    "student_methods",
    "teacher_methods",
]
