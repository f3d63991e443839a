"""How much memory and time does planning (what `ldm-jobs validate` runs) take per input size?

Writes Parquet prompt tables of 10k, 100k and 1M rows (to a temporary folder), then plans
each in a fresh Python process (so one size's peak cannot hide another's) and prints the
process's peak RSS (`resource.getrusage(...).ru_maxrss`) and the time of `make_plan`
plus `Plan.describe`. Two inputs per size: unique ids, and ids of which 10% repeat an
earlier one (planning reads the id column to find repeats: the heaviest part).

    .venv/bin/python benchmarks/plan_memory.py [--sizes 10000 100000 1000000] [--expanded]

`--expanded` adds the expansion case: 1,000 template rows x 1,000 random variants x a
10-point sweep (10M images). Target: under a minute and under 1 GB peak; shards are
ranges of the expansion, so nothing per image is held.

    .venv/bin/python benchmarks/plan_memory.py [--files 1] [--rows-per-shard 256] [--only unique]

Inputs over `jobs.dedup.IN_MEMORY_ROWS` (5M) rows are checked for repeated ids on disk
(hash partitions), so the driver's peak should stay flat as rows grow; `--files 10`
writes each input as 10 Parquet files (written one at a time, so 100M rows fit).

Target: under 1 GB peak at 1M rows. Planning reads Parquet footers and the id column
only; shards are row ranges, never rows.

The driver script itself imports only the standard library and writes the inputs in a
subprocess too: on Linux a child's ru_maxrss starts from its parent's RSS at fork, so a
parent holding a million-row table would inflate every figure. VmHWM (the child's own
high-water mark from /proc) is printed beside it as a cross-check.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in the fresh process: imports first (their RSS is reported apart), then the plan.
CHILD = r"""
import json, resource, sys, time
args = json.loads(sys.argv[1])
sys.path[:0] = [args["root"], args["root"] + "/benchmarks"]
from ldm_jobs.jobs.plan import make_plan
from ldm_jobs.jobs.spec import parse_spec
from procmem import status_bytes

def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

def hwm_mb():
    return status_bytes("VmHWM") / 2**20 or float("nan")

imported = rss_mb()
spec = parse_spec({"input": {"path": args["input"]},
                   "output": {"path": args["output"], "rows_per_shard": args["per_shard"]},
                   "sampling": {"width": 64, "height": 64}, **args.get("extra", {})})
started, cpu_started = time.perf_counter(), time.process_time()
plan = make_plan(spec)
text = plan.describe()
seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
print(json.dumps({"rows": plan.input_rows, "shards": len(plan.shards),
                  "duplicates": sum(len(s.duplicates) for s in plan.shards),
                  "seconds": seconds, "cpu": cpu, "import_mb": imported, "peak_mb": rss_mb(),
                  "hwm_mb": hwm_mb()}))
"""


def write_input(path: Path, rows: int, duplicate_share: float, files: int = 1) -> None:
    """`rows` prompts of ~60 characters with ids; a share of ids repeat earlier ones.
    With files > 1, `path` is a folder of that many files, written one at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    if files > 1:
        path.mkdir()
    bounds = np.linspace(0, rows, files + 1).astype(np.int64)
    for number, (first, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        index = np.arange(first, end, dtype=np.int64)
        key = index.copy()
        repeat = rng.random(len(index)) < duplicate_share
        repeat[index == 0] = False
        key[repeat] = (rng.random(int(repeat.sum())) * index[repeat]).astype(np.int64)
        ids = pc.binary_join_element_wise("row-", pc.cast(pa.array(key), pa.string()), "")
        prompts = pc.binary_join_element_wise(
            "a photograph of object number ", pc.cast(pa.array(index), pa.string()),
            ", studio lighting, 50mm", "")
        table = pa.table({"id": ids, "prompt": prompts,
                          "seed": pa.array(index % 1000, pa.int64())})
        target = path / f"part-{number:04d}.parquet" if files > 1 else path
        pq.write_table(table, target, row_group_size=64 * 1024)
        del table, ids, prompts


def write_in_subprocess(path: Path, rows: int, duplicate_share: float, files: int) -> None:
    subprocess.run([sys.executable, __file__, "--write", str(path), str(rows),
                    str(duplicate_share), str(files)], check=True)


EXPANDED = {"expand": {"prompts": {"mode": "random", "variants": 1000},
                       "sweep": {"guidance_scale": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}}}


def measure(root: Path, input_path: Path, per_shard: int = 256,
            extra: dict | None = None) -> dict:
    args = {"root": str(ROOT), "input": str(input_path), "output": str(root / "out"),
            "per_shard": per_shard, "extra": extra or {}}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"planning {input_path} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--expanded", action="store_true",
                        help="also plan 1,000 rows x 1,000 variants x 10 sweep points")
    parser.add_argument("--files", type=int, default=1, help="input files per input")
    parser.add_argument("--rows-per-shard", type=int, default=256)
    parser.add_argument("--only", choices=["unique", "repeat"], help="one kind of ids only")
    parser.add_argument("--write", nargs=4, metavar=("PATH", "ROWS", "SHARE", "FILES"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        write_input(Path(args.write[0]), int(args.write[1]), float(args.write[2]),
                    int(args.write[3]))
        return
    kinds = [(label, share) for label, share in (("unique", 0.0), ("10% repeat", 0.10))
             if args.only is None or label.endswith(args.only)]
    header = (f"{'rows':>9}  {'ids':<12} {'shards':>6} {'repeats':>8} {'plan s':>7} {'CPU s':>6} "
              f"{'import MB':>9} {'peak MB':>8} {'VmHWM MB':>8}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="plan-memory-") as folder:
        root = Path(folder)
        for rows in args.sizes:
            for label, share in kinds:
                path = root / f"in-{rows}-{int(share * 100)}"
                path = path if args.files > 1 else path.with_suffix(".parquet")
                write_in_subprocess(path, rows, share, args.files)
                result = measure(root, path, args.rows_per_shard)
                assert result["rows"] == rows
                print(f"{rows:>9}  {label:<12} {result['shards']:>6} {result['duplicates']:>8} "
                      f"{result['seconds']:>7.2f} {result['cpu']:>6.1f} {result['import_mb']:>9.0f} "
                      f"{result['peak_mb']:>8.0f} {result['hwm_mb']:>8.0f}", flush=True)
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if args.expanded:
            path = root / "templates.parquet"
            write_in_subprocess(path, 1000, 0.0, 1)
            result = measure(root, path, args.rows_per_shard, EXPANDED)
            assert result["rows"] == 10_000_000
            print(f"{'1000x1000x10':>12}  expanded {result['shards']:>6} "
                  f"{result['seconds']:>7.2f} s {result['import_mb']:>6.0f} MB imports "
                  f"{result['peak_mb']:>6.0f} MB peak {result['hwm_mb']:>6.0f} MB VmHWM", flush=True)


if __name__ == "__main__":
    main()
