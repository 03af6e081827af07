"""Rank-side plumbing for scripts started by `fork_utils.launcher.launch`.

A launched script wraps its body with `run_rank(main)`. Each rank then
- tees its Python stdout/stderr into `<results>/rank<r>.log`, so the launcher can report every rank's tail;
- dumps every thread's stack into that log on SIGUSR1, which the launcher sends before killing a job that timed out,
  so a hang says where each rank was stuck;
- writes `main()`'s return value to `<results>/rank<r>.pt` (torch.save: tensors allowed) for the test to assert on,
  then tears the process groups down together with the other ranks (`_end_process_group`); or writes the traceback
  to `<results>/rank<r>.error` and exits non-zero. A failing rank lingers `EPFORK_FAILURE_GRACE_S` seconds first
  (the launcher sets it): torchrun ends every rank as soon as one exits, and a test of an error that must be raised
  on every rank needs the slower ranks to get there. A rank stuck in a collective instead never does.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path


RESULTS_ENV = "EPFORK_RESULTS_DIR"
FAILURE_GRACE_ENV = "EPFORK_FAILURE_GRACE_S"
BACKEND_ENV = "EPFORK_DIST_BACKEND"
# `<results>/rank<r><FAULT_SUFFIX>` holds the time.time() at which a test made the rank fail without a traceback
FAULT_SUFFIX = ".fault"
# Collective timeout in seconds for the default process group (torch's own default otherwise: 30 min on gloo)
PG_TIMEOUT_ENV = "EPFORK_PG_TIMEOUT_S"


class _Tee:
    def __init__(self, stream, log):
        self._stream, self._log = stream, log

    def write(self, text):
        self._log.write(text)
        self._log.flush()
        return self._stream.write(text)

    def flush(self):
        self._log.flush()
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def results_dir() -> Path | None:
    value = os.environ.get(RESULTS_ENV)
    return Path(value) if value else None


def backend() -> str:
    """The process-group backend the launcher chose: gloo on CPU (the default here), nccl on GPUs."""
    return os.environ.get(BACKEND_ENV, "gloo")


def device():
    import torch

    if backend() == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def process_group_timeout():
    """The collective timeout the test asked for (`EPFORK_PG_TIMEOUT_S`), as a timedelta, or None for the default."""
    from datetime import timedelta

    value = os.environ.get(PG_TIMEOUT_ENV)
    return timedelta(seconds=float(value)) if value else None


def init_process_group():
    """Start the default process group with the launcher's backend (a no-op if something already started it)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        timeout = process_group_timeout()
        dist.init_process_group(backend=backend(), **({"timeout": timeout} if timeout else {}))
    return dist.group.WORLD


def start_accelerator():
    """Under `accelerate launch`: an `Accelerator` on the launcher's backend. It registers the launch's DeepSpeed ZeRO-3
    config with transformers and starts the process group; keep it alive (transformers holds the config weakly)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    timeout = process_group_timeout()
    return Accelerator(
        kwargs_handlers=[InitProcessGroupKwargs(backend=backend(), **({"timeout": timeout} if timeout else {}))]
    )


def mark_fault() -> None:
    """Record that this rank fails now on purpose (a test about to SIGKILL it): the launcher measures from here how
    long the job goes on after a fault, as it does from the traceback of a rank that raised."""
    directory = results_dir()
    if directory is not None:
        (directory / f"rank{rank()}{FAULT_SUFFIX}").write_text(repr(time.time()), encoding="utf-8")


def save_result(value) -> None:
    import torch

    directory = results_dir()
    if directory is not None:
        path = directory / f"rank{rank()}.pt"
        torch.save(value, path.with_suffix(".pt.tmp"))
        os.replace(path.with_suffix(".pt.tmp"), path)


def _end_process_group() -> None:
    """Tear the process groups down while every rank is still there.

    A rank that exits with its gloo groups alive sometimes aborts in their destructors ("terminate called without an
    active exception", SIGABRT) after its work succeeded; the barrier keeps a fast rank from closing its connections
    while a peer still uses them.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_rank(main: Callable[[], object]) -> None:
    directory = results_dir()
    log = None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        log = open(directory / f"rank{rank()}.log", "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
        faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)
    try:
        result = main()
        if result is not None:
            save_result(result)
        _end_process_group()
    except BaseException as e:
        text = traceback.format_exc()
        print(text, file=sys.stderr, flush=True)
        if directory is not None:
            (directory / f"rank{rank()}.error").write_text(text, encoding="utf-8")
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(float(os.environ.get(FAILURE_GRACE_ENV, "0")))
        # Exit at once: a rank that failed must not sit in atexit handlers or collectives its peers never join.
        os._exit(code or 1)
