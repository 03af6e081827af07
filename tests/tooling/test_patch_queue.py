"""The patch queue: the series applies to pristine, the review diff applies with git, the tool refuses bad input
(checksum, broken patch, unrefreshed edits) with a message naming the cause, and rebase reports per patch. The fork's
own modules are tracked files that assembly, check, refresh and rebase leave alone and the review diff shows."""

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unittest
from pathlib import Path
from unittest import mock

from parameterized import parameterized


REPO_ROOT = Path(__file__).resolve().parents[2]
PATCHQ = REPO_ROOT / "utils" / "patchq.py"
SHARED_CACHE = REPO_ROOT / ".cache" / "upstream"
# A real release other than the pin, whose `__version__` line differs from the pin's (the conflict test's target)
OTHER_RELEASE = ("5.24.0", "906cb8c3cb2123575e263962586a4d21a979ce97feeb95fe6aaf66fe6ae88bf3")
OWN_MODULE = "src/transformers/integrations/deepspeed_shard_on_read.py"  # a module of the fork's own, no patch

sys.path.insert(0, str(REPO_ROOT / "utils"))
import patchq  # noqa: E402

OWN_MODULES = set(patchq.own_modules(REPO_ROOT))
# The patch that touches only `src/transformers/__init__.py` (the fork's version label): where an edit there goes.
(VERSION_LABEL_PATCH,) = [name for name in patchq.read_series(REPO_ROOT) if name.endswith("-fork-version-label.patch")]


def run_patchq(root: Path, *args: str, cache: Path = SHARED_CACHE) -> subprocess.CompletedProcess:
    env = {**os.environ, "EPFORK_CACHE_DIR": str(cache)}
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
        pin = patchq.Pin.load(root)
        text = (root / "upstream.toml").read_text().replace(f'version = "{pin.version}"', 'version = "0.0.0.999"')
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
    def test_series_onto_the_pinned_release_reports_each_patch_applied(self, _name, dry_run):
        pin = patchq.Pin.load(self.root)
        args = ["rebase", pin.version, pin.sha256] + (["--dry-run"] if dry_run else [])
        proc = run_patchq(self.root, *args)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        for name in patchq.read_series(self.root):
            self.assertRegex(proc.stdout, rf"(?m)^{name}: applied$")
        self.assertEqual(patchq.Pin.load(self.root), pin)
        self.assertFalse((self.root / "build" / "rebase").exists())
        if not dry_run:
            self.assertEqual(run_patchq(self.root, "check").returncode, 0)

    def test_conflicting_patch_is_reported_with_the_upstream_hunk_and_pin_is_kept(self):
        # A change to the pinned release's `__version__` line: it must conflict on any other release. The series is cut
        # to the version label patch (whose context every release has) and this one.
        pin = patchq.Pin.load(self.root)
        init = patchq.fetch(REPO_ROOT) / "src" / "transformers" / "__init__.py"
        line = f'__version__ = "{pin.version}"'
        changed = _text_file(self.tmp, init.read_text().replace(line, line[:-1] + '.x"'))
        section = patchq.file_diff("src/transformers/__init__.py", init, changed)
        (self.root / "patches" / "0900-conflict.patch").write_text(
            f"Description: conflicts on {OTHER_RELEASE[0]} on purpose\nForwarded: not-needed\n---\n" + section
        )
        (self.root / "patches" / "series").write_text(f"{VERSION_LABEL_PATCH}\n0900-conflict.patch\n")
        before = (self.root / "upstream.toml").read_text()
        patches_before = {p.name: p.read_text() for p in (self.root / "patches").iterdir()}

        proc = run_patchq(self.root, "rebase", *OTHER_RELEASE)

        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertIn("0900-conflict.patch: CONFLICT", proc.stdout)
        self.assertIn("CONFLICT in src/transformers/__init__.py, lines", proc.stdout)
        met = rf'the upstream change it met \({re.escape(pin.version)} -> {re.escape(OTHER_RELEASE[0])}[^\n]*\n.*\n\s*-'
        self.assertRegex(proc.stdout, met + re.escape(line))
        self.assertIn(f"{VERSION_LABEL_PATCH}: applied", proc.stdout)
        self.assertIn(f"patches/ and the pin ({pin.version}) are untouched", proc.stderr)
        self.assertIn("make rebase CONTINUE=1", proc.stderr)
        self.assertEqual((self.root / "upstream.toml").read_text(), before)
        self.assertEqual({p.name: p.read_text() for p in (self.root / "patches").iterdir()}, patches_before)
        self.assertEqual(run_patchq(self.root, "rebase", "--abort").returncode, 0)
        self.assertFalse((self.root / "build" / "rebase").exists())
        self.assertEqual((self.root / "upstream.toml").read_text(), before)


# --------------------------------------------------------------------------------------------------------------------
# Synthetic releases: tiny fake sdists in a temporary cache, to show what the three-way rebase does in seconds

SYNTH_PATH = "src/transformers/modeling_utils.py"
SYNTH_OLD = """\"\"\"A tiny stand-in for upstream's modeling_utils.\"\"\"

import os


class PreTrainedModel:
    @classmethod
    def get_init_context(cls, dtype, is_quantized):
        contexts = [dtype]
        if is_quantized:
            contexts.append("quantized")
        return contexts

    @classmethod
    def from_pretrained(cls, name, dtype=None):
        is_quantized = False
        contexts = cls.get_init_context(dtype, is_quantized)
        model = cls()
        model.contexts = contexts
        return model


def save(model, path):
    # one
    # two
    # three
    with open(path, "w") as f:
        f.write(repr(model.contexts))
    # four
    # five
    # six
    return path
"""
# What the new releases do: lines inserted above every patch's hunks, a change next to a hunk's context, and (in the
# conflicting release) a `config` parameter on the lines a patch changes too.
SYNTH_MOVED = SYNTH_OLD.replace("import os\n", "import os\nimport sys\nimport json\n\nLOG = []\n").replace(
    "    # five\n", "    # five, said upstream\n"
)
SYNTH_CONFLICT = SYNTH_MOVED.replace(
    "def get_init_context(cls, dtype, is_quantized):", "def get_init_context(cls, dtype, is_quantized, config=None):"
).replace("cls.get_init_context(dtype, is_quantized)", "cls.get_init_context(dtype, is_quantized, config)")
SYNTH_OTHER = ("src/transformers/activations.py", "def gelu(x):\n    return x\n")
# The resolution of the conflict: upstream's parameter and the fork's.
SYNTH_RESOLVED_SIGNATURE = "def get_init_context(cls, dtype, is_quantized, config=None, distributed_config=None):"


def make_release(cache: Path, version: str, text: str) -> str:
    """Write transformers-<version>.tar.gz (the package: __init__.py, modeling_utils.py, activations.py) into the
    cache; return its sha256."""
    files = {
        "src/transformers/__init__.py": f'__version__ = "{version}"\n',
        SYNTH_PATH: text,
        SYNTH_OTHER[0]: SYNTH_OTHER[1],
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, content in files.items():
            data = content.encode()
            info = tarfile.TarInfo(f"transformers-{version}/{path}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"transformers-{version}.tar.gz").write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


class SyntheticRebaseTest(unittest.TestCase):
    """The three-way rebase on fake releases 0.1.0 (pinned), 0.2.0 (context moved) and 0.3.0 (a real conflict)."""

    PATCH_HEADER = "Description: {}\nForwarded: not-needed\n---\n"

    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="rebase-synthetic-"))
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.cache = self.tmp / "cache"
        self.releases = {v: make_release(self.cache, v, t) for v, t in
                         (("0.1.0", SYNTH_OLD), ("0.2.0", SYNTH_MOVED), ("0.3.0", SYNTH_CONFLICT))}
        environ = mock.patch.dict(os.environ, {"EPFORK_CACHE_DIR": str(self.cache)})
        environ.start()
        self.addCleanup(environ.stop)
        self.root = self.tmp / "repo"
        (self.root / "patches").mkdir(parents=True)
        patchq.Pin("transformers", "0.1.0", self.releases["0.1.0"]).save(self.root)
        # 0001 changes the signature and the call; 0002's context holds 0001's signature line; 0003 changes `save`,
        # whose context upstream changes next to it; 0004 patches a file upstream leaves alone.
        signed = SYNTH_OLD.replace("is_quantized):", "is_quantized, distributed_config=None):").replace(
            "(dtype, is_quantized)", "(dtype, is_quantized, distributed_config=None)")
        bodied = signed.replace("        contexts = [dtype]\n", "        contexts = [dtype]\n        LOG.append(dtype)\n")
        saved = bodied.replace("f.write(repr(model.contexts))", 'f.write(repr(model.contexts) + "\\n")')
        self.add_patch("0001-distributed-config.patch", SYNTH_PATH, SYNTH_OLD, signed)
        self.add_patch("0002-log-dtype.patch", SYNTH_PATH, signed, bodied)
        self.add_patch("0003-newline.patch", SYNTH_PATH, bodied, saved)
        self.add_patch("0004-gelu.patch", SYNTH_OTHER[0], SYNTH_OTHER[1], SYNTH_OTHER[1].replace("x\n", "x * 1\n"))
        patchq.assemble(self.root, quiet=True)

    def add_patch(self, name: str, path: str, before: str, after: str) -> None:
        section = patchq.file_diff(path, _text_file(self.tmp, before), _text_file(self.tmp, after))
        (self.root / "patches" / name).write_text(self.PATCH_HEADER.format(name) + section)
        with open(self.root / "patches" / "series", "a") as f:
            f.write(name + "\n")

    def snapshot(self) -> dict[str, bytes]:
        """upstream.toml, patches/ and src/transformers, byte for byte."""
        files = {"upstream.toml": (self.root / "upstream.toml").read_bytes()}
        for base in ("patches", "src"):
            for path in sorted((self.root / base).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    files[path.relative_to(self.root).as_posix()] = path.read_bytes()
        return files

    def rebase(self, version: str, *args: str) -> subprocess.CompletedProcess:
        return run_patchq(self.root, "rebase", version, self.releases[version], *args, cache=self.cache)

    def test_fetch_reads_a_cached_tarball_without_pip(self):
        with mock.patch.object(patchq, "_download_sdist", side_effect=AssertionError("no download expected")):
            tree = patchq.fetch(self.root, patchq.Pin("transformers", "0.2.0", self.releases["0.2.0"]))
        self.assertEqual((tree / SYNTH_PATH).read_text(), SYNTH_MOVED)

    @parameterized.expand([("dry_run", True), ("for_real", False)])
    def test_moved_context_merges_and_regenerated_patches_apply_exactly(self, _name, dry_run):
        before = self.snapshot()
        proc = self.rebase("0.2.0", *(["--dry-run"] if dry_run else []))
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        out = proc.stdout
        self.assertRegex(out, r"(?m)^0001-distributed-config.patch: applied with offset\n"
                              r"    hunk #1 of src/transformers/modeling_utils.py at line \d+ \(offset 4 lines\)")
        self.assertRegex(out, r"(?m)^0002-log-dtype.patch: applied with offset$")
        self.assertRegex(out, r"(?m)^0003-newline.patch: applied, merged three-way\n"
                              r"    src/transformers/modeling_utils.py: merged three-way")
        self.assertRegex(out, r"(?m)^0004-gelu.patch: applied$")
        self.assertFalse((self.root / "build" / "rebase").exists())
        if dry_run:
            self.assertEqual(self.snapshot(), before)
            return
        self.assertEqual(patchq.Pin.load(self.root).version, "0.2.0")
        self.assertEqual(patchq.check(self.root), [])
        self.assertIn("     # five, said upstream\n",
                      (self.root / "patches" / "0003-newline.patch").read_text())
        assembled = (self.root / SYNTH_PATH).read_text()
        self.assertIn("import json", assembled)
        self.assertIn('f.write(repr(model.contexts) + "\\n")', assembled)
        # Every regenerated patch applies with no offset or fuzz, its header kept.
        stage = self.tmp / "stage"
        for result in patchq.stage_series(patchq.fetch(self.root), patchq.load_series(self.root), stage):
            self.assertEqual(result.status, "applied", result.describe())
        self.assertTrue((self.root / "patches" / "0003-newline.patch").read_text().startswith(
            self.PATCH_HEADER.format("0003-newline.patch")))

    def test_conflict_is_reported_once_with_the_upstream_hunk(self):
        proc = self.rebase("0.3.0", "--dry-run")
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        out = proc.stdout
        self.assertEqual(out.count(": CONFLICT"), 1, out)
        self.assertRegex(out, r"(?m)^0001-distributed-config.patch: CONFLICT$")
        self.assertIn("CONFLICT in src/transformers/modeling_utils.py, lines", out)
        self.assertIn("the upstream change it met (0.1.0 -> 0.3.0, src/transformers/modeling_utils.py)", out)
        self.assertIn("+    def get_init_context(cls, dtype, is_quantized, config=None):", out)
        # 0002's context holds 0001's signature line: no cascade.
        self.assertRegex(out, r"(?m)^0002-log-dtype.patch: applied")
        self.assertRegex(out, r"(?m)^0003-newline.patch: applied")
        self.assertIn("1 conflict(s) onto 0.3.0", proc.stderr)

    def resolve(self) -> Path:
        """Resolve the conflict in the scratch repository as a person would: upstream's parameter and the fork's."""
        work = self.root / "build" / "rebase" / "repo" / SYNTH_PATH
        lines, kept, side = work.read_text().splitlines(True), [], None
        for line in lines:
            if line.startswith("<<<<<<<"):
                side, block = "in", []
            elif line.startswith(">>>>>>>"):
                side = None
                ours = block[0]  # upstream's version of the line (HEAD side)
                if "def get_init_context" in ours:
                    kept.append(f"    {SYNTH_RESOLVED_SIGNATURE}\n")
                else:
                    kept.append("        contexts = cls.get_init_context(dtype, is_quantized, config, distributed_config=None)\n")
            elif side:
                block.append(line)
            else:
                kept.append(line)
        work.write_text("".join(kept))
        return work

    def test_resolve_then_continue_moves_the_pin(self):
        before = self.snapshot()
        proc = self.rebase("0.3.0")
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertRegex(proc.stdout, r"(?m)^0001-distributed-config.patch: CONFLICT$")
        self.assertIn("build/rebase/repo/src/transformers/modeling_utils.py", proc.stderr)
        self.assertIn("make rebase CONTINUE=1", proc.stderr)
        self.assertEqual(self.snapshot(), before, "nothing changes before the last step")

        # Markers left: --continue refuses and names the file; a new rebase refuses too.
        proc = run_patchq(self.root, "rebase", "--continue", cache=self.cache)
        self.assertEqual(proc.returncode, 2)
        self.assertRegex(proc.stderr, r"build/rebase/repo/src/transformers/modeling_utils.py still has conflict markers")
        proc = self.rebase("0.2.0")
        self.assertIn("is in progress or was interrupted", proc.stderr)
        self.assertIn("make rebase ABORT=1", proc.stderr)

        self.resolve()
        proc = run_patchq(self.root, "rebase", "--continue", cache=self.cache)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertRegex(proc.stdout, r"(?m)^0001-distributed-config.patch: applied, merged three-way$")
        self.assertIn("its conflict was resolved by hand", proc.stdout)
        self.assertRegex(proc.stdout, r"(?m)^0002-log-dtype.patch: applied")
        self.assertIn("moved from 0.1.0 to 0.3.0", proc.stdout)
        self.assertEqual(patchq.Pin.load(self.root).version, "0.3.0")
        self.assertFalse((self.root / "build" / "rebase").exists())
        self.assertEqual(patchq.check(self.root), [])
        self.assertIn(f"+    {SYNTH_RESOLVED_SIGNATURE}\n",
                      (self.root / "patches" / "0001-distributed-config.patch").read_text())
        self.assertIn(SYNTH_RESOLVED_SIGNATURE, (self.root / SYNTH_PATH).read_text())

    def test_abort_leaves_everything_as_it_was(self):
        before = self.snapshot()
        self.assertEqual(self.rebase("0.3.0").returncode, 1)
        self.resolve()
        proc = run_patchq(self.root, "rebase", "--abort", cache=self.cache)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("the pin stays at 0.1.0", proc.stdout)
        self.assertEqual(self.snapshot(), before)
        self.assertFalse((self.root / "build" / "rebase").exists())
        self.assertEqual(run_patchq(self.root, "rebase", "--abort", cache=self.cache).returncode, 2)

    def test_interrupted_setup_leaves_nothing(self):
        before = self.snapshot()
        with mock.patch.object(patchq, "_commit_release", side_effect=KeyboardInterrupt):
            with self.assertRaises(KeyboardInterrupt):
                patchq.rebase(self.root, "0.2.0", self.releases["0.2.0"])
        self.assertEqual(self.snapshot(), before)
        self.assertFalse((self.root / "build" / "rebase").exists())

    def test_interrupted_last_step_is_undone_then_continue_finishes(self):
        before = self.snapshot()
        with mock.patch.object(patchq.Pin, "save", side_effect=KeyboardInterrupt):
            with self.assertRaises(KeyboardInterrupt):
                patchq.rebase(self.root, "0.2.0", self.releases["0.2.0"])
        self.assertEqual(self.snapshot(), before, "patches written before the interruption are put back")
        report = patchq.rebase_continue(self.root)
        self.assertTrue(report.finished)
        self.assertEqual(patchq.Pin.load(self.root).version, "0.2.0")
        self.assertEqual(patchq.check(self.root), [])

    @parameterized.expand([("abort", "--abort"), ("continue", "--continue")])
    def test_killed_in_the_last_step_recovers(self, _name, step):
        before = self.snapshot()
        # A process killed after writing the patches, before moving the pin.
        script = (
            "import os, signal, sys\n"
            f"sys.path.insert(0, {str(PATCHQ.parent)!r})\n"
            "import patchq\n"
            "patchq.Pin.save = lambda self, root: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"sys.exit(patchq.main(['--root', {str(self.root)!r}, 'rebase', '0.2.0', {self.releases['0.2.0']!r}]))\n"
        )
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, -9, proc.stderr)
        self.assertEqual(patchq.Pin.load(self.root).version, "0.1.0")
        self.assertNotEqual(self.snapshot(), before, "the kill came after the patches were written")
        self.assertIn("is in progress or was interrupted", self.rebase("0.2.0").stderr)

        proc = run_patchq(self.root, "rebase", step, cache=self.cache)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertFalse((self.root / "build" / "rebase").exists())
        if step == "--abort":
            self.assertEqual(self.snapshot(), before)
        else:
            self.assertEqual(patchq.Pin.load(self.root).version, "0.2.0")
            self.assertEqual(patchq.check(self.root), [])

    def test_check_after_a_pin_switch_says_assemble(self):
        old = self.tmp / "old-pin"
        shutil.copytree(self.root / "patches", old / "patches")
        shutil.copy2(self.root / "upstream.toml", old / "upstream.toml")
        self.assertEqual(self.rebase("0.2.0").returncode, 0)
        # A checkout of the old pin's files (as `git checkout` of another branch does), src/transformers left as it is.
        shutil.rmtree(self.root / "patches")
        shutil.copytree(old / "patches", self.root / "patches")
        shutil.copy2(old / "upstream.toml", self.root / "upstream.toml")
        self.assertEqual(patchq.check(self.root),
                         ["src/transformers was assembled from another pin or series: run `make assemble`"])
        # An edit on top of that is still an edit.
        (self.root / SYNTH_PATH).write_text((self.root / SYNTH_PATH).read_text() + "# edit\n")
        self.assertIn(f"{SYNTH_PATH}: edited in src/transformers but not in patches/ (run `make refresh`)",
                      patchq.check(self.root))


def _text_file(tmp: Path, text: str) -> Path:
    fd, name = tempfile.mkstemp(dir=tmp, suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return Path(name)
