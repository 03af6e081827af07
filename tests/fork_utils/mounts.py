"""A tmpfs mounted at a directory for a test: saving into the root of a mounted volume (a common `output_dir`).

Needs root and a kernel that lets the test mount (no container policy forbidding it); `mount_tmpfs` says why it could
not, for the test to skip with that reason.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def mount_tmpfs(directory: str | Path, size: str = "64m") -> str | None:
    """Mount a fresh tmpfs at `directory` (created if missing). Returns None once mounted, else why it could not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`mount -t tmpfs` could not run: {e}"
    if done.returncode != 0:
        return f"`mount -t tmpfs` failed: {(done.stderr or done.stdout).strip()}"
    if not os.path.ismount(directory):
        unmount(directory)
        return f"`mount -t tmpfs` succeeded but {directory} is not a mount point"
    return None


def remount_tmpfs(directory: str | Path, size: int) -> str | None:
    """Resize the tmpfs mounted at `directory` to `size` bytes (a full disk for a test). None once done, else why not."""
    done = subprocess.run(["mount", "-o", f"remount,size={size}", str(directory)], capture_output=True, text=True,
                          timeout=30, check=False)
    if done.returncode != 0:
        return f"`mount -o remount,size={size}` failed: {(done.stderr or done.stdout).strip()}"
    return None


def used_bytes(directory: str | Path) -> int:
    """The bytes in use on the file system of `directory`."""
    stats = os.statvfs(directory)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


def unmount(directory: str | Path) -> None:
    """Unmount `directory` (lazily if something still holds it open)."""
    if subprocess.run(["umount", str(directory)], capture_output=True, timeout=30).returncode != 0:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True, timeout=30)
