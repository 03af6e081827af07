"""`make pr-series`: the patches proposed upstream (`Forwardable: yes`) and the own modules they use, exported as a
`git format-patch` series with a PR description. It must apply with `git am` to the pristine release, hold nothing of
the fork-only part, and give a tree that imports without it. `check` keeps the proposed patches first in the series."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from tests.tooling.test_patch_queue import ScratchRepoTestCase, run_patchq


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "utils"))
import patchq  # noqa: E402


AUTHOR = "Series Test <series-test@example.invalid>"
GIT_IDENTITY = ["-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false"]


class PrSeriesTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="pr-series-test-"))
        cls.out = cls.tmp / "pr-series"
        cls.proc = run_patchq(REPO_ROOT, "pr-series", "--out", str(cls.out), "--author", AUTHOR)
        cls.series = [patchq.PatchFile.read(REPO_ROOT / "patches" / n) for n in patchq.read_series(REPO_ROOT)]
        cls.proposed = [p for p in cls.series if patchq.is_forwardable(p)]
        cls.kept = [p for p in cls.series if not patchq.is_forwardable(p)]
        cls.modules = patchq.own_modules_used(REPO_ROOT, cls.proposed, patchq.own_modules(REPO_ROOT))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def exported(self) -> list[Path]:
        self.assertEqual(self.proc.returncode, 0, self.proc.stdout + self.proc.stderr)
        return sorted(self.out.glob("*.patch"))

    def test_series_is_the_proposed_part_in_format_patch_form(self):
        files = self.exported()
        self.assertTrue(self.proposed and self.kept, "the series has a proposed part and a fork-only part")
        self.assertIn("src/transformers/integrations/deepspeed_expert_parallel.py", self.modules)
        self.assertNotIn("src/transformers/integrations/deepspeed_expert_parallel_save.py", self.modules)
        self.assertEqual(len(files), len(self.modules) + len(self.proposed))
        for number, path in enumerate(files, 1):
            text = path.read_text()
            self.assertTrue(path.name.startswith(f"{number:04d}-"), path.name)
            self.assertTrue(text.startswith("From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"))
            self.assertIn(f"\nFrom: {AUTHOR}\n", text)
            self.assertRegex(text, rf"\nSubject: \[PATCH {number}/{len(files)}\] \S")
            self.assertIn("\ndiff --git a/src/transformers/", text)
        # Own modules first (new files), then each proposed patch, its DEP-3 description as the commit message.
        for path, module in zip(files, self.modules):
            self.assertIn(f"diff --git a/{module} b/{module}\nnew file mode 100644\n--- /dev/null\n", path.read_text())
        for path, patch in zip(files[len(self.modules) :], self.proposed):
            text = path.read_text()
            subject, body = patchq._description(patch)
            self.assertIn(f"] {subject}\n\n", text)
            self.assertIn(body.splitlines()[0], text)
            self.assertIn(f"Fork-Patch: patches/{patch.name}", text)
            for section in patch.sections.values():
                self.assertIn(section, text)
        everything = "".join(path.read_text() for path in files)
        for patch in self.kept:
            for section in patch.sections.values():
                self.assertNotIn(section, everything, f"{patch.name} is not proposed upstream")
        self.assertNotIn("deepspeed_expert_parallel_save", everything)
        self.assertNotIn('__version__ += "+ep', everything)

    def test_description_lists_commits_size_and_what_stays_in_the_fork(self):
        self.exported()
        text = (self.out / "PR.md").read_text()
        self.assertTrue(text.startswith("# "), "a title first")
        for patch in self.proposed:
            self.assertIn(f"**{patchq._description(patch)[0]}** (`patches/{patch.name}`)", text)
        for patch in self.kept:
            self.assertIn(f"- `{patch.name}`: {patchq._description(patch)[0]}", text)
        self.assertRegex(text, r"\d+ commits on transformers \d+\.\d+\.\d+: .* \+\d+ / -\d+ lines in upstream files")
        self.assertIn("git am build/pr-series/*.patch", text)

    def test_git_am_on_pristine_gives_a_tree_that_imports_without_the_fork_only_part(self):
        files = self.exported()
        tree = self.tmp / "upstream"
        shutil.copytree(patchq.fetch(REPO_ROOT) / "src", tree / "src")
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "pristine"]):
            subprocess.run(["git", *GIT_IDENTITY, *args], cwd=tree, check=True, capture_output=True)
        am = subprocess.run(["git", *GIT_IDENTITY, "am", *map(str, files)], cwd=tree, capture_output=True, text=True)
        self.assertEqual(am.returncode, 0, am.stdout + am.stderr)
        log = subprocess.run(["git", "log", "--format=%an <%ae>|%s"], cwd=tree, capture_output=True, text=True).stdout
        self.assertEqual(log.count(AUTHOR), len(files))

        # The applied tree: pristine + the proposed patches + the modules they use, and nothing else.
        expected = self.tmp / "expected"
        patchq.stage_series(patchq.fetch(REPO_ROOT), self.proposed, expected)
        for module in self.modules:
            shutil.copy2(REPO_ROOT / module, expected / module)
        self.assertEqual(patchq.changed_files(expected, tree), [])

        # It imports with none of the fork-only modules or patches (the interpreter running the tests has the deps).
        code = (
            "import transformers, transformers.modeling_utils, transformers.trainer;"
            "from transformers.integrations.deepspeed_expert_parallel import is_expert_parallel_under_zero3;"
            "print(transformers.__file__, transformers.__version__)"
        )
        env = {**os.environ, "PYTHONPATH": str(tree / "src")}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertTrue(proc.stdout.startswith(str(tree / "src" / "transformers")), proc.stdout)
        self.assertNotIn("+ep", proc.stdout, "the fork's version label is not proposed")


class ForwardableOrderTest(ScratchRepoTestCase):
    def test_check_keeps_the_proposed_patches_first(self):
        root = self.scratch_repo()
        names = patchq.read_series(root)
        proposed = [n for n in names if patchq.is_forwardable(patchq.PatchFile.read(root / "patches" / n))]
        fork_only = [n for n in names if n not in proposed]
        # A fork-only patch that touches no file of the proposed ones, moved to the front: it still applies.
        (mover,) = [n for n in fork_only if n.endswith("-fork-version-label.patch")]
        (root / "patches" / "series").write_text("\n".join([mover] + [n for n in names if n != mover]) + "\n")
        proc = run_patchq(root, "check")
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn(f"{proposed[0]} is proposed upstream (Forwardable: yes) but comes after {mover}", proc.stderr)

    def test_check_rejects_an_unknown_forwardable_value(self):
        root = self.scratch_repo()
        name = patchq.read_series(root)[0]
        path = root / "patches" / name
        path.write_text(re.sub(r"(?m)^Forwardable: yes$", "Forwardable: maybe", path.read_text(), count=1))
        proc = run_patchq(root, "check")
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn(f"{name}: 'Forwardable: maybe' must be `yes` or `no (why)`", proc.stderr)


if __name__ == "__main__":
    unittest.main()
