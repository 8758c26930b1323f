"""The bench's two settings side by side: one worker process per setting, then one assembling pass.

``omnimerge bench --jobs 2`` (the full preset's default on a machine with two cores or more):

1. this process trains what the settings share (the pretrained base, the text LLM), scores them and
   writes the calibration samples, so that no two workers ever write the same file;
2. one worker process per setting runs :func:`~omnimerge.bench.runner.run_bench` for that setting
   alone (its zoo, scores, merges and sweep; backbone merging goes with the full setting), filling
   the same caches a serial run fills, each with ``threads // jobs`` torch threads; its log goes to
   ``OUT/workers/<setting>.log``, and this process shows each worker's latest line (every 10 s on a
   terminal, every minute in a log);
3. the serial :func:`run_bench` then finds everything cached and writes the one report.

The figures are the serial run's: the same cached models, the same per-item scores, the same merges.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Callable

from .config import BenchConfig
from .progress import format_duration

__all__ = ["run_settings_in_parallel"]


def _worker(cfg_dict: dict, out: str, cache_dir: str, methods, setting: str, sweep: bool, threads: int,
            log_path: str, preset: str) -> None:
    import torch

    from .runner import run_bench

    torch.set_num_threads(max(1, threads))
    with open(log_path, "w", buffering=1, encoding="utf-8") as log:
        def say(message: str) -> None:
            log.write(f"{time.strftime('%H:%M:%S')} {message}\n")

        run_bench(BenchConfig.from_dict(cfg_dict), out, cache_dir=cache_dir, methods=methods, settings=(setting,),
                  sweep=sweep, log=say, progress_stream=log, preset=preset)


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "starting"
    return lines[-1][:110] if lines else "starting"


def run_settings_in_parallel(cfg: BenchConfig, out: Path, *, cache_dir: Path, methods, settings, sweep: bool,
                             jobs: int, threads: int, prepare: Callable[[], None], say: Callable[[str], None],
                             preset: str, interval: float = 10.0) -> None:
    """Steps 1 and 2 of the module doc: ``prepare()`` does step 1 in this process; then one worker per
    setting (at most ``jobs`` at a time). Raises ``RuntimeError`` with the log's tail if a worker fails."""
    from ..errors import OmnimergeError

    prepare()
    folder = Path(out) / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    pending = list(settings)
    running: dict[str, multiprocessing.Process] = {}
    t0 = time.perf_counter()
    per_worker = max(1, threads // max(1, min(jobs, len(settings))))
    last_said = 0.0
    while pending or running:
        while pending and len(running) < jobs:
            s = pending.pop(0)
            p = ctx.Process(target=_worker, name=f"bench-{s}",
                            args=(cfg.to_dict(), str(folder / s), str(cache_dir), methods, s, sweep, per_worker,
                                  str(folder / f"{s}.log"), preset))
            p.start()
            running[s] = p
        for s, p in list(running.items()):
            if not p.is_alive():
                p.join()
                del running[s]
                if p.exitcode != 0:
                    for q in running.values():
                        q.terminate()
                    log = folder / f"{s}.log"
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.is_file() else ""
                    raise OmnimergeError(f"the {s} setting's worker failed (exit {p.exitcode}); its log {log} ends:\n{tail}")
        now = time.perf_counter()
        if now - last_said >= interval:
            last_said = now
            say(f"[settings in parallel, {format_duration(now - t0)}] "
                + " | ".join(f"{s}: {_last_line(folder / f'{s}.log')}" for s in settings))
        time.sleep(0.5)
    say(f"settings done in parallel in {format_duration(time.perf_counter() - t0)}; assembling the report")
