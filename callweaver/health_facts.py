"""What /health and /ping report that needs no app: the clock, this process's memory, the ping body. Import-light:
the worker's loader (callweaver/boot.py) answers with them while the app itself is still loading."""
from __future__ import annotations

import time
from datetime import datetime, timezone

SERVICE_NAME = "Call Flow Weaver Backend"
KIB_PER_MIB = 1024
# When this process began serving as CallWeaver (this module is among the first the worker imports): /health's
# uptime counts from here whether the loader or the loaded app answers, as the original's process.uptime() did.
PROCESS_STARTED_AT = time.time()


def uptime_s() -> float:
    """Seconds since PROCESS_STARTED_AT (/health's `uptime`)."""
    return round(time.time() - PROCESS_STARTED_AT, 3)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def memory_mb() -> tuple[float, float]:
    """Resident set size of this worker and total machine memory, from /proc (MB)."""
    rss_kb = total_kb = 0
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss_kb = int(line.split()[1])
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    total_kb = int(line.split()[1])
    except OSError:
        pass
    return rss_kb / KIB_PER_MIB, total_kb / KIB_PER_MIB


def memory_body() -> dict[str, str]:
    """/health's `memory` field, as the original backend shaped it."""
    used, total = memory_mb()
    return {"used": f"{round(used)} MB", "total": f"{round(total)} MB"}


def ping_body() -> dict:
    return {"pong": True, "timestamp": int(time.time() * 1000)}
