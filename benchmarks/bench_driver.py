"""The driver side shared by the benchmarks: the command line, one launch per case under a hard timeout, the JSON
results under benchmarks/results/ (git-ignored) and the exit status."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
ACCELERATE_ZERO3 = REPO_ROOT / "docs" / "configs" / "accelerate_deepspeed_zero3.yaml"


def parse_args(doc: str, name: str, cases: list[str], runs_help: str, timeout: float,
               add_arguments: Callable | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=cases, default=cases)
    parser.add_argument("--runs", type=int, default=3, help=runs_help)
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per launched case")
    parser.add_argument("--out", default=None, help=f"JSON path (default: benchmarks/results/{name}-<time>.json)")
    parser.add_argument("--strict", action="store_true", help="exit with status 2 when a goal is not met")
    parser.add_argument("--rank-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=cases, help=argparse.SUPPRESS)
    if add_arguments is not None:
        add_arguments(parser)
    return parser.parse_args()


def run(args: argparse.Namespace, rank_main: Callable, driver: Callable) -> int:
    """Launched ranks run `rank_main(args)` (their result goes back to the driver), the driver `driver(args)`."""
    if args.rank_side:
        from tests.fork_utils.worker import run_rank

        run_rank(lambda: rank_main(args))
        return 0
    return driver(args)


def launch_cases(script: Path, args: argparse.Namespace, options: Callable, rank_args: list[str]):
    """Each case of `args.cases` on its own launch (`options(case)`: launcher, nproc and env); every rank must report.
    Returns ({case: {rank: result}}, [failed cases])."""
    from tests.fork_utils.launcher import launch

    results, failures = {}, []
    for case in args.cases:
        launcher, nproc, env = options(case)
        print(f"== {case}: {launcher}, {nproc} process(es), timeout {args.timeout} s", flush=True)
        outcome = launch(
            script, ["--rank-side", "--case", case, *rank_args], nproc=nproc, launcher=launcher,
            timeout=args.timeout, env=env, accelerate_config=ACCELERATE_ZERO3 if launcher == "accelerate" else None,
        )
        if not outcome.ok or len(outcome.ranks) != nproc or any(o.result is None for o in outcome.ranks.values()):
            failures.append(case)
            print(outcome.report(), flush=True)
            continue
        print(f"   done in {outcome.elapsed:.0f} s", flush=True)
        results[case] = outcome.results()
    return results, failures


def finish(name: str, args: argparse.Namespace, payload: dict, goals: dict, failures: list, started: float) -> int:
    """Write the JSON results; 1 if a case failed, 2 with `--strict` if a goal was missed, else 0."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {**payload, "failed_cases": failures, "elapsed_s": time.monotonic() - started}
    out.write_text(json.dumps(payload, indent=1, default=float))
    print(f"\nresults: {out}  ({time.monotonic() - started:.0f} s)")
    if failures:
        return 1
    return 2 if args.strict and not all(goal["ok"] for goal in goals.values()) else 0


def start_rank(launcher: str):
    """Rank side: under `accelerate launch` an `Accelerator` registers the DeepSpeed ZeRO-3 config with transformers
    and starts the process group (keep what this returns alive: transformers holds the config weakly); under torchrun
    the process group alone. On CPU both are told to use gloo."""
    from tests.fork_utils.worker import init_process_group, start_accelerator

    if launcher == "accelerate":
        return start_accelerator()
    if launcher == "torchrun":
        init_process_group()
    return None
