"""Run a script on N ranks through a real launcher (`torchrun`, `accelerate launch`, `deepspeed`) with a hard timeout.

A distributed job that goes wrong usually hangs: one rank raised, the others wait in a collective. `launch` bounds
every job: past its timeout it asks each rank for a stack dump (SIGUSR1, see `worker.run_rank`), then kills the
launcher and every process it started, including ranks that torchrun put in sessions of their own, found by a tag in
their environment. It returns each rank's result, error and log tail for the test to assert on.

CPU with gloo is the default. With CUDA devices for every rank (and EPFORK_TEST_DEVICE not "cpu") the same jobs run on
NCCL, as the multi-GPU CI job does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .worker import BACKEND_ENV, FAILURE_GRACE_ENV, FAULT_SUFFIX, RESULTS_ENV


REPO_ROOT = Path(__file__).resolve().parents[2]
TAG_ENV = "EPFORK_LAUNCH_TAG"
DEFAULT_EXTENSIONS_DIR = REPO_ROOT / ".cache" / "torch_extensions"
CONFIG_DIR = REPO_ROOT / "docs" / "configs"
# Python warning filters for the launched ranks (as the demo sets them, examples/ep_deepspeed/run_demo.py)
DEPRECATED_COLLECTIVES_WARNINGS = (
    "ignore:`torch.distributed.reduce_scatter_tensor` is deprecated:FutureWarning,"
    "ignore:`torch.distributed.all_gather_into_tensor` is deprecated:FutureWarning"
)


def default_backend(nproc: int) -> str:
    if os.environ.get("EPFORK_TEST_DEVICE", "").lower() == "cpu":
        return "gloo"
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() >= nproc:
            return "nccl"
    except ImportError:
        pass
    return "gloo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankOutcome:
    rank: int
    result: object = None
    error: str | None = None
    log: str = ""
    # time.time() when the rank failed: it wrote its traceback, or marked a fault injected on purpose (a SIGKILL)
    fault_at: float | None = None

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log.splitlines()[-lines:])


@dataclass
class LaunchResult:
    command: list[str]
    tag: str
    returncode: int | None
    timed_out: bool
    elapsed: float
    timeout: float
    output: str
    # time.time() when the launcher exited (or the timeout struck)
    ended_at: float = 0.0
    ranks: dict[int, RankOutcome] = field(default_factory=dict)
    leftover_pids: list[int] = field(default_factory=list)
    # Processes of the job still running a few seconds after the launcher exited on its own (then killed).
    stragglers: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def report(self, tail: int = 25) -> str:
        state = f"TIMED OUT after {self.timeout:.0f} s" if self.timed_out else f"exit code {self.returncode}"
        lines = [f"launch of {' '.join(self.command[-3:])}: {state} in {self.elapsed:.1f} s"]
        if (after_fault := self.seconds_from_first_fault_to_end) is not None:
            lines[0] += f", {after_fault:.1f} s of them after the first rank failed"

        for rank, outcome in sorted(self.ranks.items()):
            if outcome.error:
                lines.append(f"--- rank {rank} raised:\n{outcome.error.strip()}")
            else:
                lines.append(f"--- rank {rank} log tail:\n{outcome.log_tail(tail)}")
        if not self.ranks:
            lines.append("--- no rank started; launcher output tail:")
        lines.append("--- launcher output tail:\n" + "\n".join(self.output.splitlines()[-tail:]))
        return "\n".join(lines)

    @property
    def seconds_from_first_fault_to_end(self) -> float | None:
        """How long the job went on after its first rank failed: what a fault must keep short (a rank left waiting in a
        collective makes it long), unlike `elapsed`, which also counts start-up and imports on a busy machine."""
        faults = [outcome.fault_at for outcome in self.ranks.values() if outcome.fault_at is not None]
        return self.ended_at - min(faults) if faults else None

    def check(self) -> LaunchResult:
        """Raise with every rank's error or log tail unless the job succeeded on every rank."""
        if not self.ok:
            raise AssertionError(self.report())
        return self

    def results(self) -> dict[int, object]:
        return {rank: outcome.result for rank, outcome in sorted(self.ranks.items())}


def _tagged_pids(tag: str) -> list[int]:
    needle = f"{TAG_ENV}={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stragglers(tag: str, grace: float = 3.0) -> list[int]:
    """The job's processes still alive `grace` seconds after its launcher exited."""
    deadline = time.monotonic() + grace
    while (pids := _tagged_pids(tag)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


def kill_job(tag: str, grace: float = 5.0) -> list[int]:
    """SIGKILL every process carrying the tag; return those still alive after `grace` seconds (should be none)."""
    deadline = time.monotonic() + grace
    while pids := _tagged_pids(tag):
        _signal_all(pids, signal.SIGKILL)
        if time.monotonic() > deadline:
            return pids
        time.sleep(0.1)
    return []


def launcher_command(
    launcher: str, script: Path, args: list[str], nproc: int, port: int, accelerate_config: Path | None
) -> list[str]:
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={port}"]
    elif launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        if accelerate_config is not None:
            cmd += ["--config_file", str(accelerate_config)]
        cmd += ["--num_processes", str(nproc), "--main_process_port", str(port)]
    elif launcher == "deepspeed":
        # DeepSpeed's own launcher (the `deepspeed` command). `--no_local_rank`: the scripts read LOCAL_RANK from the
        # environment rather than take a `--local_rank` argument.
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}", "--no_local_rank"]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={port}"]
    elif launcher == "python":
        if nproc != 1:
            raise ValueError("launcher='python' runs a single process")
        cmd = [sys.executable]
    else:
        raise ValueError(f"unknown launcher {launcher!r}: use 'torchrun', 'accelerate', 'deepspeed' or 'python'")
    return [*cmd, str(script), *map(str, args)]


def child_environment(tag: str, results: Path, backend: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a launched job: its tag (to find and kill its processes), where ranks write results, the
    backend, this checkout first on the path, and settings that keep CPU runs quiet and quick."""
    child_env = dict(os.environ)
    child_env.update(
        {
            TAG_ENV: tag,
            RESULTS_ENV: str(results),
            BACKEND_ENV: backend,
            # This checkout's transformers first (a second checkout, e.g. a git worktree, shares the editable install
            # of the first), then its tests package.
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO_ROOT / "src"), str(REPO_ROOT), os.environ.get("PYTHONPATH")])
            ),
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    child_env.setdefault("TORCH_EXTENSIONS_DIR", str(DEFAULT_EXTENSIONS_DIR))
    # DeepSpeed 0.19 calls collectives that torch 2.13 deprecates, dozens of times a job: keep the logs readable
    child_env.setdefault("PYTHONWARNINGS", DEPRECATED_COLLECTIVES_WARNINGS)
    # Let the other ranks reach (and report) an error that every rank must raise before torchrun ends them all.
    child_env.setdefault(FAILURE_GRACE_ENV, "8")
    # Ranks share the 2 cores of the CI machine; one thread each keeps them from thrashing.
    child_env.setdefault("OMP_NUM_THREADS", "1")
    if backend == "gloo":
        child_env.setdefault("DS_ACCELERATOR", "cpu")
        child_env.setdefault("CUDA_VISIBLE_DEVICES", "")
    child_env.update(env or {})
    return child_env


@dataclass
class JobEnd:
    timed_out: bool
    # time.monotonic() when the last launcher exited, or the deadline struck
    finished_at: float
    stragglers: list[int]
    leftover: list[int]
    # What `during` returned
    during_result: object = None
    # time.time() at `finished_at`, to compare with the moments ranks record (their fault files)
    ended_at: float = 0.0


def wait_for_job(tag: str, processes: list[subprocess.Popen], deadline: float, during=None) -> JobEnd:
    """
    Wait for the launcher `processes` of job `tag` until `deadline` (time.monotonic()), running `during()` first if
    given; past the deadline ask every rank where it is stuck (worker.run_rank dumps stacks into its log). Then kill
    whatever of the job is left (processes in sessions of their own included) and reap the launchers.
    """
    timed_out, stragglers, during_result = False, [], None
    try:
        if during is not None:
            during_result = during()
        for proc in processes:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        finished_at = time.monotonic()
        stragglers = _stragglers(tag)
    except subprocess.TimeoutExpired:
        timed_out, finished_at = True, time.monotonic()
        _signal_all([pid for pid in _tagged_pids(tag) if pid not in {p.pid for p in processes}], signal.SIGUSR1)
        time.sleep(1.0)
    finally:
        leftover = kill_job(tag)
        for proc in processes:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    ended_at = time.time() - (time.monotonic() - finished_at)
    return JobEnd(timed_out, finished_at, stragglers, leftover, during_result, ended_at)


def launch(
    script: str | Path,
    args: list[str] | tuple = (),
    nproc: int = 2,
    launcher: str = "torchrun",
    timeout: float = 120,
    accelerate_config: str | Path | None = None,
    env: dict[str, str] | None = None,
    results_dir: str | Path | None = None,
) -> LaunchResult:
    """Run `script` on `nproc` ranks; never blocks longer than `timeout` plus a few seconds of cleanup."""
    results = Path(results_dir or tempfile.mkdtemp(prefix="epfork-launch-"))
    results.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex
    backend = default_backend(nproc)
    child_env = child_environment(tag, results, backend, env)

    command = launcher_command(
        launcher, Path(script), list(args), nproc, free_port(), Path(accelerate_config) if accelerate_config else None
    )
    output_path = results / "launcher.log"
    start = time.monotonic()
    with open(output_path, "wb") as output:
        proc = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env,
            cwd=str(REPO_ROOT), start_new_session=True,
        )
        end = wait_for_job(tag, [proc], start + timeout)
    returncode = None if end.timed_out else proc.returncode
    timed_out, leftover, stragglers = end.timed_out, end.leftover, end.stragglers
    elapsed = time.monotonic() - start
    outcome = LaunchResult(
        command=command,
        tag=tag,
        returncode=returncode,
        timed_out=timed_out,
        elapsed=elapsed,
        timeout=timeout,
        output=output_path.read_text(encoding="utf-8", errors="replace"),
        ended_at=end.ended_at,
        leftover_pids=leftover,
        stragglers=stragglers,
    )
    outcome.ranks = _collect_ranks(results)
    return outcome


def _earliest(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)


def _collect_ranks(results: Path) -> dict[int, RankOutcome]:
    import torch

    ranks: dict[int, RankOutcome] = {}
    for path in results.glob("rank*.*"):
        stem = path.name.split(".", 1)[0]
        if not stem[4:].isdigit():
            continue
        outcome = ranks.setdefault(int(stem[4:]), RankOutcome(rank=int(stem[4:])))
        if path.name.endswith(".log"):
            outcome.log = path.read_text(encoding="utf-8", errors="replace")
        elif path.name.endswith(".error"):
            outcome.error = path.read_text(encoding="utf-8", errors="replace")
            outcome.fault_at = _earliest(outcome.fault_at, path.stat().st_mtime)
        elif path.name.endswith(FAULT_SUFFIX):
            outcome.fault_at = _earliest(outcome.fault_at, float(path.read_text(encoding="utf-8")))
        elif path.name.endswith(".pt"):
            # On CPU whatever device the rank ran on (NCCL runs), to compare with references computed here
            outcome.result = torch.load(path, weights_only=False, map_location="cpu")
    return ranks


@dataclass
class CommandResult:
    command: list[str]
    returncode: int | None  # None: the commands ran past their timeout and were killed
    output: str


def run_commands(commands: list[list[str]], timeout: float = 120, env: dict[str, str] | None = None):
    """
    Plain commands side by side (e.g. the offline tools users run on a checkpoint, each one process), in the
    environment of launched jobs (this checkout's transformers first, no GPU) and under the same hard timeout: past
    it, each is killed with everything it started. Returns each one's exit code and output, in order.
    """
    logs = Path(tempfile.mkdtemp(prefix="epfork-commands-"))
    tag = uuid.uuid4().hex
    child_env = child_environment(tag, logs, "gloo", env)
    processes, outputs = [], []
    start = time.monotonic()
    try:
        for index, command in enumerate(commands):
            outputs.append(open(logs / f"{index}.log", "wb"))
            processes.append(subprocess.Popen(
                [str(part) for part in command], stdout=outputs[-1], stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=child_env, cwd=str(REPO_ROOT), start_new_session=True,
            ))
        end = wait_for_job(tag, processes, start + timeout)
    finally:
        for output in outputs:
            output.close()
    return [
        CommandResult([str(part) for part in command], None if end.timed_out else proc.returncode,
                      (logs / f"{index}.log").read_text(encoding="utf-8", errors="replace"))
        for index, (command, proc) in enumerate(zip(commands, processes))
    ]
