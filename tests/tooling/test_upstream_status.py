"""`make upstream-status`: the pins it compares, and the one line it ends with for each answer (registry and dry-run
rebase replaced by stand-ins: no network here)."""

import sys
import unittest
from pathlib import Path
from unittest import mock

from parameterized import parameterized


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "utils"))
import patchq  # noqa: E402
import upstream_status  # noqa: E402


class UpstreamStatusTest(unittest.TestCase):
    def setUp(self):
        self.pins = upstream_status.pinned_versions(REPO_ROOT)

    def test_pins_come_from_upstream_toml_and_the_constraints_file(self):
        self.assertEqual(self.pins["transformers"], patchq.Pin.load(REPO_ROOT).version)
        constraints = (REPO_ROOT / "requirements" / "constraints.txt").read_text()
        for package in ("torch", "deepspeed", "accelerate"):
            self.assertIn(f"{package}=={self.pins[package]}", constraints)

    def status_with(self, newest: dict[str, str], rebase: dict | None = None) -> dict:
        with mock.patch.object(upstream_status, "newest_release", side_effect=lambda p: newest.get(p, self.pins[p])), \
                mock.patch.object(upstream_status, "sdist_sha256", return_value="ab" * 32), \
                mock.patch.object(upstream_status, "dry_run_rebase", return_value=rebase) as dry_run:
            result = upstream_status.status(REPO_ROOT)
        self.assertEqual(dry_run.called, rebase is not None)
        return result

    def test_up_to_date(self):
        result = self.status_with({})
        self.assertFalse(any(entry["behind"] for entry in result["packages"].values()))
        self.assertEqual(upstream_status.verdict(result), f"up to date with transformers {self.pins['transformers']}")

    @parameterized.expand(
        [
            ("merges", {"merges": True, "conflicts": [], "report": [], "error": ""},
             "the series merges onto it: make rebase VERSION=99.0.0 SHA256=" + "ab" * 32),
            ("conflicts", {"merges": False, "conflicts": ["0001-a.patch"], "report": [], "error": ""},
             "the series conflicts in 0001-a.patch: make rebase VERSION=99.0.0"),
        ]
    )
    def test_newer_transformers_is_rebased_as_a_dry_run(self, _name, rebase, expected):
        result = self.status_with({"transformers": "99.0.0", "torch": "99.1.0"}, rebase)
        self.assertTrue(result["packages"]["transformers"]["behind"])
        self.assertTrue(result["packages"]["torch"]["behind"])
        self.assertFalse(result["packages"]["deepspeed"]["behind"])
        self.assertIn(expected, upstream_status.verdict(result))

    def test_version_order_is_numeric(self):
        self.assertGreater(upstream_status._version_key("5.100.0"), upstream_status._version_key("5.25.0"))
        self.assertGreater(upstream_status._version_key("2.14.1"), upstream_status._version_key("2.13.0"))
