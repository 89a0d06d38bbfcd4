"""The worker side of bench/idle_call_memory.py (loaded by bench/memory_probe_conf.py): what the worker holds, by
object type and by allocation site, measured between the harness's phases. Bench-only."""
from __future__ import annotations

import collections
import gc
import sys
import sysconfig
import threading
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STDLIB = sysconfig.get_paths()["stdlib"]
APP_FILES = (str(REPO / "callweaver") + "/", str(REPO / "bench" / "naive_relay.py"))
PROBE_FILES = (__file__, tracemalloc.__file__, str(REPO / "bench" / "memory_probe_conf.py"))


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def trimmed_rss_kib() -> int | None:
    """RSS once glibc has handed its free heap memory back (malloc_trim): what the allocator keeps but nobody uses
    is the difference to the plain RSS. None off glibc."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return rss_kib()


def memory_kinds_kib() -> dict[str, int]:
    """RSS by kind of mapping (/proc/self/smaps): glibc's heap (`[heap]`), other anonymous memory (pymalloc's 1 MiB
    arenas, glibc's large mmapped blocks, each greenlet's own chunk of Python frames — CPython 3.11 gives every
    greenlet a 16 KiB mmapped frame stack, of which the touched pages count), and mapped files."""
    import re
    kinds = collections.Counter()
    kind = "file"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$", line)
        if head:
            name = head.group(1)
            kind = "heap" if name == "[heap]" else "anon" if not name else "stack" if name.startswith("[") else "file"
        elif line.startswith("Rss:"):
            kinds[kind] += int(line.split()[1])
    return dict(kinds)


def malloc_kib() -> dict[str, int] | None:
    """glibc's own account (mallinfo2): bytes in use and free in its heap, bytes in its mmapped blocks. None off
    glibc."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return {"in_use": info.uordblks // 1024, "free": info.fordblks // 1024, "mmapped": info.hblkhd // 1024}


PYMALLOC_LINES = {"# arenas allocated current": "arenas", "# bytes in allocated blocks": "allocated",
                  "# bytes in available blocks": "available"}


def pymalloc_stats() -> dict[str, int]:
    """pymalloc's own account (sys._debugmallocstats, which writes to fd 2): arenas held, bytes in live small blocks,
    bytes in free blocks of partly used pools (fragmentation)."""
    import os
    import re
    import tempfile
    with tempfile.TemporaryFile("w+") as out:
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read()
    stats = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        name = PYMALLOC_LINES.get(key.strip())
        if name:
            stats[name] = int(re.sub(r"[^0-9]", "", value))
    stats["unused_pools"] = sum(int(m.group(1)) * int(m.group(2)) for m in
                                re.finditer(r"^(\d+) unused pools \* (\d+) bytes", text, re.M))
    return stats


def type_counts() -> dict[str, int]:
    """gc-tracked objects by type (containers: dicts, lists, instances, frames, greenlets; not str/bytes/int)."""
    counts: collections.Counter = collections.Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        counts[f"{kind.__module__}.{kind.__qualname__}"] += 1
    return dict(counts)


def short(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1]
    if filename.startswith(str(REPO) + "/"):
        return filename[len(str(REPO)) + 1:]
    if filename.startswith(STDLIB + "/"):
        return "stdlib/" + filename[len(STDLIB) + 1:]
    return filename


def is_stdlib(filename: str) -> bool:
    return (filename.startswith(STDLIB) and "site-packages" not in filename) or filename.startswith("<")


def package(filename: str) -> str:
    name = short(filename)
    if name.startswith("callweaver/"):
        return "/".join(name.split("/")[:2]) if name.count("/") >= 2 else name  # callweaver/engine, callweaver/app.py
    return name.split("/", 1)[0] if "/" in name else name


def labels(traceback: tracemalloc.Traceback) -> tuple[str, str, str]:
    """(innermost app frame, first frame outside the standard library, its package), innermost first."""
    inner_first = list(traceback)[::-1]  # tracemalloc lists the oldest frame first
    app = next((f"{short(f.filename)}:{f.lineno}" for f in inner_first if f.filename.startswith(APP_FILES)), "—")
    owner = next((f for f in inner_first if not is_stdlib(f.filename)), inner_first[0] if inner_first else None)
    if owner is None:
        return app, "?", "?"
    return app, f"{short(owner.filename)}:{owner.lineno}", package(owner.filename)




def answer(command: dict) -> dict:
    """One probe command (see bench/memory_probe_conf.py)."""
    cmd = command.get("cmd")
    garbage = gc.collect()
    if cmd == "counts":
        from greenlet import greenlet
        greenlets = sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet))
        rss = rss_kib()
        kinds, malloc = memory_kinds_kib(), malloc_kib()
        return {"garbage": garbage, "rss_kib": rss, "kinds": kinds, "malloc": malloc, "rss_trimmed_kib": trimmed_rss_kib(), "pymalloc": pymalloc_stats(), "types": type_counts(), "greenlets": greenlets,
                "threads": threading.active_count(), "gc_frozen": gc.get_freeze_count()}
    if cmd == "trace_start":
        tracemalloc.start(int(command.get("frames", 30)))
        return {"ok": True}
    if cmd == "trace_top":
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, name) for name in PROBE_FILES])
        tracemalloc.stop()
        calls = max(1, int(command.get("calls", 1)))
        by_site: collections.Counter = collections.Counter()
        by_site_blocks: collections.Counter = collections.Counter()
        by_package: collections.Counter = collections.Counter()
        by_app: collections.Counter = collections.Counter()
        total = 0
        for stat in snapshot.statistics("traceback"):
            app, owner, pkg = labels(stat.traceback)
            by_site[(app, owner)] += stat.size
            by_site_blocks[(app, owner)] += stat.count
            by_package[pkg] += stat.size
            by_app[app] += stat.size
            total += stat.size
        limit = int(command.get("limit", 40))
        per = lambda n: round(n / calls, 1)  # noqa: E731
        return {
            "total_bytes_per_call": per(total),
            "sites": [[app, owner, per(size), per(by_site_blocks[(app, owner)])]
                      for (app, owner), size in by_site.most_common(limit)],
            "packages": [[pkg, per(size)] for pkg, size in by_package.most_common(limit)],
            "app_frames": [[app, per(size)] for app, size in by_app.most_common(limit)],
        }
    if cmd == "stacks":
        return {"stacks": waiting_stacks(int(command.get("samples", 2)))}
    if cmd == "sockets":
        return {"sockets": socket_peers()}
    return {"error": f"unknown command {cmd!r}"}


def socket_peers() -> dict[str, int]:
    """Open sockets by role: accepted from a client of the server's port, or outbound to a port."""
    import socket
    counts: collections.Counter = collections.Counter()
    for obj in gc.get_objects():
        if isinstance(obj, socket.socket):
            try:
                local, peer = obj.getsockname(), obj.getpeername()
                counts[f"local {local[1]} ↔ peer {peer[1] if peer[1] < 30000 else 'ephemeral'}"] += 1
            except (OSError, IndexError, TypeError):
                counts["unconnected or closed"] += 1
    return dict(counts)


def waiting_stacks(samples: int) -> list[list[str]]:
    """The Python frames of a few idle greenlets, innermost last (how deep each call's greenlets wait)."""
    from greenlet import greenlet
    stacks: dict[tuple, list[str]] = {}
    for obj in gc.get_objects():
        if isinstance(obj, greenlet) and obj.gr_frame is not None:
            frames, frame = [], obj.gr_frame
            while frame is not None:
                frames.append(f"{short(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}")
                frame = frame.f_back
            key = tuple(f.split(":")[0] for f in frames)
            stacks.setdefault(key, frames[::-1])
    return sorted(stacks.values(), key=len, reverse=True)[:samples * 4]
