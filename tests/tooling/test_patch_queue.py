"""The patch queue: the series applies to pristine, the review diff applies with git, the tool refuses bad input
(checksum, broken patch, unrefreshed edits) with a message naming the cause, and rebase reports per patch. The fork's
own modules are tracked files that assembly, check, refresh and rebase leave alone and the review diff shows."""

import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from parameterized import parameterized


REPO_ROOT = Path(__file__).resolve().parents[2]
PATCHQ = REPO_ROOT / "utils" / "patchq.py"
SHARED_CACHE = REPO_ROOT / ".cache" / "upstream"
RELEASE_5_23 = ("5.23.0", "19d647a4d5d903a7c644ca5cde2d86efc3dde7d8c687ae7988806ff2205efa71")
OWN_MODULE = "src/transformers/integrations/deepspeed_shard_on_read.py"  # a module of the fork's own, no patch

sys.path.insert(0, str(REPO_ROOT / "utils"))
import patchq  # noqa: E402

OWN_MODULES = set(patchq.own_modules(REPO_ROOT))
# The patch that touches only `src/transformers/__init__.py` (the fork's version label): where an edit there goes.
(VERSION_LABEL_PATCH,) = [name for name in patchq.read_series(REPO_ROOT) if name.endswith("-fork-version-label.patch")]


def run_patchq(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EPFORK_CACHE_DIR": str(SHARED_CACHE)}
    return subprocess.run(
        [sys.executable, str(PATCHQ), "--root", str(root), *args], capture_output=True, text=True, env=env, timeout=300
    )


class ScratchRepoTestCase(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="patchq-test-"))
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

    def scratch_repo(self, git: bool = False) -> Path:
        """A copy of this repo's pin, patch series, .gitignore and own modules, to break on purpose.

        Without `git` patchq reads the own modules from .gitignore; with it, from git (everything added, nothing
        committed)."""
        root = self.tmp / "repo"
        root.mkdir()
        shutil.copy2(REPO_ROOT / "upstream.toml", root / "upstream.toml")
        shutil.copytree(REPO_ROOT / "patches", root / "patches")
        shutil.copy2(REPO_ROOT / ".gitignore", root / ".gitignore")
        for path in patchq.own_modules(REPO_ROOT):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / path, root / path)
        if git:
            subprocess.run(["git", "init", "-q"], cwd=root, check=True)
            subprocess.run(["git", "add", "-A"], cwd=root, check=True)
        return root

    def add_patch(self, root: Path, name: str, text: str) -> None:
        (root / "patches" / name).write_text(text, encoding="utf-8")
        with open(root / "patches" / "series", "a", encoding="utf-8") as f:
            f.write(name + "\n")

    def add_upstream_edit_patch(self, root: Path, name: str = "0999-extra.patch") -> None:
        """A patch no other patch overlaps (a comment at the end of activations.py): it changes the series, so the
        next `assemble` stages a fresh tree."""
        path = "src/transformers/activations.py"
        pristine = patchq.fetch(REPO_ROOT) / path
        changed = _text_file(self.tmp, pristine.read_text() + "\n# extra\n")
        header = "Description: extra\nForwarded: not-needed\n---\n"
        self.add_patch(root, name, header + patchq.file_diff(path, pristine, changed))


class PatchQueueTest(ScratchRepoTestCase):
    def test_series_applies_exactly_and_tree_matches(self):
        proc = run_patchq(REPO_ROOT, "check")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("OK", proc.stdout)

    def test_review_diff_applies_to_pristine_with_git(self):
        proc = run_patchq(REPO_ROOT, "diff")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        diff = proc.stdout
        for name in patchq.read_series(REPO_ROOT):
            for path in patchq.PatchFile.read(REPO_ROOT / "patches" / name).sections:
                self.assertIn(f"diff --git a/{path} b/{path}", diff)
        self.assertIn(OWN_MODULE, patchq.own_modules(REPO_ROOT))
        for path in patchq.own_modules(REPO_ROOT):
            self.assertIn(f"diff --git a/{path} b/{path}\nnew file mode 100644\n--- /dev/null\n", diff)
        pristine = self.tmp / "pristine"
        shutil.copytree(patchq.fetch(REPO_ROOT) / "src", pristine / "src")
        check = subprocess.run(["git", "apply", "--check", "-v", "-"], cwd=pristine, input=diff, capture_output=True, text=True)
        self.assertEqual(check.returncode, 0, check.stderr)

    def test_every_patch_has_a_header(self):
        for name in patchq.read_series(REPO_ROOT):
            fields = patchq.PatchFile.read(REPO_ROOT / "patches" / name).header_fields()
            self.assertTrue(fields.get("Description"), f"{name} lacks Description:")
            self.assertIn(fields.get("Forwarded", "").split(" ")[0].rstrip(","), ("no", "not-needed", "yes", "https:"))
            # Whether it is part of the series proposed upstream (`make pr-series`): said explicitly by each patch.
            self.assertIn(fields.get("Forwardable", "").split(" ")[0], ("yes", "no"), f"{name} lacks Forwardable:")

    def test_patches_stay_call_sites(self):
        """The fork's code lives in its own modules; patches add call sites and gates to upstream files (issue 17: at
        most 400 lines added in all), and upstream's `integrations/deepspeed.py` is left alone."""
        pristine = patchq.fetch(REPO_ROOT)
        added = {}
        for name in patchq.read_series(REPO_ROOT):
            patch = patchq.PatchFile.read(REPO_ROOT / "patches" / name)
            self.assertNotIn("src/transformers/integrations/deepspeed.py", patch.sections, name)
            added[name] = sum(
                1
                for path, section in patch.sections.items()
                if (pristine / path).is_file()
                for line in section.splitlines()
                if line.startswith("+") and not line.startswith("+++ ")
            )
        self.assertLessEqual(sum(added.values()), 400, added)

    def test_corrupted_checksum_stops_with_clear_message(self):
        root = self.scratch_repo()
        text = (root / "upstream.toml").read_text().replace(patchq.Pin.load(REPO_ROOT).sha256, "0" * 64)
        (root / "upstream.toml").write_text(text)
        proc = run_patchq(root, "assemble")
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("checksum mismatch", proc.stderr)
        self.assertIn("0" * 64, proc.stderr)
        self.assertFalse(patchq._package_files(root) - OWN_MODULES, "nothing assembled from an unverified release")

    def test_failed_fetch_stops_with_clear_message(self):
        root = self.scratch_repo()
        env = {**os.environ, "EPFORK_CACHE_DIR": str(self.tmp / "empty-cache")}
        text = (root / "upstream.toml").read_text().replace('version = "5.24.0"', 'version = "0.0.0.999"')
        (root / "upstream.toml").write_text(text)
        proc = subprocess.run(
            [sys.executable, str(PATCHQ), "--root", str(root), "fetch"], capture_output=True, text=True, env=env,
            timeout=300,
        )
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("could not fetch the pinned release transformers==0.0.0.999", proc.stderr)

    def test_broken_patch_names_the_patch_and_hunk(self):
        root = self.scratch_repo()
        self.add_patch(
            root,
            "0999-broken.patch",
            "Description: broken on purpose\nForwarded: not-needed\n---\n"
            "diff --git a/src/transformers/activations.py b/src/transformers/activations.py\n"
            "--- a/src/transformers/activations.py\n+++ b/src/transformers/activations.py\n"
            "@@ -1,3 +1,3 @@\n-this line is not in the file\n+replacement\n context that does not exist\n",
        )
        proc = run_patchq(root, "assemble")
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("0999-broken.patch", proc.stderr)
        self.assertIn("hunk #1 of src/transformers/activations.py", proc.stderr)
        self.assertFalse(patchq._package_files(root) - OWN_MODULES, "nothing may be assembled from a broken series")

    def test_unrefreshed_edit_is_detected_then_refreshed_into_its_patch(self):
        root = self.scratch_repo()
        self.assertEqual(run_patchq(root, "assemble").returncode, 0)
        init = root / "src" / "transformers" / "__init__.py"
        init.write_text(init.read_text() + "\n# an edit made while developing\n")

        proc = run_patchq(root, "check")
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("src/transformers/__init__.py: edited in src/transformers but not in patches/", proc.stderr)

        # A series change must not silently drop the edit either.
        self.add_upstream_edit_patch(root)
        proc = run_patchq(root, "assemble")
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("would be lost", proc.stderr)
        (root / "patches" / "0999-extra.patch").unlink()
        (root / "patches" / "series").write_text((REPO_ROOT / "patches" / "series").read_text())

        proc = run_patchq(root, "refresh")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(f"{VERSION_LABEL_PATCH}: refreshed src/transformers/__init__.py", proc.stdout)
        self.assertIn("+# an edit made while developing", (root / "patches" / VERSION_LABEL_PATCH).read_text())
        self.assertIn("Description:", (root / "patches" / VERSION_LABEL_PATCH).read_text())
        self.assertEqual(run_patchq(root, "check").returncode, 0)

    def test_edit_to_a_file_no_patch_touches_needs_a_patch_name(self):
        root = self.scratch_repo()
        self.assertEqual(run_patchq(root, "assemble").returncode, 0)
        target = root / "src" / "transformers" / "activations.py"
        target.write_text(target.read_text() + "\n# new concern\n")
        proc = run_patchq(root, "refresh")
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("no patch touches it yet", proc.stderr)
        proc = run_patchq(root, "refresh", "--new", "0999-new-concern")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("0999-new-concern.patch", (root / "patches" / "series").read_text())
        # A new patch starts with a header to fill in; check insists on it.
        proc = run_patchq(root, "check")
        self.assertIn("0999-new-concern.patch: header field 'Description:' is missing or TODO", proc.stderr)


class OwnModuleTest(ScratchRepoTestCase):
    """Own modules are tracked files at their place in src/transformers: never a patch, never touched by assembly."""

    def edit_own_module(self, root: Path) -> str:
        own = root / OWN_MODULE
        own.write_text(own.read_text() + "\n# an edit of the own module\n")
        return own.read_text()

    def test_repo_ignores_every_upstream_file_and_no_own_module(self):
        if subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=REPO_ROOT, capture_output=True).returncode:
            self.skipTest("not a git work tree")
        pristine_root = patchq.fetch(REPO_ROOT)
        upstream = sorted(patchq._package_files(pristine_root))
        proc = subprocess.run(
            ["git", "check-ignore", "--no-index", "--stdin"], cwd=REPO_ROOT, input="\n".join(upstream),
            capture_output=True, text=True,
        )
        self.assertEqual(sorted(proc.stdout.split()), upstream)
        for path in patchq.own_modules(REPO_ROOT):
            proc = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=REPO_ROOT)
            self.assertEqual(proc.returncode, 1, f"{path} is an own module but git ignores it")

    @parameterized.expand([("git", True), ("gitignore_only", False)])
    def test_assemble_keeps_own_module_and_its_edits(self, _name, git):
        root = self.scratch_repo(git=git)
        self.assertEqual(run_patchq(root, "assemble").returncode, 0)
        edited = self.edit_own_module(root)
        self.add_upstream_edit_patch(root)  # the series changed: assemble replaces src/transformers by a fresh tree
        for args in (["assemble"], ["assemble", "--force"]):
            proc = run_patchq(root, *args)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertEqual((root / OWN_MODULE).read_text(), edited)
        self.assertIn("# extra", (root / "src" / "transformers" / "activations.py").read_text())

    @parameterized.expand([("git", True), ("gitignore_only", False)])
    def test_check_does_not_report_own_module_as_unrefreshed(self, _name, git):
        root = self.scratch_repo(git=git)
        self.assertEqual(run_patchq(root, "assemble").returncode, 0)
        self.edit_own_module(root)
        proc = run_patchq(root, "check")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(f"own modules: {len(OWN_MODULES)}", proc.stdout)

    def test_patch_that_adds_a_file_is_reported_by_check(self):
        root = self.scratch_repo()
        section = patchq.file_diff("src/transformers/fork_helper.py", None, _text_file(self.tmp, "HELPER = 1\n"))
        self.add_patch(root, "0999-new-file.patch", "Description: a module\nForwarded: not-needed\n---\n" + section)
        proc = run_patchq(root, "check")
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn(
            "0999-new-file.patch: adds the new file src/transformers/fork_helper.py; no patch adds a new file; put it "
            "at its place under src/transformers as an own module",
            proc.stderr,
        )

    def test_review_diff_includes_own_module_and_applies_to_pristine(self):
        root = self.scratch_repo()
        self.assertEqual(run_patchq(root, "assemble").returncode, 0)
        self.edit_own_module(root)
        proc = run_patchq(root, "diff")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(f"diff --git a/{OWN_MODULE} b/{OWN_MODULE}\nnew file mode 100644\n--- /dev/null\n", proc.stdout)
        self.assertIn("+# an edit of the own module", proc.stdout)
        # Applied to pristine, the review diff gives back the whole tree: upstream files and own modules alike.
        pristine = self.tmp / "pristine"
        shutil.copytree(patchq.fetch(REPO_ROOT) / "src", pristine / "src")
        apply = subprocess.run(["git", "apply", "-"], cwd=pristine, input=proc.stdout, capture_output=True, text=True)
        self.assertEqual(apply.returncode, 0, apply.stderr)
        self.assertEqual(patchq.changed_files(pristine, root), [])
        self.assertEqual(run_patchq(root, "check").returncode, 0)

    def test_refresh_leaves_own_modules_alone(self):
        root = self.scratch_repo(git=True)
        self.assertEqual(run_patchq(root, "assemble").returncode, 0)
        edited = self.edit_own_module(root)
        init = root / "src" / "transformers" / "__init__.py"
        init.write_text(init.read_text() + "\n# an edit made while developing\n")
        patches_before = {p.name: p.read_text() for p in (root / "patches").iterdir()}

        proc = run_patchq(root, "refresh")

        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(proc.stdout.strip(), f"{VERSION_LABEL_PATCH}: refreshed src/transformers/__init__.py")
        patches_after = {p.name: p.read_text() for p in (root / "patches").iterdir()}
        self.assertEqual(patches_after.keys(), patches_before.keys())
        for name, text in patches_after.items():
            self.assertNotIn(OWN_MODULE, "".join(patchq.PatchFile.read(root / "patches" / name).sections))
            if name != VERSION_LABEL_PATCH:
                self.assertEqual(text, patches_before[name])
        self.assertEqual((root / OWN_MODULE).read_text(), edited)

        # A new file that is no own module (still git-ignored) has no patch to go to.
        (root / "src" / "transformers" / "fork_helper.py").write_text("HELPER = 1\n")
        proc = run_patchq(root, "refresh", "--new", "0999-helper")
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn(
            "src/transformers/fork_helper.py is a new file, and no patch adds a new file: make it an own module",
            proc.stderr,
        )
        self.assertEqual({p.name: p.read_text() for p in (root / "patches").iterdir()}, patches_after)

    @parameterized.expand([("git", True), ("gitignore_only", False)])
    def test_own_module_at_an_upstream_path_is_an_error(self, _name, git):
        root = self.scratch_repo()
        with open(root / ".gitignore", "a", encoding="utf-8") as f:
            f.write("!/src/transformers/activations.py\n")
        own = root / "src" / "transformers" / "activations.py"
        own.write_text("# the fork's own activations\n")
        if git:
            subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        message = (
            "src/transformers/activations.py is an own module of the fork, but the upstream release (or a patch) has "
            "a file at that path"
        )

        proc = run_patchq(root, "assemble")
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn(message, proc.stderr)
        self.assertEqual(own.read_text(), "# the fork's own activations\n")
        self.assertFalse((root / "src" / "transformers" / "__init__.py").exists(), "nothing may be assembled")
        proc = run_patchq(root, "check")
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn(message, proc.stderr)

    def test_rebase_keeps_own_modules_untouched(self):
        root = self.scratch_repo(git=True)
        self.assertEqual(run_patchq(root, "assemble").returncode, 0)
        edited = self.edit_own_module(root)
        pin = patchq.Pin.load(root)
        proc = run_patchq(root, "rebase", pin.version, pin.sha256)  # onto the pinned release itself
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertEqual((root / OWN_MODULE).read_text(), edited)
        self.assertEqual(run_patchq(root, "check").returncode, 0)

    def test_clone_with_only_own_modules_assembles_and_clean_keeps_them(self):
        # A fresh clone has src/transformers holding its own modules and nothing else (and no assembly stamp).
        root = self.scratch_repo(git=True)
        own = (root / OWN_MODULE).read_text()
        for _ in range(2):
            proc = run_patchq(root, "assemble")
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertTrue((root / "src" / "transformers" / "__init__.py").is_file())
            self.assertEqual(run_patchq(root, "check").returncode, 0)
            self.assertEqual(run_patchq(root, "clean").returncode, 0)
            self.assertEqual(patchq._package_files(root), OWN_MODULES)
            self.assertEqual((root / OWN_MODULE).read_text(), own)


class RebaseTest(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="rebase-test-"))
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.root = self.tmp / "repo"
        self.root.mkdir()
        shutil.copy2(REPO_ROOT / "upstream.toml", self.root / "upstream.toml")
        shutil.copytree(REPO_ROOT / "patches", self.root / "patches")

    @parameterized.expand([("dry_run", True), ("for_real", False)])
    def test_series_moves_to_5_23_and_reports_each_patch(self, _name, dry_run):
        args = ["rebase", *RELEASE_5_23] + (["--dry-run"] if dry_run else [])
        proc = run_patchq(self.root, *args)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        for name in patchq.read_series(self.root):
            self.assertRegex(proc.stdout, rf"(?m)^{name}: applied")
        pin = patchq.Pin.load(self.root)
        if dry_run:
            self.assertEqual(pin.version, "5.24.0")
        else:
            self.assertEqual((pin.version, pin.sha256), RELEASE_5_23)
            self.assertEqual(run_patchq(self.root, "check").returncode, 0)

    def test_conflicting_patch_is_reported_with_its_hunk_and_pin_is_kept(self):
        # A change to a line that only 5.24.0 has: it must conflict on 5.23.0.
        init = patchq.fetch(REPO_ROOT) / "src" / "transformers" / "__init__.py"
        changed = _text_file(self.tmp, init.read_text().replace('__version__ = "5.24.0"', '__version__ = "5.24.0.x"'))
        section = patchq.file_diff("src/transformers/__init__.py", init, changed)
        (self.root / "patches" / "0900-conflict.patch").write_text(
            "Description: conflicts on 5.23.0 on purpose\nForwarded: not-needed\n---\n" + section
        )
        with open(self.root / "patches" / "series", "a") as f:
            f.write("0900-conflict.patch\n")
        before = (self.root / "upstream.toml").read_text()
        patches_before = {p.name: p.read_text() for p in (self.root / "patches").iterdir()}

        proc = run_patchq(self.root, "rebase", *RELEASE_5_23)

        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("0900-conflict.patch: CONFLICT", proc.stdout)
        self.assertRegex(proc.stdout, r"hunk #1 of src/transformers/__init__.py does not apply \(at line \d+\)")
        self.assertIn(f"{VERSION_LABEL_PATCH}: applied", proc.stdout)
        self.assertIn("the pin stays at 5.24.0", proc.stderr)
        self.assertEqual((self.root / "upstream.toml").read_text(), before)
        self.assertEqual({p.name: p.read_text() for p in (self.root / "patches").iterdir()}, patches_before)


def _text_file(tmp: Path, text: str) -> Path:
    fd, name = tempfile.mkstemp(dir=tmp, suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return Path(name)
