"""Independent training runs in parallel processes that share the machine's cores.

Each run is an ordinary `fit` in a fresh (spawned) process with `cores // jobs` threads, writing
its own run folder, so the result is the folder a serial run writes. Ctrl-C, or SIGTERM or
SIGINT to the parent alone, stops every process; what they had written is resumable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from types import FrameType

from erde.config.schema import Config
from erde.device import cores
from erde.errors import ErdeError

log = logging.getLogger("erde.study.reproduce")


def _start_worker(threads: int) -> None:
    import torch

    from erde.logs import log_to_stdout

    os.environ["OMP_NUM_THREADS"] = str(threads)  # what `fit`'s thread choice honours
    torch.set_num_threads(threads)
    log_to_stdout()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM taken as Ctrl-C, so `run_parallel`'s cleanup stops the workers: by default it
    would end this process alone and leave them training, orphans of pid 1."""
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """`_interrupt` as the SIGTERM handler for the block (signal handlers are the main
    thread's to set; elsewhere the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def failure(run: Path, exc: BaseException) -> tuple[Path, str] | None:
    """(run, message) for a user-facing error (`ErdeError`, `OSError`), logged; None for a bug,
    which the caller raises."""
    if not isinstance(exc, (ErdeError, OSError)):
        return None
    log.error("%s: failed: %s", run.name, exc)
    return run, " ".join(str(exc).split())


def run_serial(
    train: Callable[[Config, Path], None], runs: list[tuple[Config, Path]]
) -> list[tuple[Path, str]]:
    """`train(cfg, run)` for every run in turn, in this process; a failing run does not stop
    the others. Returns what `run_parallel` returns."""
    failures: list[tuple[Path, str]] = []
    took: list[float] = []
    for i, (cfg, run) in enumerate(runs, start=1):
        # Runs differ (a teacher, its students): the median so far, not the last, estimates.
        left = (
            f", about {(len(runs) - i + 1) * statistics.median(took) / 60:.1f} min left"
            if took
            else ""
        )
        log.info("%s: run %d of %d%s", run.name, i, len(runs), left)
        start = time.monotonic()
        try:
            train(cfg, run)
            took.append(time.monotonic() - start)
        except Exception as exc:
            failed = failure(run, exc)
            if failed is None:
                raise
            failures.append(failed)
    return failures


def run_parallel(
    train: Callable[[Config, Path], None], runs: list[tuple[Config, Path]], jobs: int
) -> list[tuple[Path, str]]:
    """`train(cfg, run)` for every run with `jobs` processes (`train`: a module-level function,
    so a spawned process can import it); returns (run, message) of each run that failed with a
    user-facing error (a bug in one run still raises, after the others have stopped)."""
    threads = max(1, cores() // jobs)
    log.info("training %d runs, %d at a time, %d thread(s) each", len(runs), jobs, threads)
    failures: list[tuple[Path, str]] = []
    pool = ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=get_context("spawn"),
        initializer=_start_worker,
        initargs=(threads,),
    )
    try:
        with _sigterm_interrupts():
            pending: dict[Future, Path] = {pool.submit(train, c, r): r for c, r in runs}
            done_count = 0
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    run = pending.pop(future)
                    done_count += 1
                    exc = future.exception()
                    if exc is None:
                        log.info("%s: finished (%d of %d)", run.name, done_count, len(runs))
                        continue
                    failed = failure(run, exc)
                    if failed is None:
                        raise exc
                    failures.append(failed)
    except BaseException:
        # Ctrl-C reaches the workers too (one process group); SIGTERM or SIGINT to this
        # process alone must not leave them training: stop them, their folders stay resumable.
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return failures
