"""conftest.py of the upstream-test gate's suite (utils/upstream_tests.py places it at the suite's root).

Settings every run of the suite needs, on either tree: no hub access (every test builds what it loads), DeepSpeed's
CPU accelerator on a machine without CUDA (ZeRO-3 on CPU ranks, `zero3_cpu_mixin.py`), and the selection: the JSON
file named by `UPSTREAM_GATE_SELECTION` ({"exclude": [...], "include": [...]}, fnmatch patterns on
`<TestClass>::<test name>`) deselects the tests that match an `exclude` pattern and no `include` pattern. Both trees
run with the same file.
"""

import fnmatch
import json
import os


SELECTION_ENV = "UPSTREAM_GATE_SELECTION"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if not _has_cuda():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def is_selected(key: str, exclude, include) -> bool:
    """`key` is `<TestClass>::<test name>`."""
    if not any(fnmatch.fnmatchcase(key, pattern) for pattern in exclude):
        return True
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in include)


def pytest_collection_modifyitems(config, items):
    path = os.environ.get(SELECTION_ENV)
    if not path:
        return
    with open(path, encoding="utf-8") as f:
        rules = json.load(f)
    exclude, include = rules.get("exclude", []), rules.get("include", [])
    kept, dropped = [], []
    for item in items:
        key = f"{item.cls.__name__}::{item.name}" if item.cls is not None else item.name
        (kept if is_selected(key, exclude, include) else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
