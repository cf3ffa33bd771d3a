"""The label stage's work units, plain functions: where a unit's scores live, which rows of a clips
shard are still to score, how many clips a unit holds, and reading just a unit's rows.

A unit is rows ``[start, stop)`` of one clips shard; its scores are published under a deterministic key
(``unit_uri``), so a retried or rerun unit can only write the same object. ``workflows.label`` plans the
units, scores them on an actor pool and merges a shard's units when its last one lands.
"""
from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from workflows import storage

UNITS = "_units"  # _units/shard-XXXXX/rows-AAAAAAAA-BBBBBBBB.parquet: one work unit's scores


def unit_uri(out: str, shard: int, start: int, stop: int) -> str:
    """Deterministic key of the scores of rows ``[start, stop)`` of clips shard ``shard``."""
    return storage.join(out, UNITS, f"shard-{shard:05d}", f"rows-{start:08d}-{stop:08d}.parquet")


def _unit_range(uri: str) -> tuple[int, int]:
    a, b = uri.rsplit("/", 1)[-1][len("rows-"):-len(".parquet")].split("-")
    return int(a), int(b)


def finished_units(out: str, shard: int) -> list[tuple[int, int]]:
    """Row ranges of shard ``shard`` whose unit scores are published (one listing)."""
    return sorted(_unit_range(u) for u in storage.list_parquet(storage.join(out, UNITS, f"shard-{shard:05d}")))


def pick_units(ranges) -> list[tuple[int, int]]:
    """A non-overlapping subset of the non-empty unit ranges, greedily in (start, stop) order. Units of
    one run never overlap; units left by a run with another ``clips_per_task`` may, and only the picked
    ones count (the same choice when planning and when merging, since new units only fill the gaps)."""
    picked: list[tuple[int, int]] = []
    for a, b in sorted(set(ranges)):
        if b > a and all(b <= pa or a >= pb for pa, pb in picked):
            picked.append((a, b))
    return picked


def plan_units(n_rows: int, done: list[tuple[int, int]], per_task: int) -> list[tuple[int, int]]:
    """The row ranges of a shard of ``n_rows`` clips still to score: the gaps between the finished
    (picked) units, cut into units of at most ``per_task`` rows. An empty shard is one empty unit, so
    its (empty) scores table is written by a scorer, with the scorer's columns."""
    if n_rows == 0:
        return [] if (0, 0) in done else [(0, 0)]
    picked = pick_units(done)
    todo, pos = [], 0
    for a, b in picked + [(n_rows, n_rows)]:
        for s in range(pos, a, per_task):
            todo.append((s, min(s + per_task, a)))
        pos = max(pos, b)
    return todo


UNITS_PER_ACTOR = 4  # with at least this many units of label.clips_per_task an actor, units keep that size


def _makespan(sizes: list[int], num_actors: int) -> int:
    """Clips on the busiest actor when units of ``sizes`` go, in order, each to the first idle actor (the
    pool's one-unit-in-flight scheduling, actors of equal speed)."""
    load = [0] * num_actors
    for n in sizes:
        load[load.index(min(load))] += n
    return max(load)


def unit_size(clips_todo: int, per_task: int, batch_size: int, num_actors: int,
              sizes: Callable[[int], list[int]] | None = None) -> int:
    """Clips a work unit for this run: ``label.clips_per_task``, or fewer when the stage is small.

    The stage ends when its busiest actor does, and actors take whole units: a shard of 12 clips in units
    of 8 is 8 + 4, so one actor scores 8 clips while the other idles after 4 (measured, 2 actors, tiny
    preset: 22.2 and 22.6 s for the stage; in units of 6, 18.5 and 18.2 s). With at least
    ``UNITS_PER_ACTOR`` units an actor the unit is ``per_task`` (the tail is then one unit of many). Below
    that, the unit is the largest size between one search batch (``batch_size``: a smaller unit would run
    the walk on fewer clips than it batches) and ``per_task`` whose units leave the least on the busiest
    actor.
    ``sizes(u)`` gives the units' clip counts at size ``u`` (the shards cut units too); default: the clips
    in one run. Units of another size left by an earlier run are kept either way (``plan_units`` fills only
    the gaps between them)."""
    if clips_todo >= num_actors * UNITS_PER_ACTOR * per_task:
        return per_task
    if sizes is None:
        sizes = lambda u: [min(u, clips_todo - a) for a in range(0, clips_todo, u)]  # noqa: E731
    lo = max(1, min(batch_size, per_task))
    return min(range(per_task, lo - 1, -1), key=lambda u: _makespan(sizes(u), num_actors))


def covers_rows(picked: list[tuple[int, int]], n_rows: int) -> bool:
    """Whether the picked unit ranges, in order, tile rows ``[0, n_rows)`` with no gap."""
    pos = 0
    for a, b in picked:
        if a != pos:
            return False
        pos = b
    return pos == n_rows


def read_rows(uri: str, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
    """Rows ``[start, stop)`` of one Parquet file, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    with storage.open_read(uri) as f:
        pf = pq.ParquetFile(f)
        groups, first, pos = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if pos < stop and pos + n > start:
                groups.append(g)
                first = pos if first is None else first
            pos += n
        if not groups:
            return pf.schema_arrow.empty_table().select(columns) if columns else pf.schema_arrow.empty_table()
        table = pf.read_row_groups(groups, columns=columns)
    return table.slice(start - first, stop - start)


def parquet_rows(uri: str) -> int:
    """Row count of one Parquet file, from its footer."""
    import pyarrow.parquet as pq

    with storage.open_read(uri) as f:
        return pq.ParquetFile(f).metadata.num_rows
