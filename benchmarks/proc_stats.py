"""Per-process figures from /proc, shared by the benchmarks (Linux only)."""

from __future__ import annotations

import threading


def proc_status_kb(field: str) -> int:
    """A kB field of /proc/self/status (e.g. VmHWM, VmRSS, RssAnon), 0 when absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def resident_kb() -> dict[str, int]:
    """This process's resident memory in kB: `anon` (heap, tensors: cannot be reclaimed without swap), `file` (mapped
    file pages, e.g. an mmapped checkpoint: clean, the kernel can drop them) and `shmem`, from /proc/self/status."""
    out = {"anon": 0, "file": 0, "shmem": 0}
    with open("/proc/self/status") as f:
        for line in f:
            for key, field in (("anon", "RssAnon:"), ("file", "RssFile:"), ("shmem", "RssShmem:")):
                if line.startswith(field):
                    out[key] = int(line.split()[1])
    return out


class ResidentSampler:
    """Samples `resident_kb()` in a thread while it runs (a context manager) and keeps the peaks: of anonymous memory,
    of file-backed memory, and of their sum. The kernel keeps a high-water mark of RSS only (VmHWM), not of its parts;
    a sample every `interval` seconds can miss a spike shorter than that."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = {"anon": 0, "file": 0, "total": 0}
        self.at_peak_total = {"anon": 0, "file": 0}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = None

    def _sample(self):
        rss = resident_kb()
        total = rss["anon"] + rss["file"] + rss["shmem"]
        self.samples += 1
        self.peak["anon"] = max(self.peak["anon"], rss["anon"])
        self.peak["file"] = max(self.peak["file"], rss["file"])
        if total > self.peak["total"]:
            self.peak["total"] = total
            self.at_peak_total = {"anon": rss["anon"], "file": rss["file"]}

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        return False
