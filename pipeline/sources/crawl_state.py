"""Persistent crawl state per source × province: which units of work are done and what each item became.

A SQLite file (``raw/<source>/<province>/state.sqlite``, WAL journal) so that a run killed at any instant resumes
where it stopped: a unit (a Flickr query page, a Places tile, a YFCC chunk) and everything it found are committed in
one transaction, and a download is recorded once its bytes are in the image store. Items are keyed by the source's
own id, so an item found twice (overlapping tiles, shifted pages) is stored once.

Item statuses: ``pending`` (to download), ``done`` (in the store), ``rejected`` (with a reason code, final) and
``failed`` (transient errors outlasted the retries; downloaded again on the next run). ``done`` is final: no later
report (a late or duplicate download, another process) sets a finished item back to failed, rejected or pending.

A download whose bytes were suspect (an HTML page, a body cut short) is transient until proven otherwise: it is
``failed`` (``download_failed``, retried next run) and becomes a final rejection only once it was suspect on
``MAX_SUSPECT_RUNS`` separate runs (``suspect_runs`` counts them). Unit statuses: ``pending``, ``done`` and
``deferred`` (left incomplete on purpose, e.g. an expired page token: pending again at the next run's start).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.core.processes import SQLITE_BUSY_S, begin_immediate

PENDING, DONE, REJECTED, FAILED, DEFERRED = "pending", "done", "rejected", "failed", "deferred"
MAX_SUSPECT_RUNS = 3  # runs on which a download must look like a non-image before it is rejected for good
_DOWNLOAD_FAILED = "download_failed"  # pipeline.core.reasons.DOWNLOAD_FAILED (kept import-free here)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS units (
    unit_id TEXT PRIMARY KEY, payload TEXT NOT NULL, status TEXT NOT NULL, result TEXT,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    item_id TEXT PRIMARY KEY, record TEXT NOT NULL, status TEXT NOT NULL,
    image_id TEXT, path TEXT, reason TEXT, detail TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS units_status ON units (status, seq);
CREATE INDEX IF NOT EXISTS items_status ON items (status, seq);
-- a finished download is final, whoever writes: an update that would move it out of 'done' is skipped
CREATE TRIGGER IF NOT EXISTS items_done_is_final BEFORE UPDATE OF status ON items
WHEN OLD.status = 'done' AND NEW.status != 'done' BEGIN SELECT RAISE(IGNORE); END;
"""


@dataclass(frozen=True)
class Unit:
    unit_id: str
    payload: dict


@dataclass(frozen=True)
class Rejected:
    item_id: str
    record: dict
    reason: str
    detail: str = ""


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=SQLITE_BUSY_S, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    return con


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    begin_immediate(con, "writing the crawl state")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _prefix_sql(prefix: str) -> tuple[str, tuple]:
    return "substr(unit_id, 1, ?) = ?", (len(prefix), prefix)


class CrawlState:
    """Units and items of one source × province; used from one thread (downloads report back to it)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._con = _connect(self.path)
        self._con.executescript(_SCHEMA)
        columns = {r[1] for r in self._con.execute("PRAGMA table_info(items)")}
        if "suspect_runs" not in columns:  # a state file written before suspect downloads were counted per run
            self._con.execute("ALTER TABLE items ADD COLUMN suspect_runs INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "CrawlState":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return _transaction(self._con)

    def _next_seq(self, table: str) -> int:
        return int(self._con.execute(f"SELECT COALESCE(MAX(seq), 0) + 1 FROM {table}").fetchone()[0])

    # ---------------------------------------------------------------------------------------------------- meta
    def meta_get(self, key: str, default=None):
        row = self._con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def meta_set(self, key: str, value) -> None:
        with self._tx() as con:
            con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def sync_params(self, params: dict, filter_reasons: Iterable[str]) -> bool:
        """Record the crawl's parameters; when they changed since the last run, restart discovery.

        Restarting drops the units and the filter rejections (they are found and judged again under the new
        parameters) but keeps every download, so nothing already in the store is fetched again. Returns True if reset.
        """
        canonical = json.loads(json.dumps(params, sort_keys=True, default=str))
        old = self.meta_get("params")
        if old == canonical:
            return False
        reasons = list(filter_reasons)
        with self._tx() as con:
            if old is not None:
                con.execute("DELETE FROM units")
                con.execute("DELETE FROM meta WHERE key != 'params'")
                if reasons:
                    marks = ",".join("?" * len(reasons))
                    con.execute(f"DELETE FROM items WHERE status = ? AND reason IN ({marks})", (REJECTED, *reasons))
            con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('params', ?)", (json.dumps(canonical),))
        return old is not None

    # --------------------------------------------------------------------------------------------------- units
    def add_units(self, units: Iterable[Unit]) -> None:
        with self._tx() as con:
            self._insert_units(con, units)

    def _insert_units(self, con: sqlite3.Connection, units: Iterable[Unit]) -> None:
        seq = self._next_seq("units")
        for i, u in enumerate(units):
            con.execute(
                "INSERT OR IGNORE INTO units (unit_id, payload, status, seq) VALUES (?, ?, ?, ?)",
                (u.unit_id, json.dumps(u.payload), PENDING, seq + i),
            )

    def pending_units(self, prefix: str = "") -> list[Unit]:
        cond, args = _prefix_sql(prefix)
        rows = self._con.execute(
            f"SELECT unit_id, payload FROM units WHERE status = ? AND {cond} ORDER BY seq", (PENDING, *args)
        ).fetchall()
        return [Unit(uid, json.loads(payload)) for uid, payload in rows]

    def unit_done(self, unit_id: str) -> bool:
        row = self._con.execute("SELECT status FROM units WHERE unit_id = ?", (unit_id,)).fetchone()
        return bool(row and row[0] == DONE)

    def unit_ids(self, status: str = DONE) -> set[str]:
        return {r[0] for r in self._con.execute("SELECT unit_id FROM units WHERE status = ?", (status,))}

    def has_units(self, prefix: str = "") -> bool:
        cond, args = _prefix_sql(prefix)
        return self._con.execute(f"SELECT 1 FROM units WHERE {cond} LIMIT 1", args).fetchone() is not None

    def unit_results(self, prefix: str = "") -> list[dict]:
        cond, args = _prefix_sql(prefix)
        rows = self._con.execute(
            f"SELECT result FROM units WHERE status = ? AND {cond} AND result IS NOT NULL ORDER BY seq", (DONE, *args)
        ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def complete_unit(
        self,
        unit_id: str,
        items: Iterable[tuple[str, dict]] = (),
        rejected: Iterable[Rejected] = (),
        new_units: Iterable[Unit] = (),
        result: dict | None = None,
        payload: dict | None = None,
        status: str = DONE,
    ) -> None:
        """Mark ``unit_id`` done together with everything it found, in one transaction (all or nothing).

        ``payload`` replaces the unit's payload (e.g. to forget coordinates a finished unit no longer needs);
        ``status=DEFERRED`` keeps what it found but leaves the unit to be done again by the next run.
        """
        with self._tx() as con:
            seq = self._next_seq("items")
            n = 0
            for item_id, record in items:
                con.execute(
                    "INSERT OR IGNORE INTO items (item_id, record, status, seq) VALUES (?, ?, ?, ?)",
                    (item_id, json.dumps(record), PENDING, seq + n),
                )
                n += 1
            for r in rejected:
                con.execute(
                    "INSERT OR IGNORE INTO items (item_id, record, status, reason, detail, seq) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (r.item_id, json.dumps(r.record), REJECTED, r.reason, r.detail, seq + n),
                )
                n += 1
            self._insert_units(con, new_units)
            res = json.dumps(result) if result is not None else None
            cur = con.execute("UPDATE units SET status = ?, result = ? WHERE unit_id = ?", (status, res, unit_id))
            if cur.rowcount == 0:
                con.execute(
                    "INSERT INTO units (unit_id, payload, status, result, seq) VALUES (?, '{}', ?, ?, ?)",
                    (unit_id, status, res, self._next_seq("units")),
                )
            if payload is not None:
                con.execute("UPDATE units SET payload = ? WHERE unit_id = ?", (json.dumps(payload), unit_id))

    def reopen_deferred(self, prefix: str = "") -> int:
        """Deferred units become pending again (called once at the start of a run); returns how many."""
        cond, args = _prefix_sql(prefix)
        with self._tx() as con:
            return con.execute(f"UPDATE units SET status = ? WHERE status = ? AND {cond}",
                               (PENDING, DEFERRED, *args)).rowcount

    def units(self, prefix: str = "") -> list[tuple[Unit, str]]:
        """Every unit under ``prefix`` with its status, in discovery order."""
        cond, args = _prefix_sql(prefix)
        rows = self._con.execute(f"SELECT unit_id, payload, status FROM units WHERE {cond} ORDER BY seq", args)
        return [(Unit(uid, json.loads(payload)), status) for uid, payload, status in rows.fetchall()]

    def unfinished_unit_kinds(self) -> dict[str, int]:
        """Units not ``done`` (pending or deferred), counted by kind (the unit id before its first ``:``)."""
        rows = self._con.execute(
            "SELECT CASE WHEN instr(unit_id, ':') > 0 THEN substr(unit_id, 1, instr(unit_id, ':') - 1) ELSE unit_id "
            "END AS kind, COUNT(*) FROM units WHERE status != ? GROUP BY kind ORDER BY MIN(seq)", (DONE,))
        return dict(rows.fetchall())

    def set_unit_payloads(self, payloads: dict[str, dict]) -> None:
        with self._tx() as con:
            con.executemany("UPDATE units SET payload = ? WHERE unit_id = ?",
                            [(json.dumps(p), uid) for uid, p in payloads.items()])

    # --------------------------------------------------------------------------------------------------- items
    def pending_items(self) -> Iterator[tuple[str, dict]]:
        """Items still to download (new, or failed transiently last time), in discovery order."""
        rows = self._con.execute(
            "SELECT item_id, record FROM items WHERE status IN (?, ?) ORDER BY seq", (PENDING, FAILED)
        ).fetchall()
        for item_id, record in rows:
            yield item_id, json.loads(record)

    def record_download(
        self, item_id: str, image_id: str | None, path: str | None, reason: str | None, detail: str,
        retry_later: bool, forget: Iterable[str] = (), max_suspect_runs: int = MAX_SUSPECT_RUNS,
    ) -> None:
        """Record a download's outcome; an item already ``done`` keeps its stored image (never downgraded).

        ``retry_later`` with a reason other than ``download_failed`` (e.g. ``not_an_image``: an HTML page or a cut
        body) is a *suspect* failure: the item stays ``failed`` (``download_failed``, retried next run) until it was
        suspect on ``max_suspect_runs`` runs, then it is rejected with that reason. ``forget`` names record fields
        dropped once the item is final (stored or rejected), e.g. a reference the source's terms do not let us keep.
        """
        status = DONE if image_id else (FAILED if retry_later else REJECTED)
        suspect = not image_id and retry_later and bool(reason) and reason != _DOWNLOAD_FAILED
        with self._tx() as con:
            row = con.execute("SELECT status, record, suspect_runs FROM items WHERE item_id = ?", (item_id,)).fetchone()
            if row is None or row[0] == DONE:
                return
            runs = int(row[2]) + int(suspect)
            if suspect:
                if runs >= max_suspect_runs:
                    status, detail = REJECTED, f"{detail} (on {runs} runs: rejected for good)".strip()
                else:
                    detail = f"{reason}: {detail} (suspect on {runs} of {max_suspect_runs} runs)"
                    reason = _DOWNLOAD_FAILED
            record = json.loads(row[1])
            forget = [f for f in forget if f in record] if status in (DONE, REJECTED) else []
            for f in forget:
                del record[f]
            con.execute(
                "UPDATE items SET status = ?, image_id = ?, path = ?, reason = ?, detail = ?, attempts = attempts + 1, "
                "suspect_runs = ?, record = ? WHERE item_id = ? AND status != ?",
                (status, image_id, path, reason, detail, runs, json.dumps(record), item_id, DONE),
            )

    def update_records(self, updates: dict[str, dict]) -> None:
        """Merge fields into stored records (e.g. attribution read after discovery)."""
        with self._tx() as con:
            for item_id, fields in updates.items():
                row = con.execute("SELECT record FROM items WHERE item_id = ?", (item_id,)).fetchone()
                if row:
                    record = {**json.loads(row[0]), **fields}
                    con.execute("UPDATE items SET record = ? WHERE item_id = ?", (json.dumps(record), item_id))

    def item_ids(self) -> list[str]:
        return [r[0] for r in self._con.execute("SELECT item_id FROM items ORDER BY seq")]

    def items(self, statuses: Iterable[str] | None = None) -> pd.DataFrame:
        """item_id, record (dict), status, image_id, path, reason, detail, attempts — in discovery order."""
        sql = "SELECT item_id, record, status, image_id, path, reason, detail, attempts FROM items"
        args: tuple = ()
        if statuses is not None:
            statuses = list(statuses)
            sql += f" WHERE status IN ({','.join('?' * len(statuses))})"
            args = tuple(statuses)
        df = pd.read_sql_query(sql + " ORDER BY seq", self._con, params=args)
        df["record"] = [json.loads(r) for r in df["record"]]
        return df

    def counts(self) -> dict[str, dict[str, int]]:
        units = dict(self._con.execute("SELECT status, COUNT(*) FROM units GROUP BY status").fetchall())
        items = dict(self._con.execute("SELECT status, COUNT(*) FROM items GROUP BY status").fetchall())
        return {"units": units, "items": items}


class JsonCache:
    """A small on-disk key → JSON cache (SQLite) shared by every partition of a source, e.g. Wikidata answers."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._con = _connect(self.path)
        self._con.execute("CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def close(self) -> None:
        self._con.close()

    def get_many(self, keys: Iterable[str]) -> dict[str, object]:
        keys = list(keys)
        out: dict[str, object] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            rows = self._con.execute(
                f"SELECT key, value FROM cache WHERE key IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
            out.update({k: json.loads(v) for k, v in rows})
        return out

    def put_many(self, values: dict[str, object]) -> None:
        with _transaction(self._con) as con:
            con.executemany(
                "INSERT OR REPLACE INTO cache (key, value) VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in values.items()],
            )
