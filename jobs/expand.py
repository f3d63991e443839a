"""Expansion: each input row -> template variants x a sweep grid, planned as lazy ranges.

An input row r expands into ``count(r)`` rows: its prompt template's variants (the
``dynamicprompts`` syntax the web UIs use: ``{a|b}``, ``{2$$a|b|c}``, ``__name__``
wildcards from ``name.txt`` files) crossed with every point of ``expand.sweep`` (a grid
over per-row sampling fields, the first field varying slowest). Expanded row k of input
row ``ID`` has the id ``ID~k``, k = variant * sweep points + point, stable across runs:
``mode: random`` draws ``variants`` prompts from a generator seeded by the row's id;
``mode: combinatorial`` lists the template's combinations in order, at most ``max``.

The expanded rows are never held all at once: planning computes where each input row's
expanded rows start (a multiplication when every row has the same count, as in random
mode; a cumulative array when combinatorial counts differ) and cuts the expanded index
space into shards of ``rows_per_shard``; a worker expands just its shard's range (see
``expand_table``). A shard's name and content still follow from the input and the spec,
so resume and exactly-once work as without expansion.

Seeds: a row (or the sweep) that sets ``seed`` keeps it; otherwise the seed is derived
from ``sampling.seed`` and the id of the variant's first expanded row (``ID~v*P``), so
the points of a sweep share their variant's seed, as the web UI's X/Y plot does, and
without a sweep each row's seed comes from its own id.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ldm_jobs.model.seeds import derive_seed

from .rows import OVERRIDE_CHECKS, parse_loras, row_id
from .spec import JobSpec, SpecError
from .storage import open_storage

TEMPLATE_COLUMN = "template"
# What a sweep may vary: the per-row sampling fields, and the LoRA set ({} for none)
SWEEP_CHECKS = {**OVERRIDE_CHECKS, "loras": parse_loras}
_LORAS_TYPE = pa.list_(pa.struct([("path", pa.string()), ("weight", pa.float64())]))
_WILDCARD = re.compile(r"__([\w./-]+?)__")
# combinatorial mode without `max`: a row with more combinations than this is rejected
# (naming the setting) rather than enumerated for ever or cut silently
MAX_COMBINATIONS = 100_000


# ------------------------------------------------------------------------- the spec side
def sweep_points(spec: JobSpec) -> list[dict[str, Any]]:
    """Every point of the sweep grid (one empty point without a sweep), values checked."""
    sweep = spec.expand.sweep if spec.expand else {}
    for name, values in sweep.items():
        if name not in SWEEP_CHECKS:
            raise SpecError(f"expand.sweep.{name}: not a per-row sampling field "
                            f"(one of {', '.join(SWEEP_CHECKS)})")
        if not isinstance(values, list) or not values:
            raise SpecError(f"expand.sweep.{name}: must be a non-empty list of values")
        for i, value in enumerate(values):
            try:
                SWEEP_CHECKS[name](value)
            except (ValueError, TypeError, ArithmeticError) as error:
                raise SpecError(f"expand.sweep.{name}[{i}]: {error}") from None
    names = list(sweep)
    return [dict(zip(names, combo)) for combo in itertools.product(*(sweep[n] for n in names))]


@dataclass(frozen=True)
class Layout:
    """Where each input row's expanded rows start: ``per_row`` each, or ``starts``
    (cumulative, input rows + 1 entries) when combinatorial counts differ."""

    total: int
    per_row: int = 0
    starts: np.ndarray | None = None

    def start(self, row: int) -> int:
        return row * self.per_row if self.starts is None else int(self.starts[row])

    def row_of(self, index: int) -> int:
        """The input row holding expanded row ``index``."""
        if self.starts is None:
            return index // self.per_row
        return int(np.searchsorted(self.starts, index, side="right")) - 1


class Expander:
    """Template variants of one job: the generator, its wildcards, and the sweep."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.options = spec.expand.prompts if spec.expand else None
        self.points = sweep_points(spec)
        self._wildcards: Any = None
        self._folder: tempfile.TemporaryDirectory | None = None

    @property
    def per_point(self) -> int:
        return len(self.points)

    def _manager(self):
        if self._wildcards is None:
            from dynamicprompts.wildcards import WildcardManager

            source = self.options.wildcards if self.options else None
            self._wildcards = WildcardManager(Path(self._local(source)) if source else None)
        return self._wildcards

    def _local(self, source: str) -> str:
        """A local folder of the wildcard files (an s3:// prefix is copied once)."""
        if "://" not in source or source.startswith("file://"):
            path = source.removeprefix("file://")
            if not Path(path).is_dir():
                raise SpecError(f"expand.prompts.wildcards: {source} is not a folder")
            return path
        storage = open_storage(source, self.spec.storage)
        self._folder = tempfile.TemporaryDirectory(prefix="wildcards-")
        base = source.rstrip("/") + "/"
        for path in storage.list(base):
            if path.endswith(".txt"):
                target = Path(self._folder.name) / path[len(base):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(storage.read_bytes(path))
        return self._folder.name

    def variants(self, template: str, image_id: str) -> list[str]:
        """The row's prompt variants, the same every run; ValueError for a template that
        does not parse or names a wildcard with no file."""
        options = self.options
        if options is None:
            return [template]
        from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator

        try:
            if options.mode == "random":
                seed = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:4], "big")
                generator = RandomPromptGenerator(wildcard_manager=self._manager(), seed=seed)
                prompts = generator.generate(template, num_images=options.variants)
            else:
                generator = CombinatorialPromptGenerator(wildcard_manager=self._manager())
                prompts = generator.generate(template, max_prompts=options.max or MAX_COMBINATIONS + 1)
        except Exception as error:  # pyparsing and friends: the row is rejected with it
            raise ValueError(f"template: {type(error).__name__}: {error}") from None
        if len(prompts) > MAX_COMBINATIONS:
            raise ValueError(f"template: more than {MAX_COMBINATIONS} combinations; "
                             "set expand.prompts.max")
        for name in _WILDCARD.findall(template):
            if any(f"__{name}__" in p for p in prompts):
                raise ValueError(f"template: no wildcard file for __{name}__ "
                                 f"(expand.prompts.wildcards: {options.wildcards})")
        return [str(p) for p in prompts]

    def count(self, template: str | None, image_id: str) -> int:
        """Expanded rows of one input row (a row whose template fails counts one, which
        becomes its rejection)."""
        try:
            variants = len(self.variants(template, image_id)) if template else 1
        except ValueError:
            variants = 1
        return max(variants, 1) * self.per_point

    def layout(self, input_rows: int, templates=None) -> Layout:
        """Random mode (or none): every row has the same count, nothing is read.
        Combinatorial: ``templates()`` gives each row's (template, id) to count."""
        if self.options is None or self.options.mode == "random":
            per_row = (self.options.variants if self.options else 1) * self.per_point
            return Layout(input_rows * per_row, per_row=per_row)
        counts = np.fromiter((self.count(t, i) for t, i in templates()), np.int64, input_rows)
        starts = np.zeros(input_rows + 1, np.int64)
        np.cumsum(counts, out=starts[1:])
        return Layout(int(starts[-1]), starts=starts)


# ------------------------------------------------------------------------ the worker side
def expand_table(
    expander: Expander, shard, table: pa.Table, global_rows: list[int], sources: list[str],
    unreadable: dict[int, str],
) -> tuple[pa.Table, list[int], list[str], dict[int, str]]:
    """The shard's expanded rows (``shard.expanded``) from its input rows: the table
    (input columns, the expanded prompt, ``template``, the swept fields, the id column as
    ``ID~k`` and the seed), their expanded indices, their files, and the rows to reject
    with a reason (undecodable input rows, templates that fail)."""
    spec = expander.spec
    first, stop = shard.expanded
    id_column = shard.id_column
    spans = {row: (start, count) for row, start, count in shard.expanded_rows}
    prompt_column = spec.input.prompt_column
    records = table.to_pylist()
    has_ids = id_column in table.column_names
    take, prompts, templates, ids, seeds, indices, files = [], [], [], [], [], [], []
    swept: dict[str, list] = {name: [] for name in expander.points[0]}
    reasons: dict[int, str] = {}
    for position, record in enumerate(records):
        start, count = spans[global_rows[position]]
        template = record.get(prompt_column)
        try:
            base_id = row_id(record.get(id_column) if has_ids else None, global_rows[position], has_ids)
        except ValueError:
            base_id = None
        reason = unreadable.get(position)
        variants: list[str | None] = [template]
        if reason is None and isinstance(template, str) and base_id is not None:
            try:
                variants = expander.variants(template, base_id)
            except ValueError as error:
                reason = str(error)
        per_point = expander.per_point
        for k in range(max(first - start, 0), min(stop - start, count)):
            variant, point = divmod(k, per_point)
            if reason is not None:
                reasons[len(take)] = reason
            take.append(position)
            # a row that cannot expand keeps its template as the prompt of its rejections
            prompts.append(variants[variant] if variant < len(variants) else template)
            templates.append(template)
            ids.append(None if base_id is None else f"{base_id}~{k}")
            seed = expander.points[point].get("seed", record.get("seed"))
            if seed is None and base_id is not None:
                seed = derive_seed(spec.sampling.seed, f"{base_id}~{variant * per_point}")
            seeds.append(seed)
            for name in swept:
                swept[name].append(expander.points[point][name])
            indices.append(start + k)
            files.append(sources[position])
    expanded = table.take(pa.array(take, pa.int64()))
    replace = {prompt_column: pa.array(prompts, pa.string()), id_column: pa.array(ids, pa.string()),
               TEMPLATE_COLUMN: pa.array(templates, pa.string()), "seed": _seed_array(seeds)}
    replace.update({name: pa.array(values) for name, values in swept.items()
                    if name not in ("seed", "loras")})
    if "loras" in swept:  # as a list of {path, weight}, one of the column's own forms
        replace["loras"] = pa.array([[{"path": p, "weight": w} for p, w in parse_loras(v).items()]
                                     for v in swept["loras"]], _LORAS_TYPE)
    for name, values in replace.items():
        if name in expanded.column_names:
            expanded = expanded.set_column(expanded.column_names.index(name), name, values)
        else:
            expanded = expanded.append_column(name, values)
    return expanded, indices, files, reasons


def _seed_array(seeds: list) -> pa.Array:
    """Seeds as they came (a bad one is rejected by the row checks, naming the column)."""
    try:
        return pa.array(seeds, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([None if s is None else str(s) for s in seeds], pa.string())


def preview(plan, rows: int = 5) -> list[str]:
    """``validate``'s lines on the expansion: counts, then the first expanded rows."""
    spec = plan.spec
    options = spec.expand.prompts
    expander = Expander(spec)
    how = ("no template expansion" if options is None else
           f"{options.mode}, {options.variants} variant(s) per row" if options.mode == "random"
           else f"combinatorial, at most {options.max or 'every'} per row")
    lines = [f"expand     {plan.input_rows} rows to generate ({how}; "
             f"{expander.per_point} sweep point(s) each)"]
    if not plan.shards:
        return lines
    from .readers import conform, read_slice

    shard = plan.shards[0]
    storage = open_storage(spec.input.path, spec.storage)
    parts = [read_slice(storage, s.path, s.first, s.count, spec.input.prompt_column)
             for s in shard.slices]
    table = pa.concat_tables([conform(p, plan.schema) for p in parts])
    global_rows = [s.offset + i for s in shard.slices for i in range(s.count)]
    expanded, _, _, reasons = expand_table(expander, shard, table, global_rows,
                                           [""] * len(global_rows), {})
    shown = [TEMPLATE_COLUMN, *expander.points[0]]
    for i, record in enumerate(expanded.slice(0, rows).to_pylist()):
        extra = ", ".join(f"{name}={record.get(name)!r}" for name in shown[1:])
        text = reasons.get(i) or repr(record.get(spec.input.prompt_column))
        lines.append(f"  {record.get(shard.id_column)}  seed {record.get('seed')}  {text}"
                     + (f"  ({extra})" if extra else ""))
    return lines
