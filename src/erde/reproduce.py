"""The paper's protocol in one call: teacher -> one student per method (and seed) -> comparison.

Each run is an ordinary run folder inside the output folder, so a stopped reproduction picks up
where it stopped: finished runs are kept, an interrupted one resumes, missing ones are trained.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from erde.config import Config, ReproduceConfig, stage_config, to_yaml
from erde.data.prepare import data_info, prepare_data
from erde.errors import ErdeError
from erde.evaluation.compare import Comparison
from erde.evaluation.runs import compare_runs
from erde.files import write_text
from erde.methods import METHOD_TABLE
from erde.model_info import ModelInfo
from erde.parallel import run_parallel
from erde.rundir import ComparisonDir, RunDir
from erde.teacher import check_teacher
from erde.train import fill_teacher_cache, fit

log = logging.getLogger("erde.reproduce")


def ensure_run(cfg, run_dir: Path, progress: bool) -> None:
    """Keep a finished run, resume a started one (from its start if it has no checkpoint yet),
    train a missing one."""
    if _finished(run_dir):
        log.info("%s: finished earlier, kept", run_dir)
    elif RunDir(run_dir).has_run():
        fit(None, run_dir, resume=True, progress=progress)
    else:
        fit(cfg, run_dir, progress=progress)


def reproduce(
    cfg: ReproduceConfig,
    out: str | Path,
    *,
    seeds: Sequence[int] = (0,),
    teacher: str | Path | None = None,
    teacher_per_seed: bool = False,
    progress: bool = True,
    jobs: int = 1,
) -> Comparison:
    """Train what is missing, then compare every student against the teacher on the test split.

    `teacher` reuses a finished teacher run instead of training one; `teacher_per_seed` trains
    a teacher for every seed (each student then learns from the teacher of its own seed).
    `jobs` trains that many students at once, in separate processes sharing the cores; the
    teachers and their output caches come first, so the students never run a teacher.
    """
    out = Path(out)
    if not seeds:
        raise ErdeError("--seeds needs at least one seed, e.g. --seeds 0,1")
    if teacher is not None and teacher_per_seed:
        raise ErdeError("--teacher and --teacher-per-seed exclude each other; drop one")
    if jobs < 1:
        raise ErdeError(f"--jobs {jobs}: give the number of students to train at once, 1 or more")
    if teacher is not None:  # now, not after the first student trained without it
        data = prepare_data(stage_config(cfg, "teacher", seed=seeds[0])).data
        check_teacher(teacher, data_info(data))
    out.mkdir(parents=True, exist_ok=True)
    write_text(ComparisonDir(out).reproduce_yaml, to_yaml(cfg))
    teachers = _teacher_runs(cfg, out, seeds, teacher, teacher_per_seed)
    for seed in dict.fromkeys(seeds if teacher_per_seed else seeds[:1]):
        if teacher is None:
            ensure_run(stage_config(cfg, "teacher", seed=seed), teachers[seed], progress)
    students = [
        (
            stage_config(
                cfg,
                "student",
                seed=seed,
                method=method,
                teacher=str(teachers[seed]) if METHOD_TABLE[method].needs_teacher else None,
            ),
            out / f"{method}-s{seed}",
        )
        for seed in seeds
        for method in cfg.methods
    ]
    train_students(students, jobs=jobs, progress=progress)
    e = cfg.evaluate
    return compare_runs(
        [*sorted(set(teachers.values())), *(run for _, run in students)],
        out=out,
        reference=teachers[seeds[0]],
        policy=e.policy,
        normalize=e.normalize,
        max_drop=e.max_drop,
        budgets=e.budgets,
        device=cfg.teacher.train.device,
    )


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

    A failing run is reported after the others have finished; every run folder is left
    resumable, so the same call again trains only what is missing.
    """
    todo = [(c, r) for c, r in runs if not _finished(r)]
    for c, r in runs:
        if (c, r) not in todo:
            log.info("%s: finished earlier, kept", r)
    if not todo:
        return
    _fill_caches([c for c, _ in todo], progress)
    if jobs > len(todo):
        log.info("--jobs %d: only %d run(s) to train, so %d at once", jobs, len(todo), len(todo))
        jobs = len(todo)
    if jobs == 1:
        for i, (c, r) in enumerate(todo, start=1):
            log.info("%s: run %d of %d", r.name, i, len(todo))
            ensure_run(c, r, progress)
        return
    failures = run_parallel(todo, jobs)
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
            log.info("teacher cache: %s for seed %d", d.teacher, c.train.seed)
            fill_teacher_cache(c, progress=progress)
