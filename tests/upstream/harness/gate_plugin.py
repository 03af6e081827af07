"""pytest plugin of the upstream-test gate (utils/upstream_tests.py loads it with `-p gate_plugin`).

It appends one JSON line per event to the file named by `UPSTREAM_GATE_EVENTS`, flushed at once, so a run that is
killed at its timeout still leaves every finished test's outcome (and the test that was running):
  {"event": "session", "transformers_file": ..., "transformers_version": ...}   which tree `import transformers` got
  {"event": "start", "nodeid": ...}
  {"event": "report", "nodeid": ..., "when": "setup" | "call" | "teardown", "outcome": ..., "duration": ...,
   "xfail": bool, "message": first line of the failure or skip reason}
  {"event": "collect_error", "nodeid": ..., "message": ...}
The driver turns these into one outcome per test id.
"""

from __future__ import annotations

import json
import os


EVENTS_ENV = "UPSTREAM_GATE_EVENTS"


def _write(record: dict) -> None:
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _message(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])[:500]
    text = getattr(report, "longreprtext", "") or ""
    lines = [line for line in text.splitlines() if line.startswith("E ")]
    return (lines[0] if lines else text.strip().splitlines()[-1] if text.strip() else "")[:500]


def pytest_sessionstart(session):
    import transformers

    _write(
        {
            "event": "session",
            "transformers_file": transformers.__file__,
            "transformers_version": transformers.__version__,
        }
    )


def pytest_runtest_logstart(nodeid, location):
    _write({"event": "start", "nodeid": nodeid})


def pytest_runtest_logreport(report):
    _write(
        {
            "event": "report",
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "duration": round(report.duration, 3),
            "xfail": hasattr(report, "wasxfail"),
            "message": _message(report) if not report.passed else "",
        }
    )


def pytest_collectreport(report):
    if report.failed:
        _write({"event": "collect_error", "nodeid": report.nodeid, "message": _message(report)})
