"""`validate`'s LoRA check: every LoRA a job names, found and fitted to the model first.

A job names LoRAs in three places (`sampling.loras`, a `loras` column, `<lora:...>` tags
under `prompt_syntax: a1111`). Before any work starts, each distinct source is read and
checked against the job's model once, so a typo or an SDXL LoRA on an SD 1.5 job shows up
in `validate` rather than as rejected rows at the end of a long run (where it would cost
only its rows, with the same reason).
"""

from __future__ import annotations

from collections import Counter

from .plan import Plan
from .readers import read_slice
from .rows import row_loras
from .storage import open_storage


def job_loras(plan: Plan) -> tuple[Counter, list[str]]:
    """{source: rows naming it} over the whole input, and row-level problems (bad cells)."""
    spec = plan.spec
    uses: Counter = Counter()
    problems: list[str] = []
    swept = (spec.expand.sweep.get("loras") or []) if spec.expand else []
    if swept:  # every row goes through every point of a LoRA sweep
        from .rows import parse_loras

        uses.update(source for point in swept for source in parse_loras(point))
    needs_rows = "loras" in (plan.schema.names if plan.schema is not None else []) or \
        spec.sampling.prompt_syntax == "a1111"
    if not needs_rows:
        if not swept:
            uses.update({source: plan.input_rows for source in spec.sampling.loras})
        return uses, problems
    storage = open_storage(spec.input.path, spec.storage)
    column = spec.input.prompt_column
    offset = 0
    for info in plan.files:  # each input row once (expanded shards share their rows)
        table = read_slice(storage, info.path, 0, info.rows, column)
        for i, record in enumerate(table.to_pylist()):
            try:
                loras, _ = row_loras(record, str(record.get(column) or ""), spec)
            except ValueError as error:
                problems.append(f"input row {offset + i}: {error}")
                continue
            uses.update(source for source, _ in loras)
        offset += info.rows
    return uses, problems


def check_loras(plan: Plan, pipeline=None) -> tuple[list[str], bool]:
    """Lines describing the job's LoRAs, and whether all of them can serve its model."""
    uses, problems = job_loras(plan)
    if not uses and not problems:
        return [], True
    spec = plan.spec
    if pipeline is None:
        from ldm_jobs.model import load_pipeline

        pipeline = load_pipeline(spec.model, device="cpu", dtype=spec.compute.dtype,
                                 storage=spec.storage)
    from ldm_jobs.model.lora_cache import AdapterCache

    cache = AdapterCache(pipeline, max_bytes=1, storage=spec.storage)  # read, check, drop
    lines = [f"loras      {len(uses)} LoRA(s)"]
    ok = not problems
    for source, rows in sorted(uses.items()):
        try:
            adapter = cache.get(source)
            lines.append(f"  {adapter.name}  sha256 {adapter.sha256[:12]}  {rows} row(s)  "
                         f"{source}")
        except ValueError as error:
            ok = False
            lines.append(f"  BAD  {rows} row(s) would be rejected: {error}")
    lines += [f"  BAD  {problem}" for problem in problems[:20]]
    return lines, ok
