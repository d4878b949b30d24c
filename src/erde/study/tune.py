"""`erde tune`: the same number of Optuna trials for every method over its own loss keys, scored
on the validation split only; then each method's best setting trained with several seeds and
compared on test.

Fair by construction: every method gets `trials` finished (complete or pruned) trials, counted
in the storage (running ones included, so concurrent workers do not overshoot), of a TPE sampler
seeded per trial (`TrialSeededTPE`) over the keys its loss reads (each key's record says where
to search it, `Record.search`, which methods it matters for, and whether it may be varied; a
plugin method's own keys are searched as erde's are), with the same teacher, schedule and seed.
The objective is the AUC of the validation accuracy-versus-MACs curve over the student's own
MACs range (`erde.evaluation.metrics.auc`, the function behind a report's `test_auc`), and a
median pruner stops a trial whose mean validation accuracy over the exits falls below the
median of earlier trials at the same epoch.

Layout of the study folder: `tune.yaml` (the config, refused if another study's), `study-key`
(what names its Optuna studies, unique to the folder), `study.db` (the default storage),
`teacher/`, one ordinary run folder per trial (`METHOD/trial-NNNN`), `best.json`, and `final/`
(the best settings x seeds and their comparison, labelled with each method's tuned setting; the
final run of the study's own seed is a link to the best trial's run folder, which has the same
config, not a second training). Any Optuna storage URL serves workers on
several machines sharing the folder: start the same command on each.

Interruptions: a trial stopped by Ctrl-C is queued again with its parameters and resumes its run
folder on the next start. A worker killed outright (SIGKILL, preemption) leaves its trial RUNNING;
its heartbeat stops, and the next trial any worker starts after the grace period marks it failed
and queues it again the same way.

Output: Optuna's own INFO lines are silenced while `tune` runs; erde logs one line per finished
trial instead (as Optuna does, but in erde's units: AUC in %, settings to 4 significant digits).
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from erde.config.method_keys import applies
from erde.config.methods import get_method, or_list
from erde.config.records import Record
from erde.config.schema import (
    Config,
    EvalConfig,
    ReproduceConfig,
    read_recorded,
    records,
    stage_config,
    to_dict,
    to_yaml,
)
from erde.data.prepare import data_info, prepare_data
from erde.distill.teacher import check_teacher
from erde.errors import ErdeError
from erde.evaluation.cache import load_cache
from erde.evaluation.compare import Comparison
from erde.evaluation.groups import settings_text
from erde.evaluation.metrics import auc
from erde.evaluation.sweep import sweep
from erde.files import write_json, write_text
from erde.run.layout import RunDir
from erde.run.lock import run_lock
from erde.study.reproduce import (
    check_policy,
    check_students,
    check_study,
    compare_protocol,
    ensure_run,
    train_students,
)

log = logging.getLogger("erde.study.tune")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
RUN = "run"  # the user attribute naming a trial's run folder
STUDY_KEY = "study-key"  # the file naming the folder's Optuna studies (`study_name`)


@dataclass
class Best:
    """A method's best finished trial so far (by validation AUC)."""

    method: str
    val_auc: float
    params: dict[str, Any]
    run: str
    finished_trials: int


@dataclass
class TuneResult:
    best: dict[str, Best]
    comparison: Comparison | None  # None without --final-seeds, or while trials are missing


def space(method: str, table: dict[str, Record] | None = None) -> list[str]:
    """The keys tuned for `method`: those with a search space (`Record.search`) that its loss
    reads (each key's record says which methods it matters for) and that a grid may vary, in
    the records' order. `table`: the key records."""
    table = records() if table is None else table
    return [
        k
        for k, r in table.items()
        if k.startswith("distill.")
        and r.search is not None
        and r.gridded
        and applies(k, method, table)
    ]


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """Optuna's TPE whose random draws for a trial are seeded by (seed, trial number, key):
    one seeded TPE restarted by a resume, or started by each of several workers, would draw
    its sequence again and repeat earlier trials' settings; trial numbers are the storage's,
    never given twice."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def _tpe(self, trial: FrozenTrial, key: str = "") -> optuna.samplers.TPESampler:
        digest = hashlib.sha256(f"{self.seed}:{trial.number}:{key}".encode()).digest()
        return optuna.samplers.TPESampler(seed=int.from_bytes(digest[:4], "big"))

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        return {}  # independent TPE, as TPESampler's default: each key on its own

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        return {}

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        tpe = self._tpe(trial, param_name)
        return tpe.sample_independent(study, trial, param_name, param_distribution)


def open_storage(url: str, heartbeat_s: int = 60) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage with heartbeats (grace: 3 beats), whose stale trials are queued
    again; ErdeError when it cannot be opened."""
    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat_s,
                grace_period=3 * heartbeat_s,
                heartbeat_stale_trial_callback=_requeue_stale,
            )
    except Exception as exc:  # SQLAlchemy and its drivers raise many types; all mean "cannot"
        reason = " ".join(str(exc).split())[:200]
        raise ErdeError(
            f"cannot open the Optuna storage {url} ({type(exc).__name__}: {reason}); give "
            "--storage a URL this machine can open, e.g. sqlite:///PATH/study.db in an "
            "existing folder or postgresql://USER@HOST/DB"
        ) from None


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Optuna's failure to write its storage (a read-only SQLite file, a lost database) as one
    line naming the storage, not a traceback."""
    try:
        yield
    except optuna.exceptions.StorageInternalError as exc:
        reason = str(exc.__cause__ or exc).strip().splitlines()[0][:200]
        raise ErdeError(
            f"cannot write the Optuna storage {url} ({reason}); make it writable (a SQLite "
            "file and its folder) or give --storage another URL"
        ) from None


def _create_study(
    store: optuna.storages.RDBStorage, out: Path, method: str, seed: int
) -> optuna.Study:
    """The method's study in `store`, created or, when it exists, loaded to resume."""
    return optuna.create_study(
        storage=store,
        study_name=study_name(out, method),
        sampler=TrialSeededTPE(seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
        direction="maximize",
        load_if_exists=True,
    )


def study_name(out: Path, method: str) -> str:
    """The Optuna study of one method of a study folder: named by the key its `study-key` file
    holds, unique to the folder, so two folders of one name on a shared storage stay apart."""
    path = Path(out) / STUDY_KEY
    try:
        key = path.read_text().strip()
    except OSError:
        raise ErdeError(
            f"{path} cannot be read; run `erde tune --out {out}` to create it"
        ) from None
    except UnicodeDecodeError:
        raise ErdeError(
            f"{path} is damaged (not UTF-8 text); restore it to resume this folder's studies, "
            "or delete it to tune afresh under a new key"
        ) from None
    return f"{key}:{method}"


def _claim_study_key(out: Path, legacy: bool) -> None:
    """Write the folder's study key unless a worker did: a random one, or for a folder an older
    erde made (`legacy`: tune.yaml but no key) the folder-name key it was tuned under. Published
    with a hard link, which fails if the file exists: concurrent workers agree on one key."""
    path = out / STUDY_KEY
    if path.is_file():
        return
    name = out.resolve().name
    key = f"erde-tune:{name}" if legacy else f"erde-tune:{name}:{uuid.uuid4().hex[:16]}"
    draft = out / f".{STUDY_KEY}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    write_text(draft, key + "\n")  # atomic: a full disk is one message, not half a key
    try:
        os.link(draft, path)
    except FileExistsError:
        pass
    finally:
        draft.unlink()


def _requeue(study: optuna.Study, number: int, params: dict[str, Any], run: str | None) -> None:
    """Queue an interrupted trial's parameters again, to resume its run folder."""
    study.enqueue_trial(params, user_attrs={RUN: run} if run else None)
    log.info("trial %d of %s queued again, to resume %s", number, study.study_name, run)


def _requeue_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's call for a trial whose worker stopped beating (killed)."""
    _requeue(study, trial.number, trial.params, trial.user_attrs.get(RUN))


@contextmanager
def _optuna_warnings_only() -> Iterator[None]:
    """Optuna's logging at WARNING, as it was afterwards: its INFO lines ("[I ...] Trial 0
    finished with value: 0.7348215463919817") would interleave with erde's own."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


@_optuna_warnings_only()
def tune(
    cfg: ReproduceConfig,
    out: str | Path,
    *,
    trials: int,
    storage: str | None = None,
    teacher: str | Path | None = None,
    final_seeds: Sequence[int] = (),
    progress: bool = True,
    heartbeat_s: int = 60,
) -> TuneResult:
    """Tune every method of `cfg.methods` that has loss keys; see the module doc."""
    out = Path(out)
    methods = _tuned_methods(cfg, trials)
    check_policy(cfg)
    record = out / "tune.yaml"
    check_study(record, cfg)
    store = open_storage(storage, heartbeat_s) if storage else None  # before writing anything
    seed = cfg.student.train.seed
    info = data_info(prepare_data(stage_config(cfg, "teacher", seed=seed)).data)
    if teacher is not None:
        check_teacher(teacher, info)
    check_students([cfg], info)  # before the teacher trains
    out.mkdir(parents=True, exist_ok=True)
    _claim_study_key(out, legacy=record.is_file())  # before tune.yaml: see _claim_study_key
    write_text(record, to_yaml(cfg))
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    store = store or open_storage(url, heartbeat_s)
    with storage_errors(url):  # the studies first: a storage that refuses writes, before work
        studies = {m: _create_study(store, out, m, seed) for m in methods}
    teacher_run = Path(teacher) if teacher is not None else out / "teacher"
    if teacher is None:
        with run_lock(teacher_run, wait=True):
            ensure_run(stage_config(cfg, "teacher", seed=seed), teacher_run, progress)
    best = {}
    with storage_errors(url):
        for method, study in studies.items():
            _optimize(study, cfg, method, out, teacher_run, trials, progress)
            best[method] = _best(study, method)
    write_json(out / "best.json", {m: b.__dict__ for m, b in best.items() if b is not None})
    done = all(b is not None and b.finished_trials >= trials for b in best.values())
    comparison = None
    if final_seeds and done:
        comparison = _final(cfg, out, best, teacher_run, final_seeds, progress)
    elif final_seeds:
        log.warning("final runs wait until every method has %d finished trials", trials)
    return TuneResult({m: b for m, b in best.items() if b is not None}, comparison)


def _tuned_methods(cfg: ReproduceConfig, trials: int) -> list[str]:
    if trials < 1:
        raise ErdeError(f"--trials {trials}: give the number of trials per method, 1 or more")
    methods = [m for m in cfg.methods if space(m)]
    skipped = [m for m in cfg.methods if not space(m)]
    if not methods:
        raise ErdeError(
            f"methods={list(cfg.methods)} have no hyperparameters to tune; list methods with "
            "a teacher, e.g. 'methods=[kd,erde]'"
        )
    if skipped:
        log.info("%s: no hyperparameters to tune, skipped", or_list(skipped))
    return methods


def _optimize(
    study: optuna.Study,
    cfg: ReproduceConfig,
    method: str,
    out: Path,
    teacher_run: Path,
    trials: int,
    progress: bool,
) -> None:
    """Trials until the study holds `trials` finished ones, counted in the storage, so shared
    by every worker: none starts a trial the running ones already complete the budget with."""

    def objective(trial: Trial) -> float:
        name = trial.user_attrs.get(RUN) or f"trial-{trial.number:04d}"
        trial.set_user_attr(RUN, name)
        changes = {key: _suggest(trial, key) for key in space(method)}
        config = trial_config(cfg, method, changes, teacher_run, cfg.student.train.seed)
        run = out / method / name
        try:
            ensure_run(config, run, progress, on_epoch=lambda row: _report(trial, row))
        except KeyboardInterrupt:
            _requeue(study, trial.number, trial.params, name)
            raise
        return val_auc(run, cfg.evaluate, cfg.student.train.device)

    while True:
        with warnings.catch_warnings():  # marked experimental, as heartbeats are
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a killed worker's trial: queued again
        finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        log.info("%s: %d of %d trials finished, %d running", method, finished, trials, running)
        if finished + running >= trials:
            return
        study.optimize(
            objective, n_trials=1, gc_after_trial=False, callbacks=[_say_finished(method, trials)]
        )


def _say_finished(method: str, trials: int) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Optuna's callback after each trial: erde's line for a finished (complete or pruned) one,
    counted among the study's finished trials."""

    def say(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state not in FINISHED:
            return
        k = len(study.get_trials(deepcopy=False, states=FINISHED))
        head = f"{method}: trial {k} of {trials} ({trial.user_attrs.get(RUN)})"
        setting = settings_text(trial.params)
        if trial.state == TrialState.PRUNED:
            log.info("%s pruned at epoch %s (%s)", head, trial.last_step, setting)
            return
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        top = max(complete, key=lambda t: t.value)
        log.info(
            "%s finished, val AUC %.2f %% (%s); best %.2f %% (%s)",
            head, 100 * trial.value, setting, 100 * top.value, top.user_attrs.get(RUN),
        )  # fmt: skip

    return say


def _suggest(trial: Trial, key: str) -> Any:
    record = records()[key]
    s = record.search
    if s.low is None or s.high is None:
        return trial.suggest_categorical(key, list(record.choices or ()))
    if isinstance(s.low, int) and isinstance(s.high, int):
        return trial.suggest_int(key, s.low, s.high, log=s.log)
    return trial.suggest_float(key, s.low, s.high, log=s.log)


def _report(trial: Trial, row: dict) -> None:
    """The epoch's mean validation accuracy over the exits, for the median pruner."""
    accuracy = [v for k, v in row.items() if k.startswith("val/acc/")]
    trial.report(sum(accuracy) / len(accuracy), row["epoch"])
    if trial.should_prune():
        raise optuna.TrialPruned(f"epoch {row['epoch']}: below the median of earlier trials")


def trial_config(
    cfg: ReproduceConfig, method: str, changes: dict[str, Any], teacher_run: Path, seed: int
) -> Config:
    """The student config of one setting: the study's student with `changes` to `distill.*`
    (a method's own keys: `distill.options.NAME`)."""
    teacher = str(teacher_run) if get_method(method).needs_teacher else None
    c = stage_config(cfg, "student", seed=seed, method=method, teacher=teacher)
    values, options = {}, dict(c.distill.options)
    for key, value in changes.items():
        name = key.split(".", 1)[1]
        if name.startswith("options."):
            options[name.split(".", 1)[1]] = value
        else:
            values[name] = value
    return replace(c, distill=replace(c.distill, **values, options=options))


def val_auc(run: Path, e: EvalConfig, device: str) -> float:
    """AUC of the validation accuracy-versus-MACs curve over the run's own MACs range."""
    cache = load_cache(run, device=device)
    curve = sweep(
        cache.logits["val"],
        cache.labels["val"],
        cache.exit_macs,
        policy=e.policy,
        normalize=e.normalize,
    )
    return auc(curve, cache.exit_macs[-1])


def _best(study: optuna.Study, method: str) -> Best | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    top = max(complete, key=lambda t: t.value)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    return Best(method, float(top.value), dict(top.params), top.user_attrs[RUN], finished)


def _final(
    cfg: ReproduceConfig,
    out: Path,
    best: dict[str, Best],
    teacher_run: Path,
    seeds: Sequence[int],
    progress: bool,
) -> Comparison:
    """Each method's best setting with every seed, compared on test against the teacher and
    labelled with its tuned keys; the study's seed is the best trial's own run."""
    final = out / "final"
    runs = []
    for m, b in best.items():
        for seed in seeds:
            config, run = trial_config(cfg, m, b.params, teacher_run, seed), final / f"{m}-s{seed}"
            if seed == cfg.student.train.seed:  # the seed every trial was trained with
                _link_trial(run, out / m / b.run, config)
            runs.append((config, run))
    train_students(runs, jobs=1, progress=progress)
    tuned = [k for k in records() if any(k in space(m) for m in best)]  # records' order
    return compare_protocol(
        cfg, [teacher_run, *(run for _, run in runs)], final, reference=teacher_run, named=tuned
    )


def _link_trial(run: Path, trial: Path, config: Config) -> None:
    """`run` as a link to the finished `trial` run that was trained with `config` (the same
    setting and seed): training it again would repeat that run. Left alone when it exists
    (trained or linked earlier) or the trial's recorded config differs."""
    if run.exists() or run.is_symlink():
        return
    recorded = to_dict(read_recorded(RunDir(trial).config, Config))
    if recorded != to_dict(config):
        log.info("%s: %s was trained with another config, so it is trained", run, trial)
        return
    run.parent.mkdir(parents=True, exist_ok=True)
    try:
        run.symlink_to(os.path.relpath(trial, run.parent), target_is_directory=True)
    except FileExistsError:  # another worker linked it first
        return
    log.info("%s: the best trial's run %s (same config and seed), linked", run, trial)


__all__ = [
    "Best",
    "TuneResult",
    "open_storage",
    "space",
    "study_name",
    "trial_config",
    "tune",
    "val_auc",
]
