"""Shared helpers for the benchmarks: medians, and peak RSS of a whole process tree."""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time


def median(xs):
    return statistics.median(xs)


def sibling(name: str):
    """Another benchmark file of this folder as a module, loaded by path (benchmarks are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(os.path.dirname(__file__), f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
        except (OSError, ValueError, IndexError):
            pass
    total, todo = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * page
        except OSError:
            pass
        todo.extend(children.get(p, []))
    return total


def run_with_peak_rss(cmd: list[str], **kw) -> tuple[subprocess.CompletedProcess, int, float]:
    """Run ``cmd``; return (result, peak RSS of its process tree in bytes, wall seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    peak = 0
    stop = threading.Event()

    def poll():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.05)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, err = proc.communicate()
    stop.set()
    th.join()
    wall = time.perf_counter() - t0
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peak, wall
