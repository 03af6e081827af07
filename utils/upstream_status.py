#!/usr/bin/env python3
"""Whether the fork is behind its upstreams, and whether the series would merge onto the newest transformers.

    make upstream-status                 # a table, then one line saying what to do
    python utils/upstream_status.py --json

Asks the package registry pip is configured with (by package name, `pip index versions`) for the newest release of
transformers, accelerate, DeepSpeed and torch, and compares each with the fork's pins (`upstream.toml` for
transformers, `requirements/constraints.txt` for the rest). When a newer transformers exists, its sdist is fetched
with pip and the patch series is rebased onto it as a dry run (`patchq rebase VERSION SHA256 --dry-run`: three-way,
nothing in the checkout changes), so that a scheduled job can say when to move and whether a person must resolve
conflicts first. Exit status 0 whatever the answer; 2 when a question could not be asked (no registry, pip failed).

Only the standard library is used, like utils/patchq.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = Path("requirements") / "constraints.txt"  # relative to the repository root
PACKAGES = ("transformers", "accelerate", "deepspeed", "torch")


class StatusError(Exception):
    """A question the registry or pip could not answer."""


def pinned_versions(root: Path) -> dict[str, str]:
    """transformers from upstream.toml; the training stack from the constraints file (`name==version` lines)."""
    with open(root / "upstream.toml", "rb") as f:
        pins = {"transformers": tomllib.load(f)["version"]}
    for line in (root / CONSTRAINTS).read_text(encoding="utf-8").splitlines():
        match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s#;]+)", line)
        if match and match.group(1).lower() in PACKAGES:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def newest_release(package: str) -> str:
    """The newest version the registry offers for `package` (pre-releases left out, as pip's resolver does)."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", package, "--disable-pip-version-check"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    match = re.search(rf"^{re.escape(package)} \(([^)]+)\)", proc.stdout, re.M | re.I)
    if proc.returncode != 0 or not match:
        raise StatusError(f"`pip index versions {package}` failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return match.group(1)


def _version_key(version: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"[.+-]", version))


def sdist_sha256(package: str, version: str) -> str:
    """Fetch the sdist with pip (by name, as patchq does) and return its sha256, for the dry-run rebase."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "--disable-pip-version-check", "-d", tmp, f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        files = list(Path(tmp).glob(f"{package}-{version}.tar.gz"))
        if proc.returncode != 0 or not files:
            raise StatusError(f"could not fetch the {package} {version} sdist: {proc.stderr.strip()[-500:]}")
        return hashlib.sha256(files[0].read_bytes()).hexdigest()


def dry_run_rebase(root: Path, version: str, sha256: str) -> dict:
    """`patchq rebase --dry-run` onto `version`: whether every patch merges, and the report lines."""
    cmd = [sys.executable, str(root / "utils" / "patchq.py"), "--root", str(root), "rebase", version, sha256,
           "--dry-run"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    report = proc.stdout.strip().splitlines()
    conflicts = [line.split(":", 1)[0] for line in report if re.match(r"\S+\.patch: CONFLICT", line)]
    return {"merges": proc.returncode == 0, "conflicts": conflicts, "report": report,
            "error": proc.stderr.strip()[-2000:] if proc.returncode not in (0, 1) else ""}


def status(root: Path, rebase: bool = True) -> dict:
    pins = pinned_versions(root)
    packages = {}
    for package in PACKAGES:
        newest = newest_release(package)
        pinned = pins.get(package)
        behind = pinned is None or _version_key(newest) > _version_key(pinned)
        packages[package] = {"pinned": pinned, "newest": newest, "behind": behind}
    result = {"packages": packages}
    transformers = packages["transformers"]
    if rebase and transformers["behind"]:
        sha256 = sdist_sha256("transformers", transformers["newest"])
        result["rebase"] = {"version": transformers["newest"], "sha256": sha256,
                            **dry_run_rebase(root, transformers["newest"], sha256)}
    return result


def verdict(result: dict) -> str:
    """One line a scheduled job can print or match."""
    transformers = result["packages"]["transformers"]
    if not transformers["behind"]:
        return f"up to date with transformers {transformers['newest']}"
    rebase = result.get("rebase")
    if rebase is None:
        return f"transformers {transformers['newest']} is out (pinned {transformers['pinned']}); rebase not tried"
    command = f"make rebase VERSION={rebase['version']} SHA256={rebase['sha256']}"
    if rebase["merges"]:
        return f"transformers {rebase['version']} is out and the series merges onto it: {command}"
    if rebase["conflicts"]:
        return (f"transformers {rebase['version']} is out; the series conflicts in {', '.join(rebase['conflicts'])}: "
                f"{command}, resolve, then make rebase CONTINUE=1")
    return f"transformers {rebase['version']} is out; the dry-run rebase failed: {rebase['error']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (default: this checkout)")
    parser.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    parser.add_argument("--no-rebase", action="store_true", help="only compare versions, no dry-run rebase")
    args = parser.parse_args(argv)
    try:
        result = status(args.root.resolve(), rebase=not args.no_rebase)
    except (StatusError, subprocess.TimeoutExpired) as e:
        print(f"upstream-status: error: {e}", file=sys.stderr)
        return 2
    result["verdict"] = verdict(result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'package':<14}{'pinned':<12}{'newest':<12}")
    for package, entry in result["packages"].items():
        print(f"{package:<14}{entry['pinned'] or '-':<12}{entry['newest']:<12}{'behind' if entry['behind'] else ''}")
    for line in result.get("rebase", {}).get("report", []):
        print(f"  {line}")
    print(f"upstream-status: {result['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
