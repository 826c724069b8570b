"""Run every workload on every system, side by side, and write the table.

    ./scripts/bench            (or: .bench-venv/bin/python -m benchmarks [SYSTEM ...])

The peers and neonnb need different redis-py versions (arq and others pin redis<6; neonnb's
Redis driver is built on redis-py 8), so they run from two virtualenvs: the peers from this
interpreter's (`pip install -e '.[bench]'`), neonnb's rows from the interpreter named by
$NEONNB_BENCH_PYTHON, by default the test venv's `.venv/bin/python` (`./scripts/test`
makes it), which has every neonnb extra.

Every (system, workload) runs in a fresh process against a fresh store: memory, a new SQLite
file, a new database on one throwaway PostgreSQL server (fsync on) that all PostgreSQL
systems share, or one throwaway redis-server flushed before each run. The table goes to
stdout and benchmarks/RESULTS.md. `python -m benchmarks neonnb huey` runs only those systems.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from redis import Redis

from tests.services import PostgresServer, RedisServer

HERE = Path(__file__).resolve().parent
WORKLOADS = ["w1_one", "w1_batch", "w2", "w3", "w4", "w5"]
# (row label, system, store)
ROWS = [
    ("asyncio.Queue(maxsize=1) ceiling", "asyncio-ceiling", "none"),
    ("neonnb memory", "neonnb", "memory"),
    ("neonnb SQLite", "neonnb", "sqlite"),
    ("huey SQLite", "huey", "sqlite"),
    ("neonnb PostgreSQL", "neonnb", "postgres"),
    ("pgqueuer PostgreSQL", "pgqueuer", "postgres"),
    ("procrastinate PostgreSQL", "procrastinate", "postgres"),
    ("redis-benchmark ceiling (LPUSH, PING)", "redis-ceiling", "redis"),
    ("neonnb Redis", "neonnb", "redis"),
    ("huey Redis", "huey", "redis"),
    ("RQ Redis (SimpleWorker)", "rq", "redis"),
    ("arq Redis", "arq", "redis"),
    ("SAQ Redis", "saq", "redis"),
    ("taskiq Redis (ListQueueBroker)", "taskiq", "redis"),
    ("Dramatiq Redis", "dramatiq", "redis"),
    ("Celery Redis (threads pool)", "celery", "redis"),
]
REDIS_PEERS = [label for label, system, store in ROWS if store == "redis" and system not in ("neonnb", "redis-ceiling")]


def python_for(system: str) -> str:
    """The interpreter a system's rows run with (see the module docstring)."""
    if system != "neonnb":
        return sys.executable
    chosen = os.environ.get("NEONNB_BENCH_PYTHON") or str(HERE.parent / ".venv" / "bin" / "python")
    if not Path(chosen).exists():
        raise SystemExit(f"neonnb's rows run with {chosen}, which does not exist: run ./scripts/test once (it "
                         "makes .venv), or set NEONNB_BENCH_PYTHON to a Python that has neonnb[redis,postgres]")
    return chosen


def run_one(system: str, workload: str, url: str) -> dict[str, Any]:
    proc = subprocess.run(
        [python_for(system), "-m", "benchmarks.workloads", system, workload, url],
        capture_output=True, text=True, timeout=600, cwd=HERE.parent,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return ""
    if "async_jobs_per_s" in result:
        return f"{result['jobs_per_s']:,.0f} (async {result['async_jobs_per_s']:,.0f})"
    if "jobs_per_s" in result:
        return f"{result['jobs_per_s']:,.0f}"
    if "p50_ms" in result:
        return f"{result['p50_ms']:.2f} / {result['p99_ms']:.2f}"
    return next(iter(result.values())) if "n/a" in result else f"error: {result.get('error', '?')[:60]}"


def main() -> None:
    only = set(sys.argv[1:])
    postgres = PostgresServer(fsync=True)
    redis_server = RedisServer()
    calls_server = RedisServer()  # what W5's jobs call: a server of its own, beside every store
    os.environ["BENCH_CALL_PORT"] = str(calls_server.port)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="neonnb-bench-") as tmp:
            for label, system, store in ROWS:
                if only and system not in only and label not in only:
                    continue
                results[label] = {}
                for workload in WORKLOADS if system != "asyncio-ceiling" else ["w2"]:
                    url = {
                        "none": "-",
                        "memory": "memory://",
                        "sqlite": f"sqlite:///{tmp}/{system}-{workload}-{time.monotonic_ns()}.db",
                        "postgres": postgres.new_database() if store == "postgres" else "",
                        "redis": redis_server.url(),
                    }[store]
                    if store == "redis":
                        Redis(port=redis_server.port).flushall()  # a fresh store for every run
                    results[label][workload] = run_one(system, workload, url)
                    print(f"{label:28} {workload:9} {cell(results[label][workload])}", file=sys.stderr, flush=True)
    finally:
        postgres.stop()
        redis_server.stop()
        calls_server.stop()
    table = render(results)
    print(table)
    if not only:
        (HERE / "RESULTS.md").write_text(table)


def render(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores, Python {platform.python_version()}, "
        "one run of `python -m benchmarks`. neonnb's W1 one-by-one: the sync `dispatch` (the async "
        "`adispatch` in brackets); ratios use the sync one.",
        "",
        "| system | W1 one-by-one jobs/s | W1 batch jobs/s | W2 drain jobs/s | W3 latency p50 / p99 ms "
        "| W4 sleep-10ms jobs/s | W5 blocking-call jobs/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, row in results.items():
        lines.append(f"| {label} | " + " | ".join(cell(row.get(w)) for w in WORKLOADS) + " |")
    lines += ["", "Ratios from the same run:", ""]
    lines += [f"- {text}" for text in ratios(results)]
    return "\n".join(lines) + "\n"


def ratios(results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    def value(label: str, workload: str) -> float | None:
        found = results.get(label, {}).get(workload, {})
        number = found.get("jobs_per_s", found.get("p50_ms"))
        return float(number) if number is not None else None

    out = []
    ceiling, memory = value("asyncio.Queue(maxsize=1) ceiling", "w2"), value("neonnb memory", "w2")
    if ceiling and memory:
        out.append(f"neonnb memory W2 / asyncio ceiling = {memory / ceiling:.0%} (target at least 25%)")
    for ours, peers in (("neonnb PostgreSQL", ["pgqueuer PostgreSQL", "procrastinate PostgreSQL"]),
                        ("neonnb SQLite", ["huey SQLite"]),
                        ("neonnb Redis", REDIS_PEERS)):
        for workload in WORKLOADS:
            mine = value(ours, workload)
            theirs = {peer: v for peer in peers if (v := value(peer, workload))}
            if not mine or not theirs:
                continue
            if workload == "w3":  # latency: lower is better
                best = min(theirs, key=theirs.__getitem__)
                out.append(f"{ours} on w3: p50 {mine:.2f} ms, best peer {best} {theirs[best]:.2f} ms "
                           f"({theirs[best] / mine:.2f}x)")
            else:
                best = max(theirs, key=theirs.__getitem__)
                out.append(f"{ours} on {workload}: {mine / theirs[best]:.2f}x the best peer ({best})")
        w4 = value(ours, "w4")
        if w4:
            out.append(f"{ours} on w4: {w4 / 5000:.0%} of the ideal 5,000 jobs/s")
    return out


if __name__ == "__main__":
    main()
