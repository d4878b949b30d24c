"""The paper's protocol in one call: teacher -> one student per method (and seed) -> comparison.

Each run is an ordinary run folder inside the output folder, so a stopped reproduction picks up
where it stopped: finished runs are kept, an interrupted one resumes, missing ones are trained.
Grids (`erde.study.grid`) add named runs; shards (`erde.study.shard`) split the runs between
processes that share the folder, coordinated by lock files (`erde.run.lock`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from erde.config.methods import get_method
from erde.config.schema import (
    Config,
    ReproduceConfig,
    read_recorded,
    stage_config,
    to_dict,
    to_yaml,
)
from erde.data.prepare import data_info, prepare_data
from erde.distill.teacher import check_teacher
from erde.errors import ErdeError
from erde.evaluation.compare import Comparison
from erde.evaluation.policies import get_policy, import_policy_module
from erde.evaluation.runs import compare_runs
from erde.files import write_text
from erde.models.build import build_model
from erde.run.layout import ComparisonDir, RunDir
from erde.run.lock import run_lock
from erde.run.model_info import DataInfo, ModelInfo
from erde.study.grid import Variant, expand
from erde.study.parallel import run_parallel, run_serial
from erde.study.shard import Shard
from erde.train.engine import fill_teacher_cache, fit

log = logging.getLogger("erde.study.reproduce")


def ensure_run(
    cfg: Config, run_dir: Path, progress: bool, on_epoch: Callable[[dict], None] | None = None
) -> None:
    """Keep a finished run, resume a started one (from its start if it has no checkpoint yet),
    train a missing one; `on_epoch` goes to `fit`."""
    if _finished(run_dir):
        log.info("%s: finished earlier, kept", run_dir)
    elif RunDir(run_dir).has_run():
        fit(None, run_dir, resume=True, progress=progress, on_epoch=on_epoch)
    else:
        fit(cfg, run_dir, progress=progress, on_epoch=on_epoch)


def train_quietly(cfg: Config, run_dir: Path) -> None:
    """`ensure_run` without a progress bar: what each `--jobs` process runs."""
    ensure_run(cfg, run_dir, progress=False)


def reproduce(
    cfg: ReproduceConfig,
    out: str | Path,
    *,
    seeds: Sequence[int] = (0,),
    teacher: str | Path | None = None,
    teacher_per_seed: bool = False,
    progress: bool = True,
    jobs: int = 1,
    shard: Shard | None = None,
) -> Comparison | None:
    """Train what is missing, then compare every student against the teacher on the test split.

    `teacher` reuses a finished teacher run instead of training one; `teacher_per_seed` trains
    a teacher for every seed (each student then learns from the teacher of its own seed).
    `jobs` trains that many students at once, in separate processes sharing the cores; the
    teachers and their output caches come first, so the students never run a teacher.
    `cfg.grid` adds one student per combination of values (`erde.study.grid`); `shard` trains only
    its slice of the students (after the teachers they need, which the first process to get
    there trains while the others wait). Returns None, and logs which runs are missing, while
    runs of other shards are unfinished: the last shard to finish writes the comparison.
    """
    out = Path(out)
    _check_options(seeds, teacher, teacher_per_seed, jobs)
    check_policy(cfg)
    variants = expand(cfg)  # every grid value typed and checked before anything is written
    info = data_info(prepare_data(stage_config(cfg, "teacher", seed=seeds[0])).data)
    if teacher is not None:  # now, not after the first student trained without it
        check_teacher(teacher, info)
    check_students([v.config for v in variants], info)  # before the teacher trains
    files = ComparisonDir(out)
    check_study(files.reproduce_yaml, cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_text(files.reproduce_yaml, to_yaml(cfg))
    teachers = _teacher_runs(cfg, out, seeds, teacher, teacher_per_seed)
    students = _student_runs(variants, seeds, teachers, out)
    mine = shard.pick(students) if shard else students
    if shard:
        log.info("shard %s: %d of the %d student runs", shard, len(mine), len(students))
    if teacher is None:
        _ensure_teachers(cfg, {teachers[c.train.seed] for c, _ in mine}, teachers, progress)
    train_students(mine, jobs=jobs, progress=progress)
    if not _all_finished([r for _, r in students]):
        return None
    return compare_protocol(
        cfg,
        [*sorted(set(teachers.values())), *(run for _, run in students)],
        out,
        reference=teachers[seeds[0]],
        evaluate_each=[
            *(r for r in set(teachers.values()) if teacher is None),
            *(run for _, run in students),
        ],
    )


def check_students(configs: Sequence[ReproduceConfig], data: DataInfo) -> None:
    """Build every distinct student model (name, module, options, exits) on the meta device,
    no weights and no memory, so a typo in any of them is refused before a teacher trains for
    hours; pretrained weights are left to the run, which loads them."""
    seen: set[str] = set()
    for c in configs:
        model = replace(c.student.model, pretrained=None)
        if repr(model) in seen:
            continue
        seen.add(repr(model))
        with torch.device("meta"):
            try:
                build_model(model, data)
            except ErdeError as exc:
                raise ErdeError(f"the student stage: {exc}") from None


def _student_runs(
    variants: Sequence[Variant], seeds: Sequence[int], teachers: dict[int, Path], out: Path
) -> list[tuple[Config, Path]]:
    """Every student's config and run folder: one per seed and variant, in that order."""
    return [
        (
            stage_config(
                v.config,
                "student",
                seed=seed,
                method=v.method,
                teacher=str(teachers[seed]) if get_method(v.method).needs_teacher else None,
            ),
            out / f"{v.name}-s{seed}",
        )
        for seed in seeds
        for v in variants
    ]


def _all_finished(runs: Sequence[Path]) -> bool:
    """Whether the comparison can be written; if not, the log says which runs it waits for."""
    missing = [r.name for r in runs if not _finished(r)]
    if missing:
        log.warning(
            "no comparison yet: %d run(s) not finished (%s); they belong to other shards or are "
            "being trained. The last process to finish writes it, or run the same command "
            "without --shard once they are done",
            len(missing),
            ", ".join(missing),
        )
    return not missing


def compare_protocol(
    cfg: ReproduceConfig,
    runs: Sequence[Path],
    out: Path,
    *,
    reference: Path,
    evaluate_each: Sequence[Path] = (),
    named: Sequence[str] = (),
) -> Comparison:
    """The comparison of a protocol's runs, with the evaluation settings of its config;
    `named`: keys every group label names (`erde.evaluation.compare.aggregate`)."""
    e = cfg.evaluate
    return compare_runs(
        runs,
        out=out,
        reference=reference,
        policy=e.policy,
        normalize=e.normalize,
        max_drop=e.max_drop,
        budgets=e.budgets,
        device=cfg.teacher.train.device,
        evaluate_each=evaluate_each,
        named=named,
    )


def check_policy(cfg: ReproduceConfig) -> None:
    """The exit policy the protocol evaluates with, registered (its module imported) before any
    run trains, rather than an unknown name after hours of training."""
    import_policy_module(cfg.evaluate.module)
    get_policy(cfg.evaluate.policy)


def _check_options(
    seeds: Sequence[int], teacher: str | Path | None, teacher_per_seed: bool, jobs: int
) -> None:
    if not seeds:
        raise ErdeError("--seeds needs at least one seed, e.g. --seeds 0,1")
    if teacher is not None and teacher_per_seed:
        raise ErdeError("--teacher and --teacher-per-seed exclude each other; drop one")
    if jobs < 1:
        raise ErdeError(f"--jobs {jobs}: give the number of students to train at once, 1 or more")


def check_study(recorded: Path, cfg: ReproduceConfig) -> None:
    """Refuse a folder that holds another study: its recorded config differs from `cfg` in a
    key other than `methods`, `grid` and `static_models` (adding to them only adds runs)."""
    if not recorded.is_file():
        return
    # Through the schema: a key added to erde after the study was recorded takes its default.
    theirs = _flat(to_dict(read_recorded(recorded, ReproduceConfig)))
    ours = _flat(to_dict(cfg))
    keys = sorted(
        k
        for k in ours.keys() | theirs.keys()
        if not k.startswith(("methods", "grid", "static_models")) and ours.get(k) != theirs.get(k)
    )
    if keys:
        k = keys[0]
        raise ErdeError(
            f"{recorded.parent} holds another study: its {recorded.name} has {k}={theirs.get(k)} "
            f"where this call has {k}={ours.get(k)} ({len(keys)} key(s) differ); choose another "
            "--out, or repeat that study's settings"
        )


def _flat(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _ensure_teachers(
    cfg: ReproduceConfig, needed: set[Path], teachers: dict[int, Path], progress: bool
) -> None:
    """Each needed teacher, trained by the first process that takes its lock (the others wait
    for it, then find it finished)."""
    for seed, run in teachers.items():
        if run in needed:
            needed.discard(run)
            with run_lock(run, wait=True):
                ensure_run(stage_config(cfg, "teacher", seed=seed), run, progress)


def _teacher_runs(
    cfg: ReproduceConfig,
    out: Path,
    seeds: Sequence[int],
    teacher: str | Path | None,
    per_seed: bool,
) -> dict[int, Path]:
    """The teacher run folder each seed's students learn from."""
    if teacher is not None:
        return {seed: Path(teacher) for seed in seeds}
    if per_seed:
        return {seed: out / f"teacher-s{seed}" for seed in seeds}
    return {seed: out / "teacher" for seed in seeds}


def train_students(runs: list[tuple[Config, Path]], *, jobs: int, progress: bool) -> None:
    """Every unfinished run, `jobs` at a time; each teacher's output cache is filled first.

    A run another process is training (it holds the run's lock: another shard) is skipped. A
    failing run is reported after the others have finished; every run folder is left
    resumable, so the same call again trains only what is missing.
    """
    todo = [(c, r) for c, r in runs if not _finished(r)]
    kept = [r.name for c, r in runs if (c, r) not in todo]
    if kept:
        log.info("kept %d finished run(s) from earlier: %s", len(kept), ", ".join(kept))
    started = [r.name for _, r in todo if RunDir(r).has_run()]
    if started:
        log.info("resuming %d interrupted run(s): %s", len(started), ", ".join(started))
    with ExitStack() as held:
        mine = [(c, r) for c, r in todo if held.enter_context(run_lock(r, wait=False))]
        for _, r in todo:
            if all(r != m for _, m in mine):
                log.info("%s: another process is training it, skipped", r)
        if mine:
            _train_held(mine, jobs, progress)


def _train_held(todo: list[tuple[Config, Path]], jobs: int, progress: bool) -> None:
    _fill_caches([c for c, _ in todo], progress)
    if jobs > len(todo):
        log.info("--jobs %d: only %d run(s) to train, so %d at once", jobs, len(todo), len(todo))
        jobs = len(todo)
    if jobs == 1:
        failures = run_serial(partial(ensure_run, progress=progress), todo)
    else:
        failures = run_parallel(train_quietly, todo, jobs)
    if failures:
        listed = "; ".join(f"{r.name}: {why}" for r, why in failures)
        raise ErdeError(
            f"{len(failures)} of {len(todo)} run(s) failed ({listed}); the others finished. Fix "
            "the cause and run the same command again: finished runs are kept"
        )


def _finished(run: Path) -> bool:
    sidecar = RunDir(run).sidecar
    return sidecar.is_file() and ModelInfo.read(sidecar).finished


def _fill_caches(configs: list[Config], progress: bool) -> None:
    """One pass of each teacher over the students' batches, before any student starts."""
    seen = set()
    for c in configs:
        d = c.distill
        if not (d.teacher and d.teacher_cache):
            continue
        key = (d.teacher, c.train.seed, c.train.batch_size, c.train.epochs, c.train.precision)
        if key not in seen:
            seen.add(key)
            folder = (
                Path(d.teacher_cache_dir)
                if d.teacher_cache_dir
                else RunDir(d.teacher).teacher_cache
            )
            with run_lock(folder, wait=True):  # shards share it: one fills, the others read
                log.info("filling the teacher cache of %s (seed %d)", d.teacher, c.train.seed)
                fill_teacher_cache(c, progress=progress)
