"""The upstream-test gate's driver (utils/upstream_tests.py) on synthetic results: event lines to one outcome per test
id, the counts, the per-test-id comparison of pristine and fork that decides the exit status, and the scratch layout
it builds (the sdist's members it extracts, the suite's files). No upstream test runs here (`make test-upstream`)."""

import importlib.util
import io
import json
import sys
import tarfile
import tempfile
import unittest
from pathlib import Path
from types import SimpleNamespace
from unittest import mock


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "utils"))
import upstream_tests as gate  # noqa: E402


def report(nodeid, when, outcome, xfail=False):
    return json.dumps({"event": "report", "nodeid": nodeid, "when": when, "outcome": outcome, "xfail": xfail})


def start(nodeid):
    return json.dumps({"event": "start", "nodeid": nodeid})


def passed(nodeid):
    return [start(nodeid), report(nodeid, "setup", "passed"), report(nodeid, "call", "passed"),
            report(nodeid, "teardown", "passed")]


class OutcomesFromEventsTest(unittest.TestCase):
    def test_one_outcome_per_test_id(self):
        lines = [
            json.dumps({"event": "session", "transformers_file": "/x/src/transformers/__init__.py"}),
            *passed("t::ok"),
            start("t::fails"), report("t::fails", "setup", "passed"), report("t::fails", "call", "failed"),
            report("t::fails", "teardown", "passed"),
            start("t::setup_error"), report("t::setup_error", "setup", "failed"),
            report("t::setup_error", "teardown", "passed"),
            start("t::skip"), report("t::skip", "setup", "skipped"), report("t::skip", "teardown", "passed"),
            start("t::skip_in_call"), report("t::skip_in_call", "setup", "passed"),
            report("t::skip_in_call", "call", "skipped"),
            start("t::xfail"), report("t::xfail", "setup", "passed"),
            report("t::xfail", "call", "skipped", xfail=True),
            start("t::xpass"), report("t::xpass", "setup", "passed"), report("t::xpass", "call", "passed", xfail=True),
            start("t::teardown"), report("t::teardown", "setup", "passed"), report("t::teardown", "call", "passed"),
            report("t::teardown", "teardown", "failed"),
            json.dumps({"event": "collect_error", "nodeid": "tests/models/x/test_modeling_x.py"}),
            '{"event": "report", "nodeid": "t::cut',  # a line cut short when the run was killed
            "",
        ]
        outcomes, session = gate.outcomes_from_events(lines)
        self.assertEqual(session["transformers_file"], "/x/src/transformers/__init__.py")
        self.assertEqual(
            outcomes,
            {
                "t::ok": "passed",
                "t::fails": "failed",
                "t::setup_error": "error",
                "t::skip": "skipped",
                "t::skip_in_call": "skipped",
                "t::xfail": "xfailed",
                "t::xpass": "xpassed",
                "t::teardown": "error",
                "<collect>::tests/models/x/test_modeling_x.py": "error",
            },
        )

    def test_a_test_that_never_reported_timed_out_or_crashed(self):
        lines = [*passed("t::a"), start("t::hung")]
        self.assertEqual(gate.outcomes_from_events(lines, timed_out=True)[0], {"t::a": "passed", "t::hung": "timeout"})
        self.assertEqual(gate.outcomes_from_events(lines, timed_out=False)[0]["t::hung"], "crashed")

    def test_counts(self):
        outcomes = {"a": "passed", "b": "xpassed", "c": "failed", "d": "error", "e": "timeout", "f": "skipped",
                    "g": "xfailed", "h": "crashed"}
        counts = gate.count(outcomes)
        self.assertEqual((counts["total"], counts["passed"], counts["failed"], counts["skipped"]), (8, 2, 4, 2))
        self.assertEqual(counts["n_error"], 1)
        self.assertNotIn("n_missing", counts)


class CompareTest(unittest.TestCase):
    def test_regressions_are_passes_on_pristine_only(self):
        pristine = {
            "same_pass": "passed", "same_fail": "failed", "both_skip": "skipped",
            "now_fails": "passed", "now_errors": "passed", "now_skipped": "passed", "now_times_out": "passed",
            "not_run_on_fork": "passed", "fixed": "failed", "new_on_fork_fails": None,
            "fail_to_error": "failed", "skip_to_fail": "skipped", "xpass_to_pass": "xpassed",
        }
        pristine = {k: v for k, v in pristine.items() if v is not None}
        fork = {
            "same_pass": "passed", "same_fail": "failed", "both_skip": "skipped",
            "now_fails": "failed", "now_errors": "error", "now_skipped": "skipped", "now_times_out": "timeout",
            "fixed": "passed", "new_on_fork_fails": "failed", "fail_to_error": "error", "skip_to_fail": "failed",
            "xpass_to_pass": "passed",
        }
        diff = gate.compare(pristine, fork)
        self.assertEqual(
            diff["regressions"],
            [
                ("not_run_on_fork", "passed", "missing"),
                ("now_errors", "passed", "error"),
                ("now_fails", "passed", "failed"),
                ("now_skipped", "passed", "skipped"),
                ("now_times_out", "passed", "timeout"),
            ],
        )
        self.assertEqual(diff["fixed"], [("fixed", "failed", "passed")])
        self.assertEqual(
            diff["changed"],
            [
                ("fail_to_error", "failed", "error"),
                ("new_on_fork_fails", "missing", "failed"),
                ("skip_to_fail", "skipped", "failed"),
            ],
        )

    def test_failures_on_both_trees_are_no_difference(self):
        outcomes = {"grouped_mm_tiny_shape": "failed", "ok": "passed"}
        self.assertEqual(gate.compare(outcomes, dict(outcomes)), {"regressions": [], "fixed": [], "changed": []})

    def test_status(self):
        clean = {"regressions": [], "fixed": [("x", "failed", "passed")], "changed": []}
        regressed = {"regressions": [("x", "passed", "failed")], "fixed": [], "changed": []}
        runs = {"pristine": {}, "fork": {}}
        self.assertEqual(gate.gate_status(clean, runs), 0)
        self.assertEqual(gate.gate_status(regressed, runs), 1)
        self.assertEqual(gate.gate_status(clean, {"pristine": {}, "fork": {"problem": "wrong tree"}}), 2)

    def test_report_lists_every_regression(self):
        runs = {
            tree: {"counts": gate.count({"a": "passed", "b": "failed"}), "wall_s": 1.0} for tree in gate.TREES
        }
        diff = {"regressions": [("t::b", "passed", "failed")], "fixed": [], "changed": []}
        text = gate.format_report(runs, diff)
        self.assertIn("regressions (pass on pristine, not on the fork): 1", text)
        self.assertIn("t::b: passed -> failed", text)
        self.assertIn("1 passed /   1 failed /    0 skipped", text)


class SelectionTest(unittest.TestCase):
    def conftest(self):
        spec = importlib.util.spec_from_file_location(
            "upstream_gate_suite_conftest", REPO_ROOT / "tests" / "upstream" / "harness" / "suite_conftest.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def test_default_selection(self):
        is_selected = self.conftest().is_selected
        rules = gate.DEFAULT_SELECTION
        selected = {
            "Qwen3MoeModelTest::test_save_load": True,  # single-process: always
            "MixtralModelTest::test_tp_plan_matches_params": True,
            "Qwen3MoeModelTest::test_ep_forward_0": True,
            "Qwen3MoeModelTest::test_ep_forward_1": False,
            "OlmoeModelTest::test_ep_forward_0": False,
            "Qwen3MoeModelTest::test_fsdp2_save_load": True,
            "Qwen3MoeModelTest::test_fsdp2_save_load_dcp": False,  # an exact name, not a prefix
            "Qwen3MoeModelTest::test_fsdp_plan_declared": True,
            "GptOssModelTest::test_zero3_cpu_from_pretrained_1_sharded": True,
            "GptOssModelTest::test_zero3_cpu_from_pretrained_0_one_file": False,
            "MixtralModelTest::test_resize_tokens_embeddings_with_deepspeed_cpu": False,
            "MixtralModelTest::test_resize_tokens_embeddings": True,
        }
        for key, expected in selected.items():
            self.assertEqual(is_selected(key, rules["exclude"], rules["include"]), expected, key)

    def test_selection_file(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = gate.write_selection(Path(tmp), "default")
            self.assertEqual(json.loads(path.read_text()), gate.DEFAULT_SELECTION)
            self.assertIsNone(gate.write_selection(Path(tmp), "full"))


class ScratchLayoutTest(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="upstream-gate-test-"))
        self.addCleanup(__import__("shutil").rmtree, self.tmp, ignore_errors=True)

    def fake_sdist(self, with_tests=gate.UPSTREAM_TEST_FILES) -> Path:
        tarball = self.tmp / "cache" / "pkg-1.0.tar.gz"
        tarball.parent.mkdir()
        members = {"pkg-1.0/src/transformers/__init__.py": "__version__ = '1.0'\n", "pkg-1.0/setup.py": "",
                   "pkg-1.0/tests/test_other_common.py": ""}
        members.update({f"pkg-1.0/tests/{name}": f"# {name}\n" for name in with_tests})
        with tarfile.open(tarball, "w:gz") as tar:
            for name, text in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(text.encode())
                tar.addfile(info, io.BytesIO(text.encode()))
        return tarball

    def fake_patchq(self, tarball):
        pin = SimpleNamespace(package="pkg", version="1.0", sha256="ab" * 32, sdist_name=tarball.name)
        return SimpleNamespace(
            Pin=SimpleNamespace(load=lambda root: pin), fetch=lambda root, pin: tarball.parent,
            cache_dir=lambda root: tarball.parent,
        )

    def test_extracts_the_package_and_only_the_needed_test_modules(self):
        tarball = self.fake_sdist()
        with mock.patch.object(gate, "_patchq", return_value=self.fake_patchq(tarball)):
            pristine = gate.extract_pristine(self.tmp / "work")
            self.assertTrue((pristine / "src" / "transformers" / "__init__.py").is_file())
            self.assertEqual(sorted(p.name for p in (pristine / "tests").iterdir()),
                             sorted(gate.UPSTREAM_TEST_FILES))
            self.assertFalse((pristine / "setup.py").exists())
            # Reused while the pin is the same
            (pristine / "tests" / "marker").write_text("")
            gate.extract_pristine(self.tmp / "work")
            self.assertTrue((pristine / "tests" / "marker").exists())

    def test_an_sdist_without_the_mixins_is_refused(self):
        tarball = self.fake_sdist(with_tests=gate.UPSTREAM_TEST_FILES[1:])
        with mock.patch.object(gate, "_patchq", return_value=self.fake_patchq(tarball)):
            with self.assertRaisesRegex(SystemExit, gate.UPSTREAM_TEST_FILES[0]):
                gate.extract_pristine(self.tmp / "work")

    def test_suite_layout(self):
        pristine = self.tmp / "pristine"
        (pristine / "tests").mkdir(parents=True)
        for name in gate.UPSTREAM_TEST_FILES:
            (pristine / "tests" / name).write_text("")
        suite, test_files = gate.build_suite(self.tmp / "work", pristine, ["qwen3_moe", "gpt_oss"])
        self.assertEqual(test_files, ["tests/models/qwen3_moe/test_modeling_qwen3_moe.py",
                                      "tests/models/gpt_oss/test_modeling_gpt_oss.py"])
        for path in [*test_files, *gate.HARNESS_FILES.values(), "pytest.ini",
                     *(f"tests/{name}" for name in gate.UPSTREAM_TEST_FILES)]:
            self.assertTrue((suite / path).is_file(), path)
        for package in ("tests", "tests/models", "tests/models/qwen3_moe", "tests/generation", "tests/utils"):
            self.assertTrue((suite / package / "__init__.py").is_file(), package)
        self.assertIn("-p gate_plugin", (suite / "pytest.ini").read_text())

    def test_every_family_has_a_model_test_module(self):
        for family in gate.FAMILIES:
            self.assertTrue((REPO_ROOT / "tests" / "upstream" / "models" / f"{family}.py").is_file(), family)
        for source in gate.HARNESS_FILES:
            self.assertTrue((REPO_ROOT / source).is_file(), source)
