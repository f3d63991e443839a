"""Write examples/prompts.parquet: 64 varied prompts with ids (the demo job's input).

    python examples/make_prompts.py [OUT.parquet]

Deterministic: the same file every run, so the demo's output is reproducible.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SUBJECTS = [
    "a red cube", "a blue sphere", "a green pyramid", "a yellow torus",
    "a lighthouse on a cliff", "a cat sleeping on a windowsill", "an old oak tree",
    "a bowl of ripe oranges",
]
SETTINGS = [
    "on a white table, studio lighting", "at sunset, warm light", "in fog, soft shadows",
    "under a starry night sky", "on a checkerboard floor", "in a watercolor painting",
    "as a pixel-art sprite", "in the style of a 1970s travel poster",
]


def prompts() -> pa.Table:
    rows = [f"{subject} {setting}" for setting in SETTINGS for subject in SUBJECTS]
    ids = [f"demo-{index:03d}" for index in range(len(rows))]
    return pa.table({"id": pa.array(ids, pa.string()), "prompt": pa.array(rows, pa.string())})


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).with_name("prompts.parquet")
    table = prompts()
    pq.write_table(table, out, compression="zstd")
    print(f"wrote {table.num_rows} prompts to {out}")


if __name__ == "__main__":
    main(sys.argv)
