"""The paper's protocol in one call: teacher -> one student per method (and seed) -> comparison.

Each run is an ordinary run folder inside the output folder, so a stopped reproduction picks up
where it stopped: finished runs are kept, an interrupted one resumes, missing ones are trained.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from erde import checkpoint as ckpt
from erde.config import ReproduceConfig, stage_config, to_yaml
from erde.errors import ErdeError
from erde.evaluation.runs import compare_runs
from erde.train import check_teacher, fit, prepare_data

log = logging.getLogger("erde.reproduce")


def ensure_run(cfg, run_dir: Path, progress: bool) -> None:
    """Keep a finished run, resume a started one (from its start if it has no checkpoint yet),
    train a missing one."""
    side = run_dir / ckpt.SIDECAR
    if side.is_file() and ckpt.read_json(side, "sidecar").get("finished"):
        log.info("%s: finished earlier, kept", run_dir)
    elif (run_dir / ckpt.CONFIG).is_file():
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
) -> dict:
    """Train what is missing, then compare every student against the teacher on the test split.

    `teacher` reuses a finished teacher run instead of training one; `teacher_per_seed` trains
    a teacher for every seed (each student then learns from the teacher of its own seed).
    """
    out = Path(out)
    if not seeds:
        raise ErdeError("--seeds needs at least one seed, e.g. --seeds 0,1")
    if teacher is not None and teacher_per_seed:
        raise ErdeError("--teacher and --teacher-per-seed exclude each other; drop one")
    if teacher is not None:  # now, not after the first student trained without it
        check_teacher(teacher, prepare_data(stage_config(cfg, "teacher", seed=seeds[0])).data)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_text(out / "reproduce.yaml", to_yaml(cfg))
    teachers: dict[int, Path] = {}
    for seed in seeds:
        if teacher is not None:
            teachers[seed] = Path(teacher)
        elif teacher_per_seed:
            teachers[seed] = out / f"teacher-s{seed}"
            ensure_run(stage_config(cfg, "teacher", seed=seed), teachers[seed], progress)
        else:
            teachers[seed] = out / "teacher"
            if seed == seeds[0]:
                ensure_run(stage_config(cfg, "teacher", seed=seed), teachers[seed], progress)
    students = []
    for seed in seeds:
        for method in cfg.methods:
            run = out / f"{method}-s{seed}"
            t = None if method == "ce" else str(teachers[seed])
            ensure_run(
                stage_config(cfg, "student", seed=seed, method=method, teacher=t), run, progress
            )
            students.append(run)
    e = cfg.evaluate
    reference = teachers[seeds[0]]
    return compare_runs(
        [*sorted(set(teachers.values())), *students],
        out=out,
        reference=reference,
        policy=e.policy,
        normalize=e.normalize,
        max_drop=e.max_drop,
        budgets=e.budgets,
        device=cfg.teacher.train.device,
    )
