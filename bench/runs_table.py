"""One row per saved `python -m bench.relay` report: the figures docs/performance.md compares across runs.

    python -m bench.relay > run1.md          # ... several runs, possibly on different code or settings
    python -m bench.runs_table "run 1=run1.md" "NullCache=null.md"

Every number is read from the reports as they were printed; nothing is recomputed.
"""
import argparse
import re
import sys
from pathlib import Path

DISTRIBUTIONS = (  # report row label (start) → column title
    ("added latency, server", "added p50 / p95 / p99 ms"),
    ("server first token − TTFT the fake delivered", "server − fake TTFT p50 / p95 / p99 ms"),
    ("client first token − TTFT the fake delivered", "client − fake TTFT p50 / p95 / p99 ms"),
)


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def row_of(label: str, text: str) -> list[str]:
    for line in text.splitlines():
        if line.startswith("|") and cells(line)[0].startswith(label):
            return cells(line)
    return []


def summarize(name: str, text: str) -> list[str]:
    machine = re.search(r"Machine: \d{4}-\d\d-\d\d (\d\d:\d\d)", text)
    out = [name, machine.group(1) if machine else "—"]
    backend = row_of("reply cache backend", text)
    out.append(backend[1] if backend else "— (not reported)")
    for label, _ in DISTRIBUTIONS:
        row = row_of(label, text)
        out.append(" / ".join(row[2:5]) if row else "—")
    cpu = row_of("worker CPU per completed turn", text)
    out.append(cpu[1] if cpu else "—")
    share = row_of("CPU during the talk phase", text)
    out.append(share[1].split(" / ")[0] if share else "—")
    errors = row_of("errors", text)
    out.append(errors[1] if errors else "—")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="LABEL=REPORT", help="a label and a saved bench.relay report")
    args = parser.parse_args(argv)
    headers = ["run", "report time (UTC)", "reply cache", *(title for _, title in DISTRIBUTIONS),
               "worker CPU per turn", "worker CPU (cores)", "errors"]
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for spec in args.runs:
        label, sep, path = spec.rpartition("=")
        if not sep:
            raise SystemExit(f"want LABEL=REPORT, got {spec!r}")
        print("| " + " | ".join(summarize(label, Path(path).read_text())) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
