#!/usr/bin/env python3
"""Upstream's own tests as a regression gate: the fork may fail no test that the pristine release passes.

The pinned sdist (upstream.toml) ships upstream's common test mixins (tests/test_modeling_common.py,
test_tensor_parallel_mixin.py, test_expert_parallel_mixin.py, test_fsdp_mixin.py, test_training_mixin.py,
test_configuration_common.py) but neither the model test modules that use them nor the helpers they import. This tool

1. extracts those mixins and the pristine package from the verified sdist into a scratch directory (never committed):
   `build/upstream-tests/pristine/` (src/transformers, tests/);
2. builds a suite in `build/upstream-tests/suite/`: the extracted mixins, the project's own stand-ins for the helpers
   they import (tests/upstream/harness/: a distributed harness, a causal-LM model tester, a ZeRO-3-on-CPU mixin, ...)
   and the project's model test modules for the MoE families (tests/upstream/models/);
3. runs the same pytest selection once per tree, each in a subprocess whose `import transformers` resolves to that
   tree (PYTHONPATH; the run records `transformers.__file__` and is refused if it is not the tree's): the pristine
   release, and the fork (a snapshot of this checkout's assembled `src/transformers`, taken at the start, so edits made
   while the run goes on do not mix two trees). Each run has a timeout; a killed run keeps the outcomes of the tests it
   finished (the suite's plugin writes one line per test as it ends), and the gate then exits 2 (it cannot vouch for
   the tests the run never reached), as it does when a run imported the wrong tree or ran nothing;
4. prints passed / failed / skipped per tree and the differences per test id. A test that passes on pristine and does
   not pass on the fork (fails, errors, is skipped, times out, or is missing) is a regression: exit status 1. Tests
   failing on both trees (e.g. torch's CPU grouped matmul rejecting a tiny shape) are not the fork's and do not count.

    python utils/upstream_tests.py                       # the default selection, both trees
    python utils/upstream_tests.py --families mixtral -k "test_save_load"
    python utils/upstream_tests.py --selection full      # every test of the mixins (long: see the README)

Only the standard library here; pytest runs in the subprocesses (with the interpreter running this script).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK = REPO_ROOT / "build" / "upstream-tests"
TREES = ("pristine", "fork")

# The upstream test modules the suite imports (from the sdist's tests/).
UPSTREAM_TEST_FILES = (
    "test_modeling_common.py",
    "test_configuration_common.py",
    "test_tensor_parallel_mixin.py",
    "test_expert_parallel_mixin.py",
    "test_fsdp_mixin.py",
    "test_training_mixin.py",
)

# The project's files, and where they go in the suite.
HARNESS_FILES = {
    "tests/upstream/harness/suite_conftest.py": "conftest.py",
    "tests/upstream/harness/gate_plugin.py": "gate_plugin.py",
    "tests/upstream/harness/distributed_testing_utils.py": "tests/distributed_testing_utils.py",
    "tests/upstream/harness/causal_lm_tester.py": "tests/causal_lm_tester.py",
    "tests/upstream/harness/zero3_cpu_mixin.py": "tests/zero3_cpu_mixin.py",
    "tests/upstream/harness/generation_test_utils.py": "tests/generation/test_utils.py",
    "tests/upstream/harness/export_test_utils.py": "tests/exporters/test_export.py",
    "tests/upstream/harness/configuration_test_utils.py": "tests/utils/test_configuration_utils.py",
}
FAMILIES = ("qwen3_moe", "mixtral", "olmoe", "gpt_oss")

# The default selection, a few minutes per tree on 2 CPU cores: every single-process test of the mixins (about 200 per
# family, 20-30 s in all) for every family, and the multi-process tests (15-50 s each here: each spawns its ranks)
# where they reach the fork's code: expert parallelism (load, forward, backward; EP with FSDP2), a TP load, a save of
# a distributed model, and ZeRO-3 on CPU ranks (shard-on-read with each family's conversion mapping, a sharded
# checkpoint; EP under ZeRO-3). fnmatch patterns on `<TestClass>::<test name>`: a test matching an `exclude` pattern
# and no `include` pattern is deselected. `--selection full` runs every test (about 14 min per family per tree here).
DEFAULT_SELECTION = {
    "exclude": [
        "*::test_ep_forward_*",
        "*::test_ep_backward_*",
        "*::test_tp_forward_*",
        "*::test_tp_backward",
        "*::test_tp_generation*",
        "*::test_fsdp2_*",
        "*::test_hsdp_*",
        "*::test_zero3_cpu_*",
        "*::test_*_with_deepspeed_cpu",
    ],
    "include": [
        "Qwen3MoeModelTest::test_ep_forward_0",
        "Qwen3MoeModelTest::test_ep_backward_0_eager",
        "Qwen3MoeModelTest::test_tp_forward_0",
        "Qwen3MoeModelTest::test_fsdp2_save_load",
        "Qwen3MoeModelTest::test_fsdp2_expert_parallel_bf16_grads_1_experts_not_sharded",
        "Qwen3MoeModelTest::test_zero3_cpu_expert_parallel_from_pretrained",
        "*::test_zero3_cpu_from_pretrained_1_sharded",
    ],
}
SELECTIONS = ("default", "full")

FAILING = ("failed", "error", "timeout", "crashed", "missing")
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "timeout", "crashed")


# --------------------------------------------------------------------------------------------------------------------
# Outcomes: from the plugin's event lines to one outcome per test id, counts, and the comparison of two trees


def outcomes_from_events(lines, timed_out: bool = False) -> tuple[dict[str, str], dict]:
    """One outcome per test id from the plugin's JSON lines, and the session record (which tree was imported).

    setup failed -> error; call failed -> failed; call passed -> passed; skipped anywhere -> skipped (xfailed for an
    expected failure, xpassed for an unexpected pass); a failing teardown turns a pass into an error; a test that
    started and never reported is `timeout` when the run was killed at its timeout, else `crashed`. A module that
    could not be collected is one `error` under `<collect>::<path>`.
    """
    outcomes: dict[str, str] = {}
    started: list[str] = []
    session: dict = {}
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        kind = event.get("event")
        if kind == "session":
            session = event
        elif kind == "start":
            started.append(event["nodeid"])
        elif kind == "collect_error":
            outcomes[f"<collect>::{event['nodeid']}"] = "error"
        elif kind == "report":
            nodeid, when, outcome = event["nodeid"], event["when"], event["outcome"]
            if outcome == "skipped":
                outcomes[nodeid] = "xfailed" if event.get("xfail") else "skipped"
            elif when == "setup":
                if outcome == "failed":
                    outcomes[nodeid] = "error"
            elif when == "call":
                if outcome == "passed":
                    outcomes[nodeid] = "xpassed" if event.get("xfail") else "passed"
                else:
                    outcomes[nodeid] = "failed"
            elif when == "teardown" and outcome == "failed":
                if outcomes.get(nodeid) in (None, "passed", "xpassed"):
                    outcomes[nodeid] = "error"
    for nodeid in started:
        outcomes.setdefault(nodeid, "timeout" if timed_out else "crashed")
    return outcomes, session


def count(outcomes: dict[str, str]) -> dict[str, int]:
    """passed / failed (failures, errors, timeouts, crashes) / skipped (skips, expected failures), and each kind."""
    kinds = Counter(outcomes.values())
    return {
        "total": len(outcomes),
        "passed": kinds["passed"] + kinds["xpassed"],
        "failed": sum(kinds[k] for k in FAILING),
        "skipped": kinds["skipped"] + kinds["xfailed"],
        **{f"n_{k}": kinds[k] for k in OUTCOMES if kinds[k]},
    }


def compare(pristine: dict[str, str], fork: dict[str, str]) -> dict[str, list]:
    """The differences per test id. `regressions`: passes on pristine, does not pass on the fork (including a test the
    fork's run never reached); `fixed`: passes on the fork only; `changed`: any other different outcome. Each entry is
    (test id, pristine outcome, fork outcome)."""
    def passes(outcome):
        return outcome in ("passed", "xpassed")

    regressions, fixed, changed = [], [], []
    for nodeid in sorted(set(pristine) | set(fork)):
        before, after = pristine.get(nodeid, "missing"), fork.get(nodeid, "missing")
        if before == after:
            continue
        entry = (nodeid, before, after)
        if passes(before) and not passes(after):
            regressions.append(entry)
        elif passes(after) and not passes(before):
            fixed.append(entry)
        elif not (passes(before) and passes(after)):
            changed.append(entry)
    return {"regressions": regressions, "fixed": fixed, "changed": changed}


def gate_status(diff: dict[str, list], runs: dict[str, dict]) -> int:
    """0: no regression; 1: regressions; 2: a run could not be trusted (wrong tree imported, nothing ran, timed out)."""
    for run in runs.values():
        if run.get("problem"):
            return 2
    return 1 if diff["regressions"] else 0


def format_report(runs: dict[str, dict], diff: dict[str, list]) -> str:
    lines = ["", "upstream tests, per tree (passed / failed / skipped):"]
    for tree, run in runs.items():
        c = run["counts"]
        kinds = ", ".join(f"{k[2:]} {v}" for k, v in c.items() if k.startswith("n_"))
        timed_out = ", TIMED OUT" if run.get("timed_out") else ""
        lines.append(
            f"  {tree:<9} {c['passed']:>4} passed / {c['failed']:>3} failed / {c['skipped']:>4} skipped"
            f"  ({c['total']} tests: {kinds}; {run.get('wall_s', 0):.0f} s{timed_out})"
        )
        if run.get("transformers_file"):
            lines.append(f"            transformers {run.get('transformers_version')} from {run['transformers_file']}")
        if run.get("problem"):
            lines.append(f"            PROBLEM: {run['problem']}")
    lines.append(f"regressions (pass on pristine, not on the fork): {len(diff['regressions'])}")
    lines += [f"  {nodeid}: {before} -> {after}" for nodeid, before, after in diff["regressions"]]
    if diff["fixed"]:
        lines.append(f"passing on the fork only: {len(diff['fixed'])}")
        lines += [f"  {nodeid}: {before} -> {after}" for nodeid, before, after in diff["fixed"]]
    if diff["changed"]:
        lines.append(f"other differences (neither passes on both): {len(diff['changed'])}")
        lines += [f"  {nodeid}: {before} -> {after}" for nodeid, before, after in diff["changed"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Preparing the trees and the suite


def _patchq():
    sys.path.insert(0, str(REPO_ROOT / "utils"))
    import patchq

    return patchq


def extract_pristine(work: Path) -> Path:
    """The pinned sdist (fetched and verified by patchq) unpacked into `work/pristine/`: src/transformers and the
    upstream test modules. Reused while the pin is the same."""
    patchq = _patchq()
    pin = patchq.Pin.load(REPO_ROOT)
    target = work / "pristine"
    stamp = target / ".extracted"
    wanted = f"{pin.package}-{pin.version} {pin.sha256}"
    if stamp.is_file() and stamp.read_text().strip() == wanted:
        return target
    tree = patchq.fetch(REPO_ROOT, pin)  # downloads and checks the sha256 when the cache lacks the tarball
    tarball = patchq.cache_dir(REPO_ROOT) / pin.sdist_name
    if not tarball.is_file():
        raise SystemExit(f"upstream_tests: {tarball} missing after fetch ({tree})")
    shutil.rmtree(target, ignore_errors=True)
    prefix = f"{pin.package}-{pin.version}/"
    tests = {f"{prefix}tests/{name}" for name in UPSTREAM_TEST_FILES}
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix + "src/transformers/") or m.name in tests]
        missing = tests - {m.name for m in members}
        if missing:
            raise SystemExit(f"upstream_tests: {pin.sdist_name} lacks {sorted(missing)}")
        for member in members:
            member.name = member.name[len(prefix):]
        tar.extractall(target, members=members, filter="data")
    stamp.write_text(wanted + "\n")
    return target


def snapshot_fork(work: Path, source: Path) -> Path:
    """A copy of the fork's assembled package (own modules included), so the run sees one consistent tree."""
    if not (source / "transformers" / "__init__.py").is_file():
        raise SystemExit(f"upstream_tests: no assembled package at {source}/transformers (run `make assemble`)")
    target = work / "fork"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(
        source / "transformers", target / "src" / "transformers", ignore=shutil.ignore_patterns("__pycache__")
    )
    return target


def build_suite(work: Path, pristine: Path, families: list[str]) -> tuple[Path, list[str]]:
    """The suite directory: upstream's mixins, the project's harness and model test modules. Returns it and the test
    files (relative to it) to run."""
    suite = work / "suite"
    shutil.rmtree(suite, ignore_errors=True)
    (suite / "tests").mkdir(parents=True)
    for name in UPSTREAM_TEST_FILES:
        shutil.copy2(pristine / "tests" / name, suite / "tests" / name)
    for source, dest in HARNESS_FILES.items():
        (suite / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / source, suite / dest)
    test_files = []
    for family in families:
        dest = Path("tests") / "models" / family / f"test_modeling_{family}.py"
        (suite / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / "tests" / "upstream" / "models" / f"{family}.py", suite / dest)
        test_files.append(dest.as_posix())
    for directory in [suite / "tests", *(p for p in (suite / "tests").rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    (suite / "pytest.ini").write_text(
        "[pytest]\n"
        "# The upstream-test gate's suite (utils/upstream_tests.py): rootdir, no cache, upstream's markers.\n"
        "addopts = -p no:cacheprovider -p gate_plugin -q -rN\n"
        "python_files = test_modeling_*.py\n"
        "filterwarnings =\n    ignore::DeprecationWarning\n    ignore::pytest.PytestUnknownMarkWarning\n"
    )
    return suite, test_files


def write_selection(suite: Path, selection: str) -> Path | None:
    """The selection file the suite's conftest reads (none for `full`)."""
    if selection == "full":
        return None
    path = suite / "selection.json"
    path.write_text(json.dumps(DEFAULT_SELECTION, indent=1) + "\n")
    return path


# --------------------------------------------------------------------------------------------------------------------
# Running


def run_tree(tree: str, root: Path, suite: Path, test_files: list[str], pytest_args: list[str], results: Path,
             timeout: float, python: str, selection_file: Path | None = None) -> dict:
    events = results / f"{tree}.events.jsonl"
    log = results / f"{tree}.log"
    events.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(root / "src"), str(suite)]),
        UPSTREAM_GATE_EVENTS=str(events),
        PYTHONDONTWRITEBYTECODE="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("UPSTREAM_GATE_SELECTION", None)
    if selection_file is not None:
        env["UPSTREAM_GATE_SELECTION"] = str(selection_file)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [python, "-m", "pytest", *test_files, *pytest_args]
    print(f"[{tree}] {' '.join(command)}  (timeout {timeout:.0f} s, log {log})", flush=True)
    start = time.monotonic()
    timed_out = False
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(command, cwd=suite, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGKILL)  # the run's own process group: pytest and the ranks it started
            returncode = process.wait()
    wall = time.monotonic() - start
    lines = events.read_text(encoding="utf-8").splitlines() if events.exists() else []
    outcomes, session = outcomes_from_events(lines, timed_out=timed_out)
    run = {
        "tree": tree,
        "root": str(root),
        "returncode": returncode,
        "timed_out": timed_out,
        "wall_s": round(wall, 1),
        "transformers_file": session.get("transformers_file"),
        "transformers_version": session.get("transformers_version"),
        "outcomes": outcomes,
        "counts": count(outcomes),
        "durations": _durations(lines),
    }
    expected = (root / "src" / "transformers").resolve()
    imported = Path(session["transformers_file"]).resolve().parent if session.get("transformers_file") else None
    if imported != expected:
        run["problem"] = f"`import transformers` gave {imported}, not {expected}"
    elif not outcomes:
        run["problem"] = f"no test ran (pytest exit status {returncode}; see {log})"
    elif timed_out:
        # The tests it never reached are compared with nothing: the gate cannot vouch for them.
        run["problem"] = f"killed at its timeout ({timeout:.0f} s) before every selected test ran; see {log}"
    print(f"[{tree}] done in {wall:.0f} s: {run['counts']}", flush=True)
    return run


def _durations(lines) -> dict[str, float]:
    total: dict[str, float] = {}
    for line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "report":
            total[event["nodeid"]] = round(total.get(event["nodeid"], 0.0) + event.get("duration", 0.0), 3)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--selection", default="default", choices=SELECTIONS,
                        help="default: what reaches the fork's code, a few minutes per tree; full: every test")
    parser.add_argument("-k", dest="keyword", default=None, help="a pytest -k expression, applied after the selection")
    parser.add_argument("--trees", nargs="+", default=list(TREES), choices=TREES)
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds per tree's run (default 1500)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"scratch directory (default {DEFAULT_WORK})")
    parser.add_argument("--fork-src", type=Path, default=REPO_ROOT / "src",
                        help="the directory holding the fork's assembled transformers package (default src/)")
    parser.add_argument("--pytest-arg", action="append", default=[], help="passed to pytest (repeatable)")
    args = parser.parse_args(argv)

    start = time.monotonic()
    work = args.work.resolve()
    results = work / "results"
    results.mkdir(parents=True, exist_ok=True)
    pristine = extract_pristine(work)
    roots = {"pristine": pristine}
    if "fork" in args.trees:
        roots["fork"] = snapshot_fork(work, args.fork_src.resolve())
    suite, test_files = build_suite(work, pristine, args.families)
    selection_file = write_selection(suite, args.selection)
    pytest_args = [*(["-k", args.keyword] if args.keyword else []), *args.pytest_arg]

    runs = {}
    for tree in args.trees:
        runs[tree] = run_tree(tree, roots[tree], suite, test_files, pytest_args, results, args.timeout, sys.executable,
                              selection_file)
    if len(runs) == 2:
        diff = compare(runs["pristine"]["outcomes"], runs["fork"]["outcomes"])
    else:
        diff = {"regressions": [], "fixed": [], "changed": []}
    status = gate_status(diff, runs)
    report = {
        "command": [sys.executable, *sys.argv],
        "families": args.families,
        "selection": args.selection,
        "selection_rules": DEFAULT_SELECTION if selection_file else None,
        "pytest_args": pytest_args,
        "wall_s": round(time.monotonic() - start, 1),
        "runs": runs,
        "diff": diff,
        "status": status,
    }
    (results / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    print(format_report(runs, diff))
    print(f"total {report['wall_s']:.0f} s; per-test outcomes and durations: {results / 'report.json'}")
    if status == 2:
        print("upstream_tests: a run could not be trusted (see PROBLEM above)", file=sys.stderr)
    elif status == 1:
        print("upstream_tests: the fork fails upstream tests that the pristine release passes", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
