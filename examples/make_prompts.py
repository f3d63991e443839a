"""Write examples/prompts.parquet: 64 captions for the built-in shapes model, with ids
(the demo job's input).

    python examples/make_prompts.py [OUT.parquet]

Deterministic: the same file every run, so the demo's output is reproducible. The
captions are held out: none of them is in the model's training set.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm_jobs.model.builtin.shapes import scenes as shapes  # noqa: E402


def prompts() -> pa.Table:
    record = json.loads((ROOT / "model" / "builtin" / "shapes" / "training.json").read_text())
    train = set(shapes.captions(record["pictures"], record["seed"]))
    rows = [scene.caption for scene in shapes.held_out(64, seed=2026, exclude=train)]
    ids = [f"demo-{index:03d}" for index in range(len(rows))]
    return pa.table({"id": pa.array(ids, pa.string()), "prompt": pa.array(rows, pa.string())})


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).with_name("prompts.parquet")
    table = prompts()
    pq.write_table(table, out, compression="zstd")
    print(f"wrote {table.num_rows} prompts to {out}")


if __name__ == "__main__":
    main(sys.argv)
