"""Append-only shard folders: the one mechanism under every cache that grows by shards (the filter's per-image
values, the catalog's header facts, the model's frozen-encoder features).

Why this shape: work is committed as it is done, so a killed writer loses at most its last shard, and growth never
rewrites what exists (an append costs O(rows added), not O(cache)).

- A shard is one or more files ``<name><suffix>`` with ``<name>`` = ``<prefix><seq>-<writer>-<token>``: the
  sequence number orders shards (oldest first); the writer (``pipeline.core.processes.writer_tag``) and a random
  token keep two writers from ever sharing a name. Every file is written to a temp name and renamed into place,
  the *commit file* (the last suffix) last, so a shard exists once its commit file does and a reader never sees
  half of one. The listing of commit files is the index; a name without a sequence number (an older layout's)
  sorts before every numbered one.
- A killed writer leaves temp files, or data files without a commit file: ``commit`` sweeps them once their writer
  is gone (a pid on this host; another host's file by age, as ``pipeline.core.processes.writer_gone`` says).
- ``compact`` merges runs of consecutive small shards into one. The merged shard is committed, atomically, under
  the sequence number of the member whose rows win, before the members are removed (commit file first): a kill in
  between leaves rows twice with equal values, which readers resolve as they resolve any repeated row, and the
  next compaction merges them away. Correctness never depends on compaction; it saves opening many files.
"""

from __future__ import annotations

import bisect
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pipeline.core.processes import writer_gone, writer_tag
from pipeline.core.store import atomic_path, sweep_orphan_temps

SEQ_DIGITS = 12
Writer = Callable[[Path], object]  # writes one file of a shard at the temp path it is given


class ShardLog:
    """The committed shards of one folder, and how to add, remove and merge them (see the module docstring)."""

    def __init__(self, folder: str | Path, suffixes: Sequence[str] = (".parquet",), prefix: str = "",
                 digits: int = SEQ_DIGITS, first_seq: int = 1):
        if not suffixes:
            raise ValueError("a shard has at least one file (its commit file)")
        self.folder = Path(folder)
        self.suffixes = tuple(suffixes)
        self.commit_suffix = self.suffixes[-1]
        self.prefix = prefix
        self.digits, self.first_seq = digits, first_seq  # how sequence numbers are written, and the first one
        self._names: list[str] | None = None

    def seq(self, name: str) -> int:
        """A shard's sequence number; -1 for a name without one (an older layout's, older than any numbered one)."""
        rest = name[len(self.prefix):] if name.startswith(self.prefix) else ""
        head, dash, _ = rest.partition("-")
        return int(head) if dash and head.isdigit() else -1

    def _order(self, name: str) -> tuple[int, str]:
        return self.seq(name), name

    def names(self, refresh: bool = False) -> list[str]:
        """Committed shards, oldest first: listed once per instance (``refresh`` lists the folder again)."""
        if self._names is None or refresh:
            found = []
            if self.folder.is_dir():
                found = [p.name[: -len(self.commit_suffix)]
                         for p in self.folder.glob(f"{self.prefix}*{self.commit_suffix}") if not p.name.startswith(".")]
            self._names = sorted(found, key=self._order)
        return list(self._names)

    def files(self, name: str) -> list[Path]:
        """The files of shard ``name``, in writing order (commit file last)."""
        return [self.folder / f"{name}{suffix}" for suffix in self.suffixes]

    def commit_path(self, name: str) -> Path:
        return self.folder / f"{name}{self.commit_suffix}"

    # ------------------------------------------------------------------------------------------------ writes
    def commit(self, writers: Mapping[str, Writer], need_bytes: Mapping[str, int] | None = None,
               seq: int | None = None) -> str:
        """Write one new shard, each file through a temp name and a rename, the commit file last; return its name.

        ``seq`` defaults to one past the newest shard this instance knows of (``first_seq`` in an empty folder)."""
        if set(writers) != set(self.suffixes):
            raise ValueError(f"a shard is written as {self.suffixes}, got {sorted(writers)}")
        self.sweep()
        if seq is None:
            seq = max([self.seq(n) for n in self.names()] + [self.first_seq - 1]) + 1
        name = f"{self.prefix}{max(seq, 0):0{self.digits}d}-{writer_tag()}-{secrets.token_hex(4)}"
        self.folder.mkdir(parents=True, exist_ok=True)
        for suffix, path in zip(self.suffixes, self.files(name)):
            with atomic_path(path, need_bytes=(need_bytes or {}).get(suffix)) as tmp:
                writers[suffix](tmp)
        if self._names is not None:
            bisect.insort(self._names, name, key=self._order)
        return name

    def remove(self, name: str) -> None:
        """Uncommit shard ``name`` (its commit file goes first), then remove its data files."""
        for path in reversed(self.files(name)):
            path.unlink(missing_ok=True)
        if self._names is not None and name in self._names:
            self._names.remove(name)

    def forget(self, name: str) -> None:
        """Drop ``name`` from the listing without touching its files (a caller set it aside)."""
        if self._names is not None and name in self._names:
            self._names.remove(name)

    def sweep(self) -> None:
        """Remove what killed writers left: temp files, and data files of shards that were never committed."""
        if not self.folder.is_dir():
            return
        sweep_orphan_temps(self.folder)
        for suffix in self.suffixes[:-1]:
            for f in self.folder.glob(f"{self.prefix}*{suffix}"):
                name = f.name[: -len(suffix)]
                if f.name.startswith(".") or self.commit_path(name).exists():
                    continue
                parts = name[len(self.prefix):].split("-")
                if writer_gone(parts[1] if len(parts) == 3 else "", f):
                    f.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------------ compaction
    @staticmethod
    def runs(sizes: Sequence[tuple[str, int]], max_rows: int) -> list[list[str]]:
        """Runs of two or more consecutive shards, each under a quarter of ``max_rows`` rows and together at most
        ``max_rows``: what ``compact`` merges (a large shard ends a run, so order is kept)."""
        small = max_rows // 4
        out: list[list[str]] = []
        run: list[str] = []
        total = 0
        for name, n in [*sizes, (None, max_rows + 1)]:  # a sentinel closes the last run
            if name is None or n >= small or total + n > max_rows:
                if len(run) > 1:
                    out.append(run)
                run, total = [], 0
            if name is not None and n < small:
                run.append(name)
                total += n
        return out

    def compact(self, rows: Callable[[str], int | None], merge: Callable[[list[str]], Mapping[str, Writer]],
                max_rows: int, later_wins: bool = True) -> int:
        """Merge runs of small shards (``runs``) into one shard each; return how many shards went.

        ``rows(name)`` counts a shard's rows (None: unreadable, left out); ``merge(members)`` gives the merged
        shard's writers, with the rows repeated across members already resolved (``later_wins``: the newest copy
        of a row is kept, else the oldest). The merged shard takes the sequence number of the winning end, so it
        keeps its place against every other shard."""
        sizes = [(name, n) for name in self.names(refresh=True) if (n := rows(name)) is not None]
        removed = 0
        for members in self.runs(sizes, max_rows):
            self.commit(merge(members), seq=self.seq(members[-1] if later_wins else members[0]))
            for name in members:
                self.remove(name)
            removed += len(members) - 1
        return removed
