"""What would exact O(1) counts cost the hot path? Counters kept by triggers (the way that
keeps them exact on every path) against none, side by side in one run, on a throwaway
PostgreSQL (fsync on) and an in-memory SQLite:

    .venv/bin/python -m benchmarks.count_triggers

PostgreSQL: statement-level triggers reading transition tables, each session adding to a
counter row of its own (no lock queue between sessions); SQLite: row-level triggers. Each
round: one-row inserts, and claims of 10 followed by their acknowledgement and a heartbeat.
Medians of 5 alternating rounds, in microseconds per statement group, and the ratio.
"""

from __future__ import annotations

import sqlite3
import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg

from tests.services import PostgresServer

ROUNDS, OPS = 5, 500

TABLE = """CREATE TABLE tj (seq {serial} PRIMARY KEY, id TEXT UNIQUE, queue TEXT, priority SMALLINT, status TEXT,
    run_at DOUBLE PRECISION, finished_at DOUBLE PRECISION, payload TEXT, worker_id TEXT, lease DOUBLE PRECISION)"""
CLAIM_INDEX = "CREATE INDEX tj_claim ON tj (queue, status, priority, run_at, seq) WHERE status = 'queued'"
COUNTS = "CREATE TABLE tj_counts (queue TEXT, state TEXT, priority SMALLINT, slot INT, n BIGINT, " \
         "PRIMARY KEY (queue, state, priority, slot))"
PG_TRIGGERS = """
CREATE FUNCTION tj_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO tj_counts SELECT queue, status, priority, pg_backend_pid() % 16, sum(d) FROM (
      SELECT queue, status, priority, -1 AS d FROM old_rows UNION ALL SELECT queue, status, priority, 1 FROM new_rows
  ) AS changes GROUP BY 1, 2, 3 HAVING sum(d) <> 0
  ON CONFLICT (queue, state, priority, slot) DO UPDATE SET n = tj_counts.n + excluded.n;
  RETURN NULL;
END $$;
CREATE FUNCTION tj_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO tj_counts SELECT queue, status, priority, pg_backend_pid() % 16, count(*) FROM new_rows GROUP BY 1, 2, 3
  ON CONFLICT (queue, state, priority, slot) DO UPDATE SET n = tj_counts.n + excluded.n;
  RETURN NULL;
END $$;
CREATE TRIGGER tj_ins AFTER INSERT ON tj REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
  EXECUTE FUNCTION tj_count_insert();
CREATE TRIGGER tj_upd AFTER UPDATE ON tj REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION tj_count();
"""
SQLITE_TRIGGERS = """
CREATE TRIGGER tj_ins AFTER INSERT ON tj BEGIN
  INSERT INTO tj_counts VALUES (new.queue, new.status, new.priority, 0, 1) ON CONFLICT DO UPDATE SET n = n + 1; END;
CREATE TRIGGER tj_upd AFTER UPDATE OF status ON tj WHEN old.status IS NOT new.status BEGIN
  UPDATE tj_counts SET n = n - 1 WHERE queue = old.queue AND state = old.status AND priority = old.priority;
  INSERT INTO tj_counts VALUES (new.queue, new.status, new.priority, 0, 1) ON CONFLICT DO UPDATE SET n = n + 1; END;
"""
INSERT = "INSERT INTO tj (id, queue, priority, status, run_at, payload) VALUES ({p}, 'bulk', 1, 'queued', 0, '{{}}')"
CLAIM = """UPDATE tj SET status = 'running', worker_id = 'w', lease = 1 WHERE seq IN (SELECT seq FROM tj
    WHERE queue = 'bulk' AND status = 'queued' AND run_at <= 1 ORDER BY priority, run_at, seq LIMIT 10{lock})
    RETURNING id"""


def rounds(execute: Callable[[str, tuple[Any, ...]], list[Any]], p: str, lock: str, tag: str) -> dict[str, float]:
    start = time.perf_counter()
    for i in range(OPS):
        execute(INSERT.format(p=p), (f"{tag}-{i}",))
    inserted = time.perf_counter()
    for _ in range(OPS // 10):
        ids = [row[0] for row in execute(CLAIM.format(lock=lock), ())]
        for job_id in ids:
            execute(f"UPDATE tj SET status = 'succeeded', finished_at = 1 WHERE id = {p} AND worker_id = 'w'",
                    (job_id,))
        execute(f"UPDATE tj SET lease = 2 WHERE id = {p}", (ids[0],))
    done = time.perf_counter()
    return {"insert": (inserted - start) / OPS * 1e6, "claim+ack+beat": (done - inserted) / (OPS // 10) * 1e6}


def postgres(url: str, triggers: bool, tag: str) -> dict[str, float]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS tj, tj_counts CASCADE")
        conn.execute("DROP FUNCTION IF EXISTS tj_count, tj_count_insert CASCADE")
        for statement in (TABLE.format(serial="BIGSERIAL"), CLAIM_INDEX, COUNTS):
            conn.execute(statement)
        if triggers:
            conn.execute(PG_TRIGGERS)
        def execute(sql: str, args: tuple[Any, ...]) -> list[Any]:
            cursor = conn.execute(sql, args)
            return cursor.fetchall() if cursor.description else []

        return rounds(execute, "%s", " FOR UPDATE SKIP LOCKED", tag)


def sqlite(triggers: bool, tag: str) -> dict[str, float]:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(";".join([TABLE.format(serial="INTEGER"), CLAIM_INDEX, COUNTS]))
    if triggers:
        conn.executescript(SQLITE_TRIGGERS)
    return rounds(lambda sql, args: conn.execute(sql, args).fetchall(), "?", "", tag)


def main() -> None:
    server = PostgresServer(fsync=True)
    url = server.url().replace("postgresql+psycopg://", "postgresql://")
    try:
        for store, run in (("PostgreSQL", lambda t, tag: postgres(url, t, tag)), ("SQLite", sqlite)):
            results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
            for r in range(ROUNDS):
                for triggers in (False, True):
                    results[triggers].append(run(triggers, f"{r}{triggers}"))
            for step in ("insert", "claim+ack+beat"):
                plain = statistics.median(x[step] for x in results[False])
                counted = statistics.median(x[step] for x in results[True])
                spread = [round(x[step]) for x in results[True]]
                print(f"{store:10} {step:15} none {plain:7.0f} µs   triggers {counted:7.0f} µs {spread}   "
                      f"{counted / plain:.2f}x")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
