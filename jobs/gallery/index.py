"""The page's index: per-shard metadata caches -> one compact file per page group.

A shard's rows (every field but the image bytes) are cached once, in the gallery, as
columns; re-running on a grown output reads only the new shards and then rebuilds the
groups from the caches, a shard at a time. A group file holds `GROUP_PAGES` pages of rows
as columns, each column either a plain list or, where values repeat, a dictionary and
codes (sampler, model, LoRAs, passthrough labels shrink to a few bytes a row). The page
loads a group only when it shows or searches it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PAGE_SIZE = 100  # thumbnails per page
GROUP_PAGES = 20  # pages per index file: 2,000 rows, a few hundred KB
FACET_MAX_VALUES = 40  # a column with more distinct values is searched, not filtered
# Never filters: unique per row, or shown elsewhere.
NOT_FACETS = {"id", "prompt", "seed", "image"}


def dumps(value: Any, sort_keys: bool = True) -> str:
    """Compact JSON; keys sorted where it is a value's identity, kept in order in files
    (column order is the output's)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys)


def value_key(value: Any) -> Any:
    """A JSON value's identity, hashable: a scalar by its type and itself (1, 1.0 and true
    differ in JSON), anything else by its JSON text (slower, and rare)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return (type(value), value)
    return (list, dumps(value))


def encode_column(values: list[Any]) -> Any:
    """A plain list, or {"d": distinct values, "c": codes} where values repeat enough."""
    limit = max(8, len(values) // 4)
    codes: dict[Any, int] = {}
    distinct: list[Any] = []
    keys = []
    for value in values:
        key = value_key(value)
        if key not in codes:
            if len(distinct) == limit:
                return values  # ids, prompts, seeds: a dictionary would not save anything
            codes[key] = len(distinct)
            distinct.append(value)
        keys.append(key)
    return {"d": distinct, "c": [codes[key] for key in keys]}


def facet_tokens(value: Any) -> list[Any]:
    """The filter values a cell counts under: a list (LoRAs) counts under each element,
    a struct under its name; gallery.js reads cells the same way."""
    if isinstance(value, list):
        return [_element_token(item) for item in value] or [None]
    return [value]


def _element_token(item: Any) -> Any:
    if isinstance(item, dict):
        return item.get("name") or item.get("path") or dumps(item)
    if isinstance(item, list) and item:  # a map's (key, value) pair: the key names it
        return item[0]
    return item


@dataclass
class ShardCache:
    """One shard's rows without their image bytes, as the gallery keeps them."""

    shard: str
    file: str
    key: str  # changes when the shard's bytes do (its sha256)
    columns: dict[str, list[Any]] = field(default_factory=dict)
    ext: list[str | None] = field(default_factory=list)
    image_error: list[str | None] = field(default_factory=list)
    rows: int = 0

    def add(self, row: dict[str, Any]) -> None:
        for name, value in row.items():
            self.columns.setdefault(name, [None] * self.rows).append(value)
        self.rows += 1
        for values in self.columns.values():
            if len(values) < self.rows:  # a row without this column
                values.append(None)

    def to_json(self) -> bytes:
        return dumps({"shard": self.shard, "file": self.file, "key": self.key,
                      "rows": self.rows, "columns": self.columns, "ext": self.ext,
                      "image_error": self.image_error}, sort_keys=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ShardCache:
        raw = json.loads(data)
        return cls(raw["shard"], raw["file"], raw["key"], raw["columns"], raw["ext"],
                   raw["image_error"], raw["rows"])


class GroupBuilder:
    """Shard caches in, group files out (through `emit(number, content)`), with the
    column order and facet counts the page's summary needs."""

    def __init__(self, emit: Callable[[int, dict[str, Any]], None],
                 group_rows: int = PAGE_SIZE * GROUP_PAGES):
        self.emit = emit
        self.group_rows = group_rows
        self.columns: list[str] = []
        # column -> {value key: [value, rows]}; None once it has too many values
        self.facets: dict[str, dict[Any, list[Any]] | None] = {}
        self.group_sizes: list[int] = []
        self.total = 0
        self._reset()

    def _reset(self) -> None:
        self.buffer: dict[str, list[Any]] = {"shard": [], "row": [], "ext": [],
                                             "image_error": []}
        self.buffer_columns: dict[str, list[Any]] = {}
        self.buffered = 0

    def add(self, cache: ShardCache) -> None:
        for name in cache.columns:
            if name not in self.columns:
                self.columns.append(name)
        position = 0
        while position < cache.rows:  # fill the open group, flush it when full, go on
            take = min(self.group_rows - self.buffered, cache.rows - position)
            self._take(cache, position, take)
            position += take
            if self.buffered == self.group_rows:
                self._flush()

    def _take(self, cache: ShardCache, first: int, count: int) -> None:
        rows = range(first, first + count)
        self.buffer["shard"].extend([cache.shard] * count)
        self.buffer["row"].extend(rows)
        self.buffer["ext"].extend(cache.ext[first:first + count])
        self.buffer["image_error"].extend(cache.image_error[first:first + count])
        for name in set(self.buffer_columns) | set(cache.columns):
            values = self.buffer_columns.setdefault(name, [None] * self.buffered)
            source = cache.columns.get(name)
            values.extend(source[first:first + count] if source is not None else [None] * count)
            if name not in NOT_FACETS:
                self._count(name, values[-count:])
        self.buffered += count

    def _count(self, name: str, values: list[Any]) -> None:
        if name not in self.facets:  # a column new in this shard: the rows before lack it
            before = self.total + self.buffered
            self.facets[name] = {value_key(None): [None, before]} if before else {}
        counts = self.facets[name]
        if counts is None:
            return
        for value in values:
            for token in facet_tokens(value):
                entry = counts.get(value_key(token))
                if entry is None:
                    entry = counts[value_key(token)] = [token, 0]
                entry[1] += 1
        if len(counts) > FACET_MAX_VALUES:
            self.facets[name] = None  # too many values to pick from

    def _flush(self) -> None:
        if not self.buffered:
            return
        number = len(self.group_sizes)
        content = {
            "group": number, "first": self.total, "count": self.buffered,
            "shard": encode_column(self.buffer["shard"]), "row": self.buffer["row"],
            "ext": encode_column(self.buffer["ext"]),
            "columns": {name: encode_column(values)
                        for name, values in self.buffer_columns.items()},
        }
        if any(self.buffer["image_error"]):
            content["image_error"] = self.buffer["image_error"]
        self.emit(number, content)
        self.group_sizes.append(self.buffered)
        self.total += self.buffered
        self._reset()

    def finish(self) -> list[dict[str, Any]]:
        """Flush the last group; returns the facets: columns with 2 to FACET_MAX_VALUES
        values, each value with its count, most frequent first."""
        self._flush()
        facets = []
        for name in self.columns:
            counts = self.facets.get(name)
            if counts and len(counts) >= 2:
                values = sorted(counts.values(), key=lambda entry: (-entry[1], str(entry[0])))
                facets.append({"column": name, "values": values})
        return facets
