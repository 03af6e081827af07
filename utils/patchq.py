#!/usr/bin/env python3
"""Patch-queue tool of the fork: the pristine release plus `patches/series` makes `src/transformers`.

The fork commits no upstream code. `upstream.toml` pins a release of `transformers` by version and sdist sha256; the
sdist is fetched by package name with pip, verified and cached outside git. `src/transformers` (git-ignored) is that
release's `src/transformers` with the patches of `patches/series` applied in order. You edit `src/transformers`, then
`refresh` writes your edits back into the patches.

The fork's own modules (files upstream does not have) are not patches: they are ordinary tracked files at their place
under `src/transformers`, each un-ignored by a `!/src/transformers/...` line of `.gitignore`. The assembly carries them
over untouched, `check` and `refresh` leave them out, and `diff` shows them as new files.

Commands (the Makefile wraps each one):
    fetch     download, verify and unpack the pinned release into the cache
    assemble  (re)build src/transformers from the pristine release and the series; refuses to drop unrefreshed edits
    check     the series applies exactly to pristine, every patch has its header, no patch adds a file,
              src/transformers has no edit that is not in a patch, and the review diff applies with `git apply --check`
    diff      print the review diff of src/transformers against pristine (paths relative to the upstream repo root)
    refresh   write the edits made in src/transformers back into the patches (one patch per concern)
    rebase    move the series onto another release with a three-way git rebase in build/rebase/, reporting per patch:
              applied, applied with offset, applied (merged three-way), or CONFLICT (once, with the upstream hunk it
              met); a conflict stops it for a hand resolution: `rebase --continue`, or `rebase --abort`
    pr-series export the patches proposed upstream (`Forwardable: yes`) and the own modules they use as a
              `git format-patch` series with a PR description, checked with `git am` on the pristine release
    clean     remove the assembled files of src/transformers (the own modules stay)

Only the standard library is used: this runs inside `pip install -e .` before anything else is installed.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = Path("src") / "transformers"  # relative to the repo root, and to the upstream sdist root alike
DIFF_HEADER = "diff --git "
REQUIRED_HEADER_FIELDS = ("Description", "Forwarded")
# Not a DEP-3 field (DEP-3 `Forwarded:` says where a patch *was* sent): whether the patch belongs to the series this
# fork proposes upstream, `yes`, or `no (why)`. Absent means no. The proposed patches come first in the series.
FORWARDABLE_FIELD = "Forwardable"
PR_SERIES_DIR = Path("build") / "pr-series"
PR_DESCRIPTION = Path("patches") / "pr-description.md"  # title (first line) and summary of the proposed series


class PatchQueueError(Exception):
    """A failure the user must act on; the message says what to do."""


# --------------------------------------------------------------------------------------------------------------------
# The pin and the cache of pristine releases


@dataclass
class Pin:
    package: str
    version: str
    sha256: str

    @classmethod
    def load(cls, root: Path) -> Pin:
        path = root / "upstream.toml"
        with open(path, "rb") as f:
            data = tomllib.load(f)
        try:
            return cls(package=data["package"], version=data["version"], sha256=data["sha256"].lower())
        except KeyError as e:
            raise PatchQueueError(f"{path} lacks the key {e}") from None

    def save(self, root: Path) -> None:
        text = (
            "# The pristine upstream release this fork is assembled from (fetched with pip by name, checked by sha256).\n"
            "# Move it with `make rebase VERSION=... SHA256=...`, never by hand.\n"
            f'package = "{self.package}"\n'
            f'version = "{self.version}"\n'
            f'sha256 = "{self.sha256}"\n'
        )
        _atomic_write(root / "upstream.toml", text)

    @property
    def sdist_name(self) -> str:
        return f"{self.package}-{self.version}.tar.gz"


def cache_dir(root: Path) -> Path:
    return Path(os.environ.get("EPFORK_CACHE_DIR", root / ".cache" / "upstream")).resolve()


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_sdist(pin: Pin, dest: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet", "-d", tmp]
        cmd.append(f"{pin.package}=={pin.version}")
        print(f"patchq: fetching {pin.package}=={pin.version} (sdist) with pip", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise PatchQueueError(
                f"could not fetch the pinned release {pin.package}=={pin.version} with pip "
                f"(exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}"
            )
        fetched = Path(tmp) / pin.sdist_name
        if not fetched.is_file():
            raise PatchQueueError(f"pip did not produce {pin.sdist_name}; it wrote {sorted(os.listdir(tmp))}")
        actual = _sha256_of(fetched)
        if actual != pin.sha256:
            raise PatchQueueError(
                f"checksum mismatch for {pin.sdist_name}: upstream.toml pins sha256 {pin.sha256}, the fetched file has "
                f"{actual}. Nothing was assembled. Fix the pin (or use `make rebase`) if the release really changed."
            )
        target = dest / pin.sdist_name
        os.replace(fetched, target)
        return target


def fetch(root: Path, pin: Pin | None = None) -> Path:
    """Return the root of the unpacked, verified pristine release (it holds `src/transformers`)."""
    pin = pin or Pin.load(root)
    cache = cache_dir(root)
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / pin.sdist_name
    if tarball.is_file():
        actual = _sha256_of(tarball)
        if actual != pin.sha256:
            raise PatchQueueError(
                f"checksum mismatch for the cached {tarball}: upstream.toml pins sha256 {pin.sha256}, the file has "
                f"{actual}. Delete the file to fetch it again, or fix the pin."
            )
    else:
        tarball = _download_sdist(pin, cache)

    tree = cache / f"{pin.package}-{pin.version}-{pin.sha256[:12]}"
    if not (tree / PACKAGE_DIR).is_dir():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            with tarfile.open(tarball) as tar:
                tar.extractall(tmp, filter="data")
            unpacked = Path(tmp) / f"{pin.package}-{pin.version}"
            if not (unpacked / PACKAGE_DIR).is_dir():
                raise PatchQueueError(f"{pin.sdist_name} has no {PACKAGE_DIR}")
            shutil.rmtree(tree, ignore_errors=True)
            os.replace(unpacked, tree)
    return tree


# --------------------------------------------------------------------------------------------------------------------
# Patches: a DEP-3 style header, then one git-style section per file


@dataclass
class PatchFile:
    name: str
    header: str
    sections: dict[str, str] = field(default_factory=dict)  # path relative to the upstream root -> its diff text

    @classmethod
    def read(cls, path: Path) -> PatchFile:
        text = path.read_text(encoding="utf-8")
        parts = re.split(r"(?m)^(?=diff --git )", text)
        header, sections = parts[0], {}
        for section in parts[1:]:
            match = re.match(r"diff --git a/(\S+) b/(\S+)", section)
            if not match:
                raise PatchQueueError(f"{path.name}: cannot read the section starting {section[:80]!r}")
            sections[match.group(2)] = section
        return cls(name=path.name, header=header, sections=sections)

    def text(self) -> str:
        header = self.header if self.header.endswith("\n") or not self.header else self.header + "\n"
        return header + "".join(self.sections[p] for p in self.sections)

    def header_fields(self) -> dict[str, str]:
        fields = {}
        for line in self.header.splitlines():
            match = re.match(r"([A-Z][A-Za-z-]*):\s*(.*)", line)
            if match:
                fields[match.group(1)] = match.group(2).strip()
        return fields


def read_series(root: Path) -> list[str]:
    series = root / "patches" / "series"
    if not series.is_file():
        return []
    names = []
    for line in series.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def load_series(root: Path) -> list[PatchFile]:
    patches = []
    for name in read_series(root):
        path = root / "patches" / name
        if not path.is_file():
            raise PatchQueueError(f"patches/series names {name}, which does not exist")
        patches.append(PatchFile.read(path))
    return patches


@dataclass
class ApplyResult:
    patch: str
    status: str  # "applied", "offset", "fuzz", "conflict"; a rebase also says "merged" (three-way) and "dropped"
    notes: list[str]
    regenerated: PatchFile | None = field(default=None, repr=False)  # a rebase's patch as its rebased commit's diff

    def describe(self) -> str:
        label = {
            "applied": "applied",
            "offset": "applied with offset",
            "fuzz": "applied with fuzz",
            "merged": "applied, merged three-way",
            "conflict": "CONFLICT",
            "dropped": "DROPPED (empty on the new release; it leaves patches/series)",
        }[self.status]
        return f"{self.patch}: {label}" + "".join(f"\n    {note}" for note in self.notes)


def _run_patch(tree: Path, patch_text: str, fuzz: int, dry_run: bool) -> tuple[int, str]:
    cmd = ["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch", "-r", "-", f"--fuzz={fuzz}", "-d"]
    cmd.append(str(tree))
    if dry_run:
        cmd.append("--dry-run")
    proc = subprocess.run(cmd, input=patch_text, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def apply_patch(tree: Path, name: str, patch_text: str, fuzz: int = 0) -> ApplyResult:
    """Apply one patch to `tree` (an upstream root) if all its hunks apply; never leave it half-applied."""
    code, output = _run_patch(tree, patch_text, fuzz, dry_run=True)
    notes, status, current = [], "applied", None
    for line in output.splitlines():
        if match := re.match(r"(?:checking|patching) file (\S+)", line):
            current = match.group(1)
        elif match := re.match(r"Hunk #(\d+) FAILED at (\d+)", line):
            notes.append(f"hunk #{match.group(1)} of {current} does not apply (at line {match.group(2)})")
            status = "conflict"
        elif match := re.match(r"Hunk #(\d+) succeeded at (\d+)(?: with fuzz (\d+))?(?: \(offset (-?\d+) lines?\))?", line):
            hunk, at, fuzz_used, offset = match.groups()
            if fuzz_used:
                notes.append(f"hunk #{hunk} of {current} applied with fuzz {fuzz_used} at line {at}")
                status = "fuzz" if status != "conflict" else status
            if offset:
                notes.append(f"hunk #{hunk} of {current} applied at line {at} (offset {offset} lines)")
                status = "offset" if status == "applied" else status
        elif "Reversed (or previously applied) patch detected" in line:
            notes.append(f"{current}: already applied or reversed")
            status = "conflict"
        elif "can't find file" in line or "No file to patch" in line:
            notes.append(f"a file it patches does not exist: {line.strip()}")
            status = "conflict"
    if code != 0 and status != "conflict":
        notes.append(output.strip()[-1000:])
        status = "conflict"
    if status != "conflict":
        code, output = _run_patch(tree, patch_text, fuzz, dry_run=False)
        if code != 0:
            raise PatchQueueError(f"{name} passed its dry run but failed to apply:\n{output}")
    return ApplyResult(name, status, notes)


# --------------------------------------------------------------------------------------------------------------------
# Trees: staging, comparing, diffing


def _copy_package(src_root: Path, dest_root: Path) -> None:
    shutil.copytree(src_root / PACKAGE_DIR, dest_root / PACKAGE_DIR, symlinks=True)


def stage_series(pristine: Path, patches: list[PatchFile], dest: Path, fuzz: int = 0) -> list[ApplyResult]:
    """Copy pristine `src/transformers` under `dest` and apply the series; raise on the first patch that fails."""
    _copy_package(pristine, dest)
    results = []
    for patch in patches:
        result = apply_patch(dest, patch.name, patch.text(), fuzz=fuzz)
        if result.status == "conflict":
            raise PatchQueueError(f"patch {result.describe()}\nFix it with `make refresh` or by hand in patches/.")
        results.append(result)
    return results


def _package_files(upstream_root: Path, skip: frozenset[str] = frozenset()) -> set[str]:
    """Files of the package (relative to the root), without caches and without the paths in `skip`."""
    base = upstream_root / PACKAGE_DIR
    if not base.is_dir():
        return set()
    found = set()
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for filename in filenames:
            if filename.endswith((".pyc", ".pyo")):
                continue
            found.add((Path(dirpath) / filename).relative_to(upstream_root).as_posix())
    return found - skip


def changed_files(old_root: Path, new_root: Path, skip: frozenset[str] = frozenset()) -> list[str]:
    """Paths (relative to the roots) that differ, were added or were removed between two package trees."""
    old, new = _package_files(old_root, skip), _package_files(new_root, skip)
    changed = old ^ new
    for path in old & new:
        if not filecmp.cmp(old_root / path, new_root / path, shallow=False):
            changed.add(path)
    return sorted(changed)


def file_diff(path: str, old: Path | None, new: Path | None) -> str:
    """A git-style diff section of one file; `None` stands for a file that does not exist on that side."""
    cmd = ["diff", "-u", "--label", f"a/{path}" if old else "/dev/null", "--label", f"b/{path}" if new else "/dev/null"]
    cmd += [str(old or os.devnull), str(new or os.devnull)]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode == 0:
        return ""
    if proc.returncode != 1:
        raise PatchQueueError(f"diff failed on {path}: {proc.stderr.decode(errors='replace')}")
    body = proc.stdout.decode("utf-8")
    if body.startswith("Binary files"):
        raise PatchQueueError(f"{path} is a binary file; the patch queue only carries text changes")
    header = f"{DIFF_HEADER}a/{path} b/{path}\n"
    if old is None:
        header += "new file mode 100644\n"
    elif new is None:
        header += "deleted file mode 100644\n"
    return header + body


def tree_diff(old_root: Path, new_root: Path, paths: list[str] | None = None) -> str:
    paths = changed_files(old_root, new_root) if paths is None else paths
    sections = []
    for path in paths:
        old, new = old_root / path, new_root / path
        sections.append(file_diff(path, old if old.is_file() else None, new if new.is_file() else None))
    return "".join(sections)


# --------------------------------------------------------------------------------------------------------------------
# The fork's own modules: tracked files under src/transformers that no patch carries and no assembly touches


def own_modules(root: Path) -> frozenset[str]:
    """The fork's own files under src/transformers (paths relative to the repo root) that exist in the work tree.

    Every upstream file there is git-ignored, so the own modules are the files git does not ignore: tracked, or
    un-ignored by a `!/src/transformers/...` line of .gitignore. Where git cannot say (no git, or a copy of the
    repository outside a git work tree) those .gitignore lines are the record, read as they are written.
    """
    listed = _git_own_modules(root)
    if listed is None:
        listed = _recorded_own_modules(root)
    return frozenset(path for path in listed if (root / path).is_file())


def _git_own_modules(root: Path) -> set[str] | None:
    """Tracked plus untracked-but-not-ignored files under src/transformers; None when root is no git work tree."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True)
    except FileNotFoundError:
        return None
    # A copy nested in some other repository (a test's scratch directory) would get that repository's answer.
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root.resolve():
        return None
    listed = set()
    for selection in ([], ["--others", "--exclude-standard"]):
        cmd = ["git", "ls-files", "-z", *selection, "--", PACKAGE_DIR.as_posix()]
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        if proc.returncode != 0:
            raise PatchQueueError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")
        listed.update(path for path in proc.stdout.split("\0") if path)
    return listed


def _recorded_own_modules(root: Path) -> set[str]:
    """The files .gitignore un-ignores one by one under src/transformers (`!/src/transformers/<path>`)."""
    gitignore = root / ".gitignore"
    if not gitignore.is_file():
        return set()
    prefix = f"!/{PACKAGE_DIR.as_posix()}/"
    recorded = set()
    for line in gitignore.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith(prefix) and not line.endswith("/"):  # a trailing slash un-ignores a parent directory
            recorded.add(line[2:])
    return recorded


def _collisions(own: frozenset[str], upstream_root: Path) -> list[str]:
    """Own modules at the path of a file of `upstream_root` (pristine, or pristine + patches)."""
    return [
        f"{path} is an own module of the fork, but the upstream release (or a patch) has a file at that path: an own "
        "module cannot replace an upstream file; rename it, or make the change a patch of that file"
        for path in sorted(own)
        if (upstream_root / path).exists()
    ]


def _unrecorded(root: Path, own: frozenset[str]) -> list[str]:
    """Own modules git knows of but .gitignore does not name (a copy without git takes them for assembled ones)."""
    return [
        f"{path} is tracked under src/transformers but .gitignore does not un-ignore it: add `!/{path}` there "
        "(README, layout)"
        for path in sorted(own - _recorded_own_modules(root))
    ]


def _carry_own_modules(root: Path, staged_root: Path, own: frozenset[str]) -> None:
    """Copy the own modules into a staged tree, so that replacing src/transformers by it keeps them as they are."""
    for path in sorted(own):
        (staged_root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / path, staged_root / path)


def _is_assembled(root: Path, own: frozenset[str]) -> bool:
    """Whether src/transformers holds an assembly; a fresh clone has the own modules there and nothing else."""
    return bool(_package_files(root, skip=own))


# --------------------------------------------------------------------------------------------------------------------
# Assembly and the stamp that tells a fresh assembly from local edits


def _stamp_path(root: Path) -> Path:
    return root / ".cache" / "assembled.json"


def _series_digest(pin: Pin, patches: list[PatchFile]) -> str:
    digest = hashlib.sha256(pin.sha256.encode())
    for patch in patches:
        digest.update(patch.name.encode() + b"\0" + patch.text().encode() + b"\0")
    return digest.hexdigest()


def _manifest(upstream_root: Path, own: frozenset[str]) -> dict[str, str]:
    """The assembled files and their hashes; own modules are left out (git keeps them, no assembly replaces them)."""
    manifest = {}
    for path in sorted(_package_files(upstream_root, skip=own)):
        manifest[path] = hashlib.sha1((upstream_root / path).read_bytes()).hexdigest()
    return manifest


def _write_stamp(root: Path, digest: str, own: frozenset[str]) -> None:
    stamp = {"series_digest": digest, "manifest": _manifest(root, own)}
    _stamp_path(root).parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(_stamp_path(root), json.dumps(stamp))


def _read_stamp(root: Path) -> dict | None:
    try:
        return json.loads(_stamp_path(root).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _edited_since_assembly(root: Path, stamp: dict | None, own: frozenset[str]) -> list[str] | None:
    """Files of src/transformers changed since the last assembly; None when that cannot be told (no stamp)."""
    if stamp is None:
        return None
    current = _manifest(root, own)
    # A stamp written before a file became an own module still lists it: it is no assembled file any more.
    recorded = {path: sha for path, sha in stamp["manifest"].items() if path not in own}
    return sorted(p for p in current.keys() | recorded.keys() if current.get(p) != recorded.get(p))


def _replace_package(root: Path, staged_root: Path) -> None:
    target = root / PACKAGE_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    old = root / "src" / ".transformers.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(staged_root / PACKAGE_DIR, target)
    except BaseException:
        # Put the old tree back: it holds the originals of the own modules, and the next assembly deletes `old`.
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def assemble(root: Path, force: bool = False, quiet: bool = False) -> None:
    """Make src/transformers = pristine + series. Edits not yet refreshed into patches/ are never silently dropped."""
    pin = Pin.load(root)
    patches = load_series(root)
    digest = _series_digest(pin, patches)
    stamp = _read_stamp(root)
    own = own_modules(root)
    assembled = _is_assembled(root, own)
    edits = _edited_since_assembly(root, stamp, own) if assembled else []

    if assembled and stamp and not force:
        if stamp["series_digest"] == digest:
            if edits:
                print(
                    f"patchq: using src/transformers with {len(edits)} edited file(s) not yet in patches/ "
                    "(`make refresh` keeps them, `make check` lists them)",
                    file=sys.stderr,
                )
            elif not quiet:
                print(f"patchq: src/transformers is up to date ({pin.package} {pin.version} + {len(patches)} patches)")
            return
        if edits:
            raise PatchQueueError(
                "patches/ changed since src/transformers was assembled, and src/transformers has edits that are not "
                "in patches/ (they would be lost):\n  "
                + "\n  ".join(edits[:20])
                + "\nRun `make refresh` to keep them, or `make assemble FORCE=1` to discard them."
            )

    pristine = fetch(root, pin)
    (root / "src").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root / "src", prefix=".assemble-") as tmp:
        stage_series(pristine, patches, Path(tmp))
        collisions = _collisions(own, Path(tmp))
        if collisions:
            raise PatchQueueError("\n".join(collisions))
        if assembled and stamp is None and not force:
            # A tree we did not assemble (or whose stamp was lost): adopt it only if it is exactly the series.
            drift = changed_files(Path(tmp), root, skip=own)
            if drift:
                raise PatchQueueError(
                    "src/transformers differs from pristine + patches/ and has no assembly stamp:\n  "
                    + "\n  ".join(drift[:20])
                    + "\nRun `make refresh` to keep these edits, or `make assemble FORCE=1` to discard them."
                )
        else:
            _carry_own_modules(root, Path(tmp), own)
            _replace_package(root, Path(tmp))
    _write_stamp(root, digest, own)
    if not quiet:
        print(f"patchq: assembled src/transformers from {pin.package} {pin.version} + {len(patches)} patches")


# --------------------------------------------------------------------------------------------------------------------
# check, diff, refresh


def check(root: Path) -> list[str]:
    """Return the problems found (empty when the queue is sound)."""
    problems = []
    pin = Pin.load(root)
    patches = load_series(root)
    listed = {p.name for p in patches}
    for path in sorted((root / "patches").glob("*.patch")):
        if path.name not in listed:
            problems.append(f"patches/{path.name} is not listed in patches/series")
    for patch in patches:
        fields = patch.header_fields()
        for key in REQUIRED_HEADER_FIELDS:
            if not fields.get(key) or fields[key].upper().startswith("TODO"):
                problems.append(f"{patch.name}: header field '{key}:' is missing or TODO")
        if not patch.sections:
            problems.append(f"{patch.name}: changes nothing")
        for path in _added_files(patch):
            problems.append(
                f"{patch.name}: adds the new file {path}; no patch adds a new file; put it at its place under "
                "src/transformers as an own module (README, layout)"
            )
    problems += _forwardable_problems(patches)

    pristine = fetch(root, pin)
    own = own_modules(root)
    assembled = _is_assembled(root, own)
    problems += _unrecorded(root, own)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "assembled"
        _copy_package(pristine, stage)
        for patch in patches:
            result = apply_patch(stage, patch.name, patch.text(), fuzz=0)
            if result.status != "applied":
                problems.append(f"patch {result.describe()} (run `make refresh` to regenerate it exactly)")
        problems += _collisions(own, stage)
        if assembled:
            # Own modules are no edits of upstream files: git keeps them, and no patch may carry them.
            differ = changed_files(stage, root, skip=own)
            if differ and _assembled_from_elsewhere(root, pin, patches, own):
                # After a switch between pins (or a pull of new patches) every file upstream or the patches changed
                # differs; none is an edit, and `make refresh` would write the old release's code into the patches.
                problems.append("src/transformers was assembled from another pin or series: run `make assemble`")
            else:
                for path in differ:
                    problems.append(f"{path}: edited in src/transformers but not in patches/ (run `make refresh`)")

        # The review diff is the whole difference from pristine, the own modules included as new files.
        review = tree_diff(pristine, root) if assembled else ""
        if review:
            scratch = Path(tmp) / "pristine"
            _copy_package(pristine, scratch)
            proc = subprocess.run(["git", "apply", "--check", "-"], cwd=scratch, input=review, capture_output=True, text=True)
            if proc.returncode != 0:
                problems.append(f"the review diff does not pass `git apply --check` on pristine:\n{proc.stderr}")
    return problems


def _assembled_from_elsewhere(root: Path, pin: Pin, patches: list[PatchFile], own: frozenset[str]) -> bool:
    """Whether src/transformers is an untouched assembly of another pin or series: the stamp's digest is not the
    current one, and the files are those the stamp recorded (so nothing was edited since)."""
    stamp = _read_stamp(root)
    if stamp is None or stamp["series_digest"] == _series_digest(pin, patches):
        return False
    return _edited_since_assembly(root, stamp, own) == []


def is_forwardable(patch: PatchFile) -> bool:
    """Whether the patch belongs to the series proposed upstream (`Forwardable: yes`)."""
    return patch.header_fields().get(FORWARDABLE_FIELD, "no").split(" ")[0].lower() == "yes"


def _forwardable_problems(patches: list[PatchFile]) -> list[str]:
    """`Forwardable:` is `yes` or `no (why)`, and the proposed patches come before the fork's own."""
    problems = []
    for patch in patches:
        value = patch.header_fields().get(FORWARDABLE_FIELD)
        if value is not None and value.split(" ")[0].lower() not in ("yes", "no"):
            problems.append(f"{patch.name}: '{FORWARDABLE_FIELD}: {value}' must be `yes` or `no (why)`")
    seen_fork_only = None
    for patch in patches:
        if not is_forwardable(patch):
            seen_fork_only = seen_fork_only or patch.name
        elif seen_fork_only:
            problems.append(
                f"{patch.name} is proposed upstream ({FORWARDABLE_FIELD}: yes) but comes after {seen_fork_only}, "
                "which is not: the proposed patches come first in patches/series, so that they apply to pristine alone"
            )
    return problems


def _added_files(patch: PatchFile) -> list[str]:
    """The files a patch creates (its sections from /dev/null)."""
    added = []
    for path, section in patch.sections.items():
        head = section.split("\n@@", 1)[0]  # the section's header lines, before its first hunk
        if re.search(r"(?m)^(new file mode |--- /dev/null)", head):
            added.append(path)
    return added


def review_diff(root: Path) -> str:
    """The whole difference of src/transformers from pristine: the patches' changes, the own modules as new files."""
    pristine = fetch(root)
    if not _is_assembled(root, own_modules(root)):
        raise PatchQueueError("src/transformers is not assembled; run `make assemble`")
    return tree_diff(pristine, root)


def _file_after(pristine: Path, patches: list[PatchFile], path: str, workdir: Path) -> Path | None:
    """The file `path` as the given patches leave it (None when it does not exist)."""
    tree = Path(tempfile.mkdtemp(dir=workdir))
    source = pristine / path
    if source.is_file():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, tree / path)
    for patch in patches:
        if path in patch.sections:
            result = apply_patch(tree, patch.name, patch.sections[path], fuzz=0)
            if result.status == "conflict":
                raise PatchQueueError(f"{result.describe()}\nThe series itself is broken; fix it before refreshing.")
    return tree / path if (tree / path).is_file() else None


def _new_patch(name: str) -> PatchFile:
    header = (
        "Description: TODO one line saying what this patch changes\n"
        " TODO why: the problem it solves, in a few lines.\n"
        "Author: TODO\n"
        "Bug: TODO upstream issue or PR it relates to\n"
        "Forwarded: TODO no | not-needed | <upstream PR>\n"
        "---\n"
    )
    return PatchFile(name=name, header=header)


def refresh(root: Path, into: str | None = None, new: str | None = None) -> list[str]:
    """Fold the edits of src/transformers into the patches; return a line per patch it rewrote."""
    pin = Pin.load(root)
    patches = load_series(root)
    names = [p.name for p in patches]
    if new:
        if not new.endswith(".patch"):
            new += ".patch"
        if new in names:
            raise PatchQueueError(f"{new} is already in the series; use PATCH={new}")
        patches.append(_new_patch(new))
        names.append(new)
        into = new
    if into and into not in names:
        raise PatchQueueError(f"PATCH={into} is not in patches/series (which has: {', '.join(names)})")

    pristine = fetch(root, pin)
    report = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stage = tmp / "assembled"
        stage_series(pristine, [p for p in patches if p.sections], stage)
        own = own_modules(root)
        edited = changed_files(stage, root, skip=own)  # own modules are git's to keep, never a patch's
        if not edited:
            return report
        touched: dict[str, list[int]] = {}
        for path in edited:
            if not (stage / path).exists():
                raise PatchQueueError(
                    f"{path} is a new file, and no patch adds a new file: make it an own module of the fork, "
                    f"un-ignored by a `!/{path}` line in .gitignore and tracked by git (README, layout)"
                )
            owners = [i for i, p in enumerate(patches) if path in p.sections]
            if into:
                target = names.index(into)
                later = [names[i] for i in owners if i > target]
                if later:
                    raise PatchQueueError(
                        f"{path} is also changed by {', '.join(later)}, later in the series than {into}; "
                        f"put this edit into {later[-1]} (PATCH={later[-1]}) or reorder the series"
                    )
            elif owners:
                target = owners[-1]
            else:
                raise PatchQueueError(
                    f"{path} is edited but no patch touches it yet: say which patch takes it with PATCH=<name>, "
                    "or start one with NEW=<NNNN-concern>"
                )
            current = root / path
            base = _file_after(pristine, patches[:target], path, tmp)
            section = file_diff(path, base, current if current.is_file() else None)
            if section:
                patches[target].sections[path] = section
            else:
                patches[target].sections.pop(path, None)
            touched.setdefault(patches[target].name, []).append(path)

    for patch in patches:
        if patch.name in touched:
            _atomic_write(root / "patches" / patch.name, patch.text())
            report.append(f"{patch.name}: refreshed {', '.join(touched[patch.name])}")
    if new:
        _atomic_write(root / "patches" / "series", "".join(n + "\n" for n in _series_lines(root, new)))
    _write_stamp(root, _series_digest(pin, load_series(root)), own_modules(root))
    return report


def _series_lines(root: Path, appended: str) -> list[str]:
    series = root / "patches" / "series"
    lines = series.read_text(encoding="utf-8").splitlines() if series.is_file() else []
    return lines + [appended]


# --------------------------------------------------------------------------------------------------------------------
# pr-series: the part proposed upstream, as a `git format-patch` series


@dataclass
class PrCommit:
    subject: str
    body: str
    diff: str
    source: str  # the patch file, or the own module, it was made from
    date: str


def _description(patch: PatchFile) -> tuple[str, str]:
    """The DEP-3 `Description:` as a commit subject (its first line) and body (its indented lines, ` .` blank)."""
    subject, body, inside = "", [], False
    for line in patch.header.splitlines():
        if line.startswith("Description:"):
            subject, inside = line.split(":", 1)[1].strip(), True
        elif inside and line.startswith(" "):
            body.append("" if line.strip() == "." else line[1:])
        else:
            inside = False
    return subject, "\n".join(body).strip("\n")


def _rfc2822_date(day: str) -> str:
    import datetime
    import email.utils

    try:
        moment = datetime.datetime.strptime(day.strip(), "%Y-%m-%d").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        moment = datetime.datetime.now(datetime.timezone.utc)
    return email.utils.format_datetime(moment)


def _module_stem(path: str) -> str:
    return Path(path).stem


def own_modules_used(root: Path, patches: list[PatchFile], own: frozenset[str]) -> list[str]:
    """The own modules that the lines these patches add name (as `.<module>` or `<module>`), and those that those
    modules import in turn, in the order they are first needed."""
    added = "\n".join(
        line[1:]
        for patch in patches
        for section in patch.sections.values()
        for line in section.splitlines()
        if line.startswith("+") and not line.startswith("+++ ")
    )

    def named_in(text: str) -> list[str]:
        found = [(m.start(), path) for path in own for m in [re.search(rf"\b{_module_stem(path)}\b", text)] if m]
        return [path for _, path in sorted(found)]

    used: list[str] = []
    pending = named_in(added)
    while pending:
        path = pending.pop(0)
        if path not in used:
            used.append(path)
            pending += named_in((root / path).read_text(encoding="utf-8"))
    return used


def pr_series(root: Path, out: Path, author: str | None = None) -> dict:
    """Write the proposed series into `out` (`NNNN-<subject>.patch` in `git format-patch` form, `PR.md`) and check that
    `git am` applies it to the pristine release, giving pristine + the proposed patches + the own modules they use."""
    pin = Pin.load(root)
    patches = load_series(root)
    problems = _forwardable_problems(patches)
    if problems:
        raise PatchQueueError("\n".join(problems))
    proposed = [p for p in patches if is_forwardable(p)]
    if not proposed:
        raise PatchQueueError(f"no patch of patches/series says `{FORWARDABLE_FIELD}: yes`: nothing to export")
    author = author or _git_author(root)
    own = own_modules(root)
    modules = own_modules_used(root, proposed, own)
    date = _rfc2822_date(max(p.header_fields().get("Last-Update", "") for p in proposed))

    commits = []
    for path in modules:
        text = (root / path).read_text(encoding="utf-8")
        docstring = re.search(r'^"""\n?(.*?)"""', re.sub(r"\A(#.*\n)*", "", text), re.S)
        body = docstring.group(1).strip() if docstring else ""
        commits.append(PrCommit(f"add {path.removeprefix(PACKAGE_DIR.as_posix() + '/')}", body,
                                file_diff(path, None, root / path), path, date))
    for patch in proposed:
        subject, body = _description(patch)
        trailers = []
        bug = patch.header_fields().get("Bug", "")
        if bug.startswith("http"):
            trailers.append(f"Link: {bug}")
        trailers.append(f"Fork-Patch: patches/{patch.name}")
        commits.append(PrCommit(subject, body + "\n\n" + "\n".join(trailers), "".join(patch.sections.values()),
                                f"patches/{patch.name}", _rfc2822_date(patch.header_fields().get("Last-Update", ""))))

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    files = []
    for number, commit in enumerate(commits, 1):
        slug = re.sub(r"[^A-Za-z0-9]+", "-", commit.subject).strip("-")[:52].rstrip("-")
        path = out / f"{number:04d}-{slug}.patch"
        path.write_text(
            "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
            f"From: {author}\nDate: {commit.date}\nSubject: [PATCH {number}/{len(commits)}] {commit.subject}\n\n"
            f"{commit.body}\n---\n{_diffstat(commit.diff)}\n{commit.diff}-- \npatchq pr-series\n\n",
            encoding="utf-8",
        )
        files.append(path)

    pristine = fetch(root, pin)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "pr"
        applied = _git_am(pristine, tree, files)
        expected = Path(tmp) / "expected"
        stage_series(pristine, proposed, expected)
        for path in modules:
            (expected / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / path, expected / path)
        differ = changed_files(expected, applied)
        if differ:
            raise PatchQueueError(f"the exported series does not give pristine + the proposed patches: {differ}")
        added, removed = _line_counts("".join(c.diff for c in commits[len(modules):]))
        module_lines = sum(len((root / m).read_text(encoding="utf-8").splitlines()) for m in modules)

    summary = {
        "release": f"{pin.package} {pin.version}",
        "commits": len(commits),
        "patches": [p.name for p in proposed],
        "own_modules": {m: len((root / m).read_text(encoding="utf-8").splitlines()) for m in modules},
        "upstream_lines_added": added,
        "upstream_lines_removed": removed,
        "module_lines": module_lines,
        "files": [f.name for f in files],
    }
    (out / "PR.md").write_text(_pr_description(root, summary, commits, patches), encoding="utf-8")
    return summary


def _git_author(root: Path) -> str:
    values = []
    for key in ("user.name", "user.email"):
        proc = subprocess.run(["git", "config", key], cwd=root, capture_output=True, text=True)
        values.append(proc.stdout.strip())
    if not all(values):
        raise PatchQueueError("no author for the series: pass --author 'Name <email>' (or set git's user.name/email)")
    return f"{values[0]} <{values[1]}>"


def _diffstat(diff: str) -> str:
    proc = subprocess.run(["git", "apply", "--stat", "-"], input=diff, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else ""


def _line_counts(diff: str) -> tuple[int, int]:
    lines = diff.splitlines()
    added = sum(1 for line in lines if line.startswith("+") and not line.startswith("+++ "))
    removed = sum(1 for line in lines if line.startswith("-") and not line.startswith("--- "))
    return added, removed


def _git_am(pristine: Path, tree: Path, files: list[Path]) -> Path:
    """`git am` the series onto a git repository of the pristine release; returns its root."""
    _copy_package(pristine, tree)
    identity = ["-c", "user.name=patchq", "-c", "user.email=patchq@localhost", "-c", "commit.gpgsign=false"]

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *identity, *args], cwd=tree, capture_output=True, text=True)

    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "pristine release"]):
        proc = git(*args)
        if proc.returncode != 0:
            raise PatchQueueError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    proc = git("am", "--quiet", *map(str, files))
    if proc.returncode != 0:
        raise PatchQueueError(f"`git am` of the series on the pristine release failed:\n{proc.stdout}{proc.stderr}")
    return tree


def _pr_description(root: Path, summary: dict, commits: list[PrCommit], patches: list[PatchFile]) -> str:
    intro_file = root / PR_DESCRIPTION
    intro = intro_file.read_text(encoding="utf-8").strip() if intro_file.is_file() else "# Proposed changes"
    lines = [intro, "", "## Commits", ""]
    for number, commit in enumerate(commits, 1):
        paragraph = []
        for line in commit.body.split("\n\n")[0].splitlines():
            if line.lstrip().startswith("- "):
                break
            paragraph.append(line)
        first = " ".join(" ".join(paragraph).split())
        lines += [f"{number}. **{commit.subject}** (`{commit.source}`)", "", f"   {first}", ""]
    lines += ["## Size", ""]
    lines.append(
        f"{summary['commits']} commits on {summary['release']}: "
        f"{len(summary['own_modules'])} new module(s) ({summary['module_lines']} lines: "
        + ", ".join(f"`{m}` {n}" for m, n in summary["own_modules"].items())
        + f"), and +{summary['upstream_lines_added']} / -{summary['upstream_lines_removed']} lines in upstream files."
    )
    kept = [p for p in patches if not is_forwardable(p)]
    if kept:
        lines += ["", "## Not proposed here (kept in the fork)", ""]
        for patch in kept:
            reason = patch.header_fields().get(FORWARDABLE_FIELD, "no").partition(" ")[2].strip(" ()") or "fork-only"
            lines.append(f"- `{patch.name}`: {_description(patch)[0]} ({reason})")
    lines += [
        "",
        "## Applying",
        "",
        f"Checked with `git am` on the pristine `{summary['release']}` release (`make pr-series`):",
        "",
        "```bash",
        "git am build/pr-series/*.patch",
        "```",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# rebase: a three-way `git rebase` of the series in a scratch repository
#
# The scratch repository (build/rebase/repo, git-ignored) holds the package of the old pristine release as its base
# commit, one commit per patch of the series on top (the commit message is the patch file's name), and the new pristine
# release as a commit on top of the old one. `git rebase` (merge backend) replays the patch commits onto the new
# release: a patch whose context upstream moved or changed merges three-way, and a patch that really conflicts stops
# the rebase once; later patches are replayed onto its resolution, so they never fail because of it. Each patch is then
# regenerated from its rebased commit's diff. The checkout's patches/ and upstream.toml change only in the last step.

REBASE_DIR = Path("build") / "rebase"  # relative to the repo root: repo/ (the git repository), state.json, old/, new/
_GIT_SETTINGS = (
    "-c", "user.name=patchq", "-c", "user.email=patchq@localhost", "-c", "commit.gpgsign=false",
    "-c", "rerere.enabled=false", "-c", f"core.hooksPath={os.devnull}", "-c", f"core.excludesFile={os.devnull}",
    "-c", "core.autocrlf=false", "-c", "core.quotePath=false", "-c", "gc.auto=0", "-c", "merge.conflictStyle=diff3",
    "-c", "init.defaultBranch=series", "-c", "advice.detachedHead=false",
)
_CONFLICT_MARKER = re.compile(r"^(<{7}|\|{7}|>{7})( |$)")


def _git_env() -> dict[str, str]:
    """An environment where git reads none of the user's configuration and no variable points it at another repo."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1", GIT_EDITOR="true", LC_ALL="C")
    return env


def _git(repo: Path, *args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(["git", *_GIT_SETTINGS, *args], cwd=repo, capture_output=True, text=True,
                          env={**_git_env(), **(env or {})})
    if check and proc.returncode != 0:
        raise PatchQueueError(f"`git {' '.join(args)}` failed in {repo}:\n{proc.stdout}{proc.stderr}".rstrip())
    return proc


@dataclass
class RebaseReport:
    results: list[ApplyResult]  # the patches rebased so far, in series order, conflicts included
    waiting: list[str] = field(default_factory=list)  # patches not replayed yet (the rebase stopped before them)
    stopped: bool = False  # a conflict waits for a hand resolution in the scratch repository
    finished: bool = False  # the pin moved and the patches were regenerated
    old: str = ""  # the versions moved from and onto
    new: str = ""

    @property
    def ok(self) -> bool:
        return not self.stopped and all(r.status != "conflict" for r in self.results)


@dataclass
class _Scratch:
    """Where a rebase keeps its work: the git repository, the state, the old patches/ and the new one, staged."""

    dir: Path

    @property
    def repo(self) -> Path:
        return self.dir / "repo"

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def old(self) -> Path:  # a copy of patches/ and upstream.toml as they were when the rebase started
        return self.dir / "old"

    @property
    def new(self) -> Path:  # the regenerated patches/, staged before they replace the checkout's
        return self.dir / "new"

    def load(self) -> dict | None:
        try:
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def save(self, state: dict) -> None:
        _atomic_write(self.state_path, json.dumps(state, indent=1))

    def rebasing(self) -> bool:
        """Whether git's rebase is under way (stopped at a conflict)."""
        return (self.repo / ".git" / "rebase-merge").is_dir()


def _in_progress_message(root: Path, scratch: _Scratch) -> str:
    state = scratch.load()
    what = f"a rebase from {state['old']['version']} onto {state['new']['version']}" if state else "a rebase"
    return (
        f"{what} is in progress or was interrupted ({scratch.dir.relative_to(root)} exists): "
        "`make rebase CONTINUE=1` goes on with it, `make rebase ABORT=1` drops it"
    )


def rebase(root: Path, version: str, sha256: str, dry_run: bool = False) -> RebaseReport:
    """Move the series onto another release with a three-way rebase; stop at a real conflict for a hand resolution.

    With `dry_run`, conflicts are reported, then resolved with the patch's side only to carry on (so that no later patch
    is reported for them), and nothing is kept. Rebasing onto the pinned release itself regenerates every patch exactly.
    """
    old_pin = Pin.load(root)
    scratch = _Scratch(root / REBASE_DIR)
    if scratch.dir.exists() and not dry_run:
        raise PatchQueueError(_in_progress_message(root, scratch))
    own = own_modules(root)
    _refuse_unrefreshed(root, own)
    new_pin = Pin(package=old_pin.package, version=version, sha256=sha256.lower())
    patches = load_series(root)
    old_pristine = fetch(root, old_pin)
    new_pristine = fetch(root, new_pin)
    # Found after the pin moved, a collision would stop the re-assembly half way; the own modules stay as they are.
    collisions = _collisions(own, new_pristine)
    if collisions:
        raise PatchQueueError("\n".join(collisions) + f"\nNothing changed; the pin stays at {old_pin.version}.")

    if dry_run:
        with tempfile.TemporaryDirectory(prefix="patchq-rebase-") as tmp:
            scratch = _Scratch(Path(tmp))
            state = _start(root, scratch, old_pin, new_pin, patches, old_pristine, new_pristine)
            state["dry_run"] = True
            while scratch.rebasing():
                state["conflicts"].append(_stop_report(scratch, state, patches))
                _take_patch_side(scratch, state["conflicts"][-1]["files"])
                _continue_git(scratch)
            return RebaseReport(_results(scratch, state, patches), old=old_pin.version, new=new_pin.version)

    try:
        state = _start(root, scratch, old_pin, new_pin, patches, old_pristine, new_pristine)
    except BaseException:
        # Interrupted while setting up (or setting up failed): leave nothing behind, the checkout was not touched.
        shutil.rmtree(scratch.dir, ignore_errors=True)
        raise
    return _go_on(root, scratch, state, patches)


def rebase_continue(root: Path) -> RebaseReport:
    """Go on with a rebase stopped at a conflict, once the conflicting files are resolved in the scratch repository."""
    scratch = _Scratch(root / REBASE_DIR)
    state = scratch.load()
    if not scratch.dir.exists():
        raise PatchQueueError("no rebase is in progress (start one with `make rebase VERSION=... SHA256=...`)")
    if state is None:
        raise PatchQueueError("the last rebase was interrupted while it set up: `make rebase ABORT=1`, then start again")
    patches = [PatchFile.read(scratch.old / "patches" / name) for name in state["series"]]
    if state["phase"] == "writing":  # stopped (killed) while replacing patches/ and the pin: finish that step
        return _finish(root, scratch, state, patches)
    _refuse_changed_checkout(root, scratch)
    if scratch.rebasing():
        files = sorted(set(_unmerged(scratch.repo)) | set(state["conflicts"][-1]["files"] if state["conflicts"] else ()))
        for path in files:
            line = _marker_line(scratch.repo / path)
            if line:
                raise PatchQueueError(
                    f"{scratch.repo.relative_to(root) / path} still has conflict markers (line {line}): resolve them, "
                    "then `make rebase CONTINUE=1` again"
                )
        if files:
            _git(scratch.repo, "add", "-A", "--", *files)
        _continue_git(scratch)
    return _go_on(root, scratch, state, patches)


def rebase_abort(root: Path) -> str:
    """Drop a rebase in progress; an interrupted final step is undone: patches/, the pin and the assembly as before."""
    scratch = _Scratch(root / REBASE_DIR)
    if not scratch.dir.exists():
        raise PatchQueueError("no rebase is in progress")
    state = scratch.load()
    if state and state["phase"] == "writing":
        _restore_checkout(root, scratch, state)
        old_pin = Pin.load(root)
        stamp = _read_stamp(root)
        if stamp and stamp["series_digest"] != _series_digest(old_pin, load_series(root)):
            assemble(root, force=True, quiet=True)
    shutil.rmtree(scratch.dir)
    return f"dropped the rebase; the pin stays at {state['old']['version'] if state else Pin.load(root).version}"


def _refuse_unrefreshed(root: Path, own: frozenset[str]) -> None:
    if _is_assembled(root, own):
        edits = _edited_since_assembly(root, _read_stamp(root), own)
        if edits is None or edits:
            raise PatchQueueError("src/transformers has unrefreshed edits (or no assembly stamp): `make refresh` first")


def _refuse_changed_checkout(root: Path, scratch: _Scratch) -> None:
    """The final step replaces patches/ and the pin: edits made to them while the rebase waited would be lost."""
    changed = [
        path for path in ["upstream.toml", *(f"patches/{p.name}" for p in (scratch.old / "patches").iterdir())]
        if not (root / path).is_file() or not filecmp.cmp(root / path, scratch.old / path, shallow=False)
    ]
    changed += [f"patches/{p.name}" for p in (root / "patches").iterdir() if not (scratch.old / "patches" / p.name).exists()]
    if changed:
        raise PatchQueueError(
            f"{', '.join(sorted(changed))} changed since the rebase started; the rebase would overwrite that. Put them "
            "back (git), or `make rebase ABORT=1` and start the rebase again"
        )


def _start(root: Path, scratch: _Scratch, old_pin: Pin, new_pin: Pin, patches: list[PatchFile], old_pristine: Path,
           new_pristine: Path) -> dict:
    """Build the scratch repository (old pristine, the patch commits, new pristine) and start `git rebase`."""
    scratch.dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(root / "patches", scratch.old / "patches")
    shutil.copy2(root / "upstream.toml", scratch.old / "upstream.toml")
    repo = scratch.repo
    _git(scratch.dir, "init", "-q", str(repo))
    _copy_package(old_pristine, repo)
    _commit_all(repo, f"pristine {old_pin.version}")
    _git(repo, "tag", "base")
    for patch in patches:
        # The series applies to its own pin (`make check`); offsets or fuzz left by a dropped patch are allowed.
        result = apply_patch(repo, patch.name, patch.text(), fuzz=2)
        if result.status == "conflict":
            raise PatchQueueError(
                f"the series does not apply to the pinned release {old_pin.version}: {result.describe()}\n"
                "Fix it first (`make check`)."
            )
        _commit_all(repo, patch.name)
    _commit_release(repo, new_pristine, f"pristine {new_pin.version}")
    state = {
        "old": {"version": old_pin.version, "sha256": old_pin.sha256},
        "new": {"version": new_pin.version, "sha256": new_pin.sha256},
        "series": [p.name for p in patches],
        "conflicts": [],  # one entry per stop: the patch, its files, the report printed
        "phase": "rebasing",
    }
    scratch.save(state)
    # --reapply-cherry-picks and --empty=keep: every patch keeps its commit, so commits map back to patches one to one.
    _git(repo, "rebase", "--merge", "--reapply-cherry-picks", "--empty=keep", "--no-rerere-autoupdate", "--onto",
         "upstream", "base", "series", check=False)
    return state


def _commit_all(repo: Path, message: str) -> None:
    _git(repo, "add", "-A", "-f")
    _git(repo, "commit", "-q", "--allow-empty", "--no-verify", "-m", message)


def _commit_release(repo: Path, pristine: Path, message: str) -> None:
    """Commit the package of `pristine` on top of `base` as branch `upstream`, straight from the cache (no copy)."""
    index = repo / ".git" / "upstream-index"
    # A separate index, git's directory named and the release's root as the work tree: the scratch work tree stays
    # on the series, and the cached release is only read.
    env = {"GIT_INDEX_FILE": str(index), "GIT_DIR": str(repo / ".git"), "GIT_WORK_TREE": str(pristine)}
    _git(pristine, "add", "-A", "-f", "--", PACKAGE_DIR.as_posix(), env=env)
    tree = _git(pristine, "write-tree", env=env).stdout.strip()
    index.unlink()
    commit = _git(repo, "commit-tree", tree, "-p", "base", "-m", message).stdout.strip()
    _git(repo, "branch", "upstream", commit)


def _continue_git(scratch: _Scratch) -> None:
    proc = _git(scratch.repo, "rebase", "--continue", check=False)
    if proc.returncode != 0 and not _unmerged(scratch.repo):
        raise PatchQueueError(
            f"`git rebase --continue` failed in {scratch.repo}:\n{proc.stdout}{proc.stderr}".rstrip()
            + "\nFix it there with git, then `make rebase CONTINUE=1`, or `make rebase ABORT=1`"
        )


def _go_on(root: Path, scratch: _Scratch, state: dict, patches: list[PatchFile]) -> RebaseReport:
    """After git stopped or finished: report the stop, or write the result into the checkout."""
    if scratch.rebasing():
        state["conflicts"].append(_stop_report(scratch, state, patches))
        scratch.save(state)
        done = _results(scratch, state, patches)
        return RebaseReport(done, waiting=[p.name for p in patches[len(done):]], stopped=True,
                            old=state["old"]["version"], new=state["new"]["version"])
    return _finish(root, scratch, state, patches)


def _finish(root: Path, scratch: _Scratch, state: dict, patches: list[PatchFile]) -> RebaseReport:
    """Every commit is in: stage the regenerated patches, then replace patches/ and move the pin (pin last)."""
    if state["phase"] != "writing":
        results = _results(scratch, state, patches)
        own = own_modules(root)
        _refuse_unrefreshed(root, own)  # the re-assembly below would drop edits made while the rebase waited
        shutil.rmtree(scratch.new, ignore_errors=True)
        (scratch.new / "patches").mkdir(parents=True)
        kept = []
        for patch, result in zip(patches, results):
            if result.status != "dropped":
                kept.append(patch.name)
                (scratch.new / "patches" / patch.name).write_text(result.regenerated.text(), encoding="utf-8")
        series = (scratch.old / "patches" / "series").read_text(encoding="utf-8")
        dropped = {r.patch for r in results if r.status == "dropped"}
        series = "".join(line for line in series.splitlines(True) if line.split("#", 1)[0].strip() not in dropped)
        (scratch.new / "patches" / "series").write_text(series, encoding="utf-8")
        state["results"] = [[r.patch, r.status, r.notes] for r in results]
        state["phase"] = "writing"
        scratch.save(state)
    results = [ApplyResult(name, status, notes) for name, status, notes in state["results"]]
    try:
        _install(root, scratch, state)
    except BaseException:
        # Interrupted in-process: put the checkout back as it was; `make rebase CONTINUE=1` writes it again.
        _restore_checkout(root, scratch, state)
        raise
    shutil.rmtree(scratch.dir)
    assemble(root, force=True, quiet=True)
    return RebaseReport(results, finished=True, old=state["old"]["version"], new=state["new"]["version"])


def _install(root: Path, scratch: _Scratch, state: dict) -> None:
    """Write the staged patches (each via a temporary file and a rename), remove the dropped ones, move the pin last:
    killed half way, the checkout still has the old pin, and `make rebase CONTINUE=1` / `ABORT=1` both recover."""
    staged = {p.name: p.read_text(encoding="utf-8") for p in (scratch.new / "patches").iterdir()}
    for name, text in staged.items():
        _atomic_write(root / "patches" / name, text)
    for name in state["series"]:
        if name not in staged:
            (root / "patches" / name).unlink(missing_ok=True)
    Pin(package=Pin.load(root).package, version=state["new"]["version"], sha256=state["new"]["sha256"]).save(root)


def _restore_checkout(root: Path, scratch: _Scratch, state: dict) -> None:
    """Put patches/ and upstream.toml back as they were when the rebase started."""
    for saved in (scratch.old / "patches").iterdir():
        _atomic_write(root / "patches" / saved.name, saved.read_text(encoding="utf-8"))
    _atomic_write(root / "upstream.toml", (scratch.old / "upstream.toml").read_text(encoding="utf-8"))
    state["phase"] = "rebasing"
    state.pop("results", None)
    scratch.save(state)


# Reading the scratch repository


def _unmerged(repo: Path) -> list[str]:
    return _git(repo, "diff", "--name-only", "--diff-filter=U").stdout.split("\n")[:-1]


def _marker_line(path: Path) -> int | None:
    """The first line of a conflict marker in `path` (1-based), or None."""
    if not path.is_file():
        return None
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if _CONFLICT_MARKER.match(line):
            return number
    return None


def _blob(repo: Path, rev: str, path: str, dest: Path) -> Path | None:
    """Write `rev:path` to `dest`; None when the file does not exist at `rev`."""
    proc = subprocess.run(["git", *_GIT_SETTINGS, "cat-file", "blob", f"{rev}:{path}"], cwd=repo, capture_output=True,
                          env=_git_env())
    if proc.returncode != 0:
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(proc.stdout)
    return dest


def _rebased_commits(repo: Path) -> list[tuple[str, str]]:
    """(sha, patch name) of the commits already replayed onto the new release, oldest first."""
    out = _git(repo, "log", "--reverse", "--format=%H %s", "upstream..HEAD").stdout
    return [tuple(line.split(" ", 1)) for line in out.splitlines()]


def _regenerate(repo: Path, sha: str, patch: PatchFile, workdir: Path) -> PatchFile:
    """The patch as its rebased commit's diff, in `file_diff` form, sections in the patch's order, header kept."""
    touched = _git(repo, "diff-tree", "--no-commit-id", "--name-only", "-r", sha).stdout.split()
    sections = {}
    for path in list(patch.sections) + [p for p in touched if p not in patch.sections]:
        old = _blob(repo, f"{sha}^", path, workdir / "old" / path)
        new = _blob(repo, sha, path, workdir / "new" / path)
        section = file_diff(path, old, new)
        if section:
            sections[path] = section
    return PatchFile(name=patch.name, header=patch.header, sections=sections)


_HUNK_HEADER = re.compile(r"(?m)^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@.*\n")


def _hunks(section: str) -> list[tuple[int, str]]:
    """(start line in the new file, body) of each hunk of a section."""
    matches = list(_HUNK_HEADER.finditer(section))
    return [
        (int(m.group(3)), section[m.end():matches[i + 1].start() if i + 1 < len(matches) else len(section)])
        for i, m in enumerate(matches)
    ]


def _classify(old: PatchFile, new: PatchFile, resolved: list[str]) -> ApplyResult:
    """Compare a regenerated patch with the one it came from: the same hunks (applied), the same hunk bodies at other
    lines (applied with offset), or other context or lines (merged three-way); empty: upstream has its changes."""
    if not new.sections:
        return ApplyResult(old.name, "dropped", ["it changes nothing on the new release: upstream has its changes"])
    if new.sections == old.sections and not resolved:
        return ApplyResult(old.name, "applied", [])
    notes, merged = [], bool(resolved)
    for path in new.sections:
        before, after = _hunks(old.sections.get(path, "")), _hunks(new.sections[path])
        if [b for _, b in before] != [b for _, b in after]:
            merged = True
            notes.append(f"{path}: merged three-way (upstream moved or changed lines in the context of its hunks)")
            continue
        for number, ((was, _), (now, _)) in enumerate(zip(before, after), 1):
            if was != now:
                notes.append(f"hunk #{number} of {path} at line {now} (offset {now - was} lines)")
    for path in old.sections:
        if path not in new.sections:
            merged = True
            notes.append(f"{path}: no longer changed by this patch (upstream has the change)")
    notes += [f"{path}: its conflict was resolved by hand" for path in resolved]
    return ApplyResult(old.name, "merged" if merged else "offset", notes)


def _results(scratch: _Scratch, state: dict, patches: list[PatchFile]) -> list[ApplyResult]:
    """One result per patch already rebased; a patch that stopped the rebase is reported as the conflict it met."""
    by_name = {p.name: p for p in patches}
    conflicts = {c["patch"]: c for c in state["conflicts"]}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (sha, name) in enumerate(_rebased_commits(scratch.repo)):
            new = _regenerate(scratch.repo, sha, by_name[name], Path(tmp) / str(index))
            if name in conflicts and state.get("dry_run"):
                # Resolved with the patch's side only to carry on: the report is the conflict it met.
                notes = conflicts[name]["notes"] + ["(dry run: taken with the patch's side to replay the later patches)"]
                results.append(ApplyResult(name, "conflict", notes))
                continue
            result = _classify(by_name[name], new, conflicts[name]["files"] if name in conflicts else [])
            result.regenerated = new
            results.append(result)
    if scratch.rebasing():
        results.append(ApplyResult(state["conflicts"][-1]["patch"], "conflict", state["conflicts"][-1]["notes"]))
    return results


def _stop_report(scratch: _Scratch, state: dict, patches: list[PatchFile]) -> dict:
    """What stopped the rebase: the patch, its conflicting files and regions, and the upstream hunks they met."""
    repo = scratch.repo
    name = _git(repo, "log", "-1", "--format=%s", "REBASE_HEAD").stdout.strip()
    files = _unmerged(repo)
    notes = []
    for path in files:
        notes += _describe_conflict(repo, path, state)
    return {"patch": name, "files": files, "notes": notes}


def _describe_conflict(repo: Path, path: str, state: dict) -> list[str]:
    old, new = state["old"]["version"], state["new"]["version"]
    work = repo / path
    if not work.is_file() or _marker_line(work) is None:
        return [f"{path}: upstream {old} -> {new} removed or renamed this file, or the patch did (decide with "
                "`git add` / `git rm` there)"]
    lines = work.read_text(encoding="utf-8", errors="replace").splitlines()
    # The conflicted file also holds the patch's changes that merged: map its lines to HEAD's (the new release with
    # the earlier patches), then HEAD's to the new release's, where upstream's own hunks are numbered.
    with tempfile.TemporaryDirectory() as tmp:
        head = _blob(repo, "HEAD", path, Path(tmp) / "head")
        to_head = _line_map(_run_diff(head, work))
    to_upstream = _line_map(_git(repo, "diff", "-U0", "--no-color", "upstream", "HEAD", "--", path).stdout)
    upstream_hunks = _diff_hunks(_git(repo, "diff", "-U0", "--no-color", "base", "upstream", "--", path).stdout)
    notes = []
    for start, end, ours_len in _conflict_blocks(lines):
        region = "\n".join("      " + line for line in lines[start - 1:end][:80])
        if end - start + 1 > 80:
            region += f"\n      ... ({end - start + 1 - 80} more lines)"
        notes.append(f"CONFLICT in {path}, lines {start}-{end} of the scratch repository's file:\n{region}")
        # The HEAD side of the block is lines start+1 .. start+ours_len; an empty side sits at the marker.
        first = to_upstream(to_head(start + 1 if ours_len else start))
        last = to_upstream(to_head(start + max(ours_len, 1)))
        met = [text for lo, hi, text in upstream_hunks if lo <= last + 1 and hi >= first - 1]
        if met:
            shown = "\n".join("      " + line for text in met for line in text.splitlines()[:60])
            notes.append(f"  the upstream change it met ({old} -> {new}, {path}):\n{shown}")
        else:
            notes.append(f"  no upstream change ({old} -> {new}) overlaps it: it meets a change of an earlier patch")
    return notes


def _conflict_blocks(lines: list[str]) -> list[tuple[int, int, int]]:
    """Each conflict block as (first line, last line) in the conflicted file and the length of its `ours` side (HEAD:
    the new release with the earlier patches), which starts on the line after the first."""
    blocks, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("<<<<<<<"):
            i += 1
            continue
        start, ours_len, side = i + 1, 0, "ours"
        i += 1
        while i < len(lines) and not lines[i].startswith(">>>>>>>"):
            if lines[i].startswith("|||||||") or lines[i].startswith("======="):
                side = "other"
            elif side == "ours":
                ours_len += 1
            i += 1
        blocks.append((start, i + 1, ours_len))
        i += 1
    return blocks


def _run_diff(old: Path | None, new: Path) -> str:
    """`diff -U0` of two files (no file: empty), for line maps."""
    proc = subprocess.run(["diff", "-U0", str(old or os.devnull), str(new)], capture_output=True, text=True)
    if proc.returncode > 1:
        raise PatchQueueError(f"diff failed on {new}: {proc.stderr}")
    return proc.stdout


def _diff_hunks(diff: str) -> list[tuple[int, int, str]]:
    """The hunks of a `-U0` diff as (first, last line on the new side, hunk text)."""
    hunks = []
    matches = list(_HUNK_HEADER.finditer(diff))
    for i, m in enumerate(matches):
        text = diff[m.start():matches[i + 1].start() if i + 1 < len(matches) else len(diff)]
        first, length = int(m.group(3)), int(m.group(4) if m.group(4) is not None else 1)
        hunks.append((first, first + max(length, 1) - 1, text))
    return hunks


def _line_map(diff: str):
    """A function from a line number of a `-U0` diff's new side to the matching line of its old side."""
    spans = []
    for m in _HUNK_HEADER.finditer(diff):
        a_start, a_len = int(m.group(1)), int(m.group(2) if m.group(2) is not None else 1)
        b_start, b_len = int(m.group(3)), int(m.group(4) if m.group(4) is not None else 1)
        spans.append((a_start, a_len, b_start, b_len))

    def to_old(line: int) -> int:
        shift = 0
        for a_start, a_len, b_start, b_len in spans:
            # A side of length 0 sits after its start line: the lines it stands for begin one later.
            b_first = b_start if b_len else b_start + 1
            if line < b_first:
                break
            if line < b_first + b_len:
                return a_start if a_len else a_start + 1
            shift = (a_start + a_len if a_len else a_start + 1) - (b_first + b_len)
        return line + shift

    return to_old


def _take_patch_side(scratch: _Scratch, files: list[str]) -> None:
    """Dry run only: resolve each conflict block with the patch's side, so the later patches are replayed on it."""
    for path in files:
        work = scratch.repo / path
        if work.is_file() and _marker_line(work):
            kept, side = [], "common"
            for line in work.read_text(encoding="utf-8").splitlines(True):
                if line.startswith("<<<<<<<"):
                    side = "ours"
                elif line.startswith("|||||||") and side == "ours":
                    side = "base"
                elif line.startswith("=======") and side in ("ours", "base"):
                    side = "theirs"
                elif line.startswith(">>>>>>>") and side == "theirs":
                    side = "common"
                elif side in ("common", "theirs"):
                    kept.append(line)
            work.write_text("".join(kept), encoding="utf-8")
        _git(scratch.repo, "add", "-A", "--", path)


# --------------------------------------------------------------------------------------------------------------------
# clean


def clean(root: Path) -> None:
    """Remove the assembled files of src/transformers and the assembly stamp; the own modules stay where they are."""
    package = root / PACKAGE_DIR
    if package.is_dir():
        keep = {root / path for path in own_modules(root)}
        for dirpath, dirnames, filenames in os.walk(package, topdown=False):
            for name in filenames:
                if Path(dirpath) / name not in keep:
                    os.unlink(Path(dirpath) / name)
            for name in dirnames:
                if not any((Path(dirpath) / name).iterdir()):
                    (Path(dirpath) / name).rmdir()
        if not any(package.iterdir()):
            package.rmdir()
    _stamp_path(root).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    """Replace `path` by `text` in one step; an unchanged file is left alone (its mtime is what make compares)."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    umask = os.umask(0)
    os.umask(umask)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _rebase_command(root: Path, args: argparse.Namespace) -> int:
    """Run a rebase step and print its report; exit status 1 while a conflict is open (or reported by a dry run)."""
    if args.abort:
        print(f"patchq rebase: {rebase_abort(root)}")
        return 0
    if args.go_on:
        report = rebase_continue(root)
    elif args.version and args.sha256:
        report = rebase(root, args.version, args.sha256, dry_run=args.dry_run)
    else:
        raise PatchQueueError("give VERSION and SHA256 (the new release), or --continue, or --abort")
    for result in report.results:
        print(result.describe())
    if report.stopped:
        conflict = report.results[-1]
        scratch = REBASE_DIR / "repo"
        files = [path for path in _Scratch(root / REBASE_DIR).load()["conflicts"][-1]["files"]]
        if report.waiting:
            print(f"not replayed yet (they follow the resolution): {', '.join(report.waiting)}")
        print(
            f"patchq rebase: stopped at a conflict of {conflict.patch} onto {report.new}; patches/ and the pin "
            f"({report.old}) are untouched.\n"
            f"  Resolve it: edit {', '.join(str(scratch / path) for path in files)} (remove the conflict markers, keep "
            "upstream's change and the patch's),\n"
            f"  optionally `git -C {scratch} add <file>`, then `make rebase CONTINUE=1` (patchq rebase --continue).\n"
            "  Or drop the rebase: `make rebase ABORT=1` (patchq rebase --abort).",
            file=sys.stderr,
        )
        return 1
    if report.finished:
        print(f"patchq rebase: moved from {report.old} to {report.new}; patches regenerated, src/transformers reassembled")
        return 0
    conflicts = [r.patch for r in report.results if r.status == "conflict"]
    if conflicts:
        print(
            f"patchq rebase: {len(conflicts)} conflict(s) onto {report.new} (dry run; the pin stays at {report.old}): "
            f"{', '.join(conflicts)}",
            file=sys.stderr,
        )
        return 1
    print(f"patchq rebase: the series goes onto {report.new} (dry run; the pin stays at {report.old})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchq", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (default: this checkout)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="download, verify and unpack the pinned release")
    p = sub.add_parser("assemble", help="build src/transformers from pristine + patches/series")
    p.add_argument("--force", action="store_true", help="discard edits of src/transformers that are not in patches")
    p.add_argument("--quiet", action="store_true")
    sub.add_parser("check", help="validate the series, the headers and that src/transformers has no unrefreshed edit")
    sub.add_parser("diff", help="print the review diff of src/transformers against pristine")
    p = sub.add_parser("refresh", help="write edits of src/transformers back into patches/")
    p.add_argument("--patch", help="the patch that takes the edits (default: the last patch touching each file)")
    p.add_argument("--new", help="start a new patch with this name, appended to the series, for the edits")
    p = sub.add_parser("rebase", help="move the series onto another release (a three-way git rebase)")
    p.add_argument("version", nargs="?")
    p.add_argument("sha256", nargs="?")
    p.add_argument("--dry-run", action="store_true", help="report only; change neither the pin nor the patches")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--continue", dest="go_on", action="store_true",
                       help=f"go on after resolving a conflict in {REBASE_DIR}/repo")
    steps.add_argument("--abort", action="store_true", help="drop the rebase in progress; nothing changes")
    sub.add_parser("clean", help="remove the assembled files of src/transformers (the own modules stay)")
    p = sub.add_parser("pr-series", help="export the patches proposed upstream as a `git format-patch` series")
    p.add_argument("--out", type=Path, default=None, help=f"output directory (default: {PR_SERIES_DIR})")
    p.add_argument("--author", help="'Name <email>' for the commits (default: git's user.name and user.email)")
    args = parser.parse_args(argv)
    root = args.root.resolve()

    try:
        if args.command == "fetch":
            print(fetch(root))
        elif args.command == "assemble":
            assemble(root, force=args.force, quiet=args.quiet)
        elif args.command == "check":
            problems = check(root)
            for problem in problems:
                print(f"patchq check: {problem}", file=sys.stderr)
            if problems:
                return 1
            print(
                f"patchq check: OK ({len(read_series(root))} patches apply exactly; no unrefreshed edits; "
                f"own modules: {len(own_modules(root))})"
            )
        elif args.command == "diff":
            sys.stdout.write(review_diff(root))
        elif args.command == "refresh":
            lines = refresh(root, into=args.patch, new=args.new)
            print("\n".join(lines) if lines else "patchq refresh: nothing to refresh")
        elif args.command == "rebase":
            return _rebase_command(root, args)
        elif args.command == "clean":
            clean(root)
        elif args.command == "pr-series":
            out = args.out or root / PR_SERIES_DIR
            summary = pr_series(root, out, author=args.author)
            print(
                f"patchq pr-series: {summary['commits']} commits in {out} ({', '.join(summary['own_modules'])} and "
                f"{len(summary['patches'])} patches; +{summary['upstream_lines_added']} / "
                f"-{summary['upstream_lines_removed']} lines in upstream files), applied with `git am` on pristine "
                f"{summary['release']}; description: {out / 'PR.md'}"
            )
    except PatchQueueError as e:
        print(f"patchq {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
