"""The multi-process harness upstream's distributed test mixins import (`from .distributed_testing_utils import ...`).

Written for this fork's upstream-test gate (utils/upstream_tests.py), which places it at
`tests/distributed_testing_utils.py` of the extracted upstream tests: the sdist ships the mixins, not this module.
It is not a copy of upstream's module; it provides the names the mixins use, with the meaning they rely on:

- `run_distributed(world_size)(func)(*args)`: run `func(rank, *args)` on `world_size` fresh processes that share a
  default process group (gloo on CPU, nccl with one CUDA device per rank); raise in the test process, with every
  failing rank's traceback, if any rank raised, died or did not finish within the timeout;
- `_start_rank_processes(fn, args, nprocs)`: start `fn(rank, *args)` on `nprocs` processes (the function builds its
  own process group) and wait for them under the same timeout;
- `_get_distributed_device_type()`, `_get_distributed_backend()`, `_get_rank_device(rank)`, `_set_rank_device(rank)`.

Ranks are started with the `spawn` method (a clean interpreter: no fork of a process that holds threads or a process
group) and inherit the test process' `sys.path`, so `func` must be importable: a module-level function. The timeout is
`UPSTREAM_GATE_RANK_TIMEOUT` seconds (default 300): a hung collective becomes a test failure, not a hung run.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import tempfile
import time
import traceback
from pathlib import Path


RANK_TIMEOUT_ENV = "UPSTREAM_GATE_RANK_TIMEOUT"
DEFAULT_RANK_TIMEOUT = 300.0


def _rank_timeout() -> float:
    return float(os.environ.get(RANK_TIMEOUT_ENV, DEFAULT_RANK_TIMEOUT))


def _get_distributed_device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _get_distributed_backend() -> str:
    return "nccl" if _get_distributed_device_type() == "cuda" else "gloo"


def _get_rank_device(rank: int):
    import torch

    if _get_distributed_device_type() == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _set_rank_device(rank: int) -> None:
    import torch

    if _get_distributed_device_type() == "cuda":
        torch.cuda.set_device(_get_rank_device(rank))


def _rank_environment(rank: int, world_size: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(world_size),
    )
    # Several ranks share the machine's cores: one thread each unless the caller chose otherwise.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _record_failure(error_dir: str, rank: int) -> None:
    Path(error_dir, f"rank{rank}.error").write_text(traceback.format_exc(), encoding="utf-8")


def _start_entry(rank, fn, args, world_size, error_dir):
    """Rank entry of `_start_rank_processes`: `fn` starts its own process group."""
    _rank_environment(rank, world_size)
    try:
        fn(rank, *args)
    except BaseException:
        _record_failure(error_dir, rank)
        os._exit(1)


def _distributed_entry(rank, func, args, kwargs, world_size, host, port, error_dir):
    """Rank entry of `run_distributed`: join the default process group through the parent's store, run `func`."""
    _rank_environment(rank, world_size)
    os.environ.update(MASTER_ADDR=host, MASTER_PORT=str(port))
    import torch.distributed as dist

    failed = False
    try:
        _set_rank_device(rank)
        store = dist.TCPStore(host, port, world_size=None, is_master=False, timeout=_timedelta(_rank_timeout()))
        dist.init_process_group(backend=_get_distributed_backend(), store=store, rank=rank, world_size=world_size)
        func(rank, *args, **kwargs)
    except BaseException:
        failed = True
        _record_failure(error_dir, rank)
    if failed:
        # Do not wait for peers in a collective they may never join: leave at once, the parent reports the error.
        os._exit(1)
    try:
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        _record_failure(error_dir, rank)
        os._exit(1)


def _timedelta(seconds: float):
    import datetime

    return datetime.timedelta(seconds=seconds)


def _wait(processes, error_dir: str, what: str) -> None:
    """Wait for every rank until the deadline; kill them all on a failure or a timeout, then raise with the reasons."""
    deadline = time.monotonic() + _rank_timeout()
    timed_out = False
    while any(p.is_alive() for p in processes):
        if any(p.exitcode not in (None, 0) for p in processes):
            time.sleep(2.0)  # let the other ranks record their own errors before they are ended
            break
        if time.monotonic() > deadline:
            timed_out = True
            break
        time.sleep(0.1)
    for p in processes:
        if p.is_alive():
            p.kill()
    for p in processes:
        p.join(timeout=30)

    problems = []
    if timed_out:
        problems.append(f"{what}: ranks still running after {_rank_timeout():.0f} s ({RANK_TIMEOUT_ENV}), killed")
    for rank, p in enumerate(processes):
        error = Path(error_dir, f"rank{rank}.error")
        if error.exists():
            problems.append(f"rank {rank} raised:\n{error.read_text(encoding='utf-8')}")
        elif p.exitcode not in (0, None) and not timed_out:
            problems.append(f"rank {rank} exited with code {p.exitcode}")
    if problems:
        raise AssertionError("\n".join(problems))


def _spawn(target, nprocs: int, make_args) -> list:
    context = multiprocessing.get_context("spawn")
    processes = []
    for rank in range(nprocs):
        process = context.Process(target=target, args=make_args(rank), daemon=False)
        process.start()
        processes.append(process)
    return processes


def _start_rank_processes(fn, args=(), nprocs: int = 2) -> None:
    with tempfile.TemporaryDirectory(prefix="gate-ranks-") as error_dir:
        processes = _spawn(_start_entry, nprocs, lambda rank: (rank, fn, tuple(args), nprocs, error_dir))
        _wait(processes, error_dir, getattr(fn, "__name__", str(fn)))


def run_distributed(world_size: int = 2):
    """Decorator factory: `run_distributed(world_size=2)(func)(*args)` runs `func(rank, *args)` on every rank."""

    def decorator(func):
        @functools.wraps(func)
        def runner(*args, **kwargs):
            import torch.distributed as dist

            # The parent owns the rendezvous store, so no two concurrent runs can race for a port.
            store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False)
            try:
                with tempfile.TemporaryDirectory(prefix="gate-ranks-") as error_dir:
                    processes = _spawn(
                        _distributed_entry,
                        world_size,
                        lambda rank: (rank, func, tuple(args), dict(kwargs), world_size, "127.0.0.1", store.port,
                                      error_dir),
                    )
                    _wait(processes, error_dir, func.__name__)
            finally:
                del store

        return runner

    return decorator
