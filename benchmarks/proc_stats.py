"""Per-process figures from /proc, shared by the benchmarks (Linux only)."""


def proc_status_kb(field: str) -> int:
    """A kB field of /proc/self/status (e.g. VmHWM, VmRSS, RssAnon), 0 when absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0
