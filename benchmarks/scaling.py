"""1 actor vs 2 (or more) actors on the same rows, through `python -m ldm_jobs run`.

    python benchmarks/scaling.py                          # 128 prompts, tiny model, CPU actors
    python benchmarks/scaling.py --gpus-per-actor 1 --model PATH --size 512 --steps 30
    python benchmarks/scaling.py --gpus-per-actor 1 --model sd15-random --size 512 --steps 30
                                 # a random SD 1.5-shaped model, written for the run

Each actor count runs the same job (real shards written, local Ray), interleaved
(1, 2, 1, 2, ...), medians reported. Two throughputs per run: images / the manifest's wall
seconds (Ray start and model loads included) and images / the busiest actor's busy
seconds (steady state: the actors work side by side, so the slowest one sets the pace).
With --nodes, a simulated multi-node cluster instead of one local Ray: a head without CPUs
and one 1-CPU raylet per actor (ray.cluster_utils.Cluster, on this machine), a node added
before each larger count, so the table reads as the efficiency of each added node. With --bare (CPU only), the bare pipeline in this process with 1 and with N torch threads
as a reference: whether more actors or more threads use the cores better (on a machine
whose cores are busy with other work, N > 1 threads can be pathologically slow: OpenMP
spins waiting for its threads). Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from job_overhead import job_spec, run_bare, run_job, task_rows, write_prompts  # noqa: E402
from sd15_folder import resolve_model  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows-per-shard", type=int, default=16)
    parser.add_argument("--actors", default="1,2", help="actor counts to compare")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--model", default="builtin:tiny-random",
                        help="a model source, or sd15-random (benchmarks/sd15_folder.py)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default float16 with GPUs, float32 without")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nodes", action="store_true",
                        help="N actors on N simulated 1-CPU nodes (ray.cluster_utils.Cluster)")
    parser.add_argument("--bare", action="store_true",
                        help="also time the bare pipeline in this process with 1..N threads")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.actors.split(",")]

    args.dtype = args.dtype or ("float16" if args.gpus_per_actor else "float32")
    work = Path(tempfile.mkdtemp(prefix="scaling-"))
    args.model = resolve_model(args.model, work, "cuda" if args.gpus_per_actor else "cpu")
    input_path = work / "prompts.parquet"
    write_prompts(input_path, args.rows)
    specs = {}
    for n in counts:
        args.actors = n
        spec = job_spec(args, input_path, work / f"out-{n}")
        path = work / f"job-{n}.json"
        path.write_text(json.dumps(spec))
        specs[n] = (path, work / f"out-{n}", spec)

    bare_rows: dict[int, list[float]] = {}
    pipeline = rows = bare_spec = None
    if args.bare and not args.gpus_per_actor:
        import torch

        from ldm_jobs.jobs.spec import parse_spec
        from ldm_jobs.model import load_pipeline

        bare_spec = parse_spec(specs[counts[0]][2])
        rows = task_rows(bare_spec)
        pipeline = load_pipeline(args.model, dtype=args.dtype)
        run_bare(pipeline, bare_spec, rows[: args.batch])  # warm-up

    results: dict[int, list[dict]] = {n: [] for n in counts}
    if args.nodes:
        nodes_run(specs, counts, results, args.repeats)
    for _ in range(0 if args.nodes else args.repeats):
        for n in counts:
            results[n].append(run_job(specs[n][0], specs[n][1]))
            print(f"{n} actor(s): {results[n][-1]}", file=sys.stderr, flush=True)
            if pipeline is not None:
                torch.set_num_threads(n)
                start = time.perf_counter()
                run_bare(pipeline, bare_spec, rows)
                bare_rows.setdefault(n, []).append(time.perf_counter() - start)

    kind = f"{args.gpus_per_actor:g} GPU(s)" if args.gpus_per_actor else "CPU"
    kind += ", one per simulated 1-CPU node" if args.nodes else ""
    print(f"\nrows={args.rows} batch={args.batch} rows_per_shard={args.rows_per_shard} "
          f"steps={args.steps} size={args.size} sampler={args.sampler} model={args.model} "
          f"dtype={args.dtype} "
          f"actors: {kind} each; repeats={args.repeats} (medians, interleaved)\n")
    print("| actors | wall s | images/s (wall) | busiest actor s | images/s (steady) "
          "| steady vs 1 actor |")
    print("|---|---|---|---|---|---|")
    base = None
    for n in counts:
        wall = statistics.median(r["wall"] for r in results[n])
        busy = statistics.median(r["busy"] for r in results[n])
        steady = args.rows / busy
        base = base or steady
        print(f"| {n} | {wall:.2f} | {args.rows / wall:.2f} | {busy:.2f} | {steady:.2f} "
              f"| {steady / base:.2f}x |")
    if bare_rows:
        print("\nin-process reference, bare pipeline over the same rows:\n")
        print("| torch threads | seconds | images/s | vs 1 thread |")
        print("|---|---|---|---|")
        first = None
        for n, times in bare_rows.items():
            seconds = statistics.median(times)
            first = first or seconds
            print(f"| {n} | {seconds:.2f} | {args.rows / seconds:.2f} | {first / seconds:.2f}x |")


def nodes_run(specs: dict, counts: list[int], results: dict, repeats: int) -> None:
    """Each count's job on a Cluster grown to that many 1-CPU nodes (counts ascending)."""
    import os

    os.environ["RAY_AUTH_MODE"] = "disabled"  # a throwaway cluster: no token files
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="scaling-ray-")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0,
                                                            "include_dashboard": False})
    try:
        for n in sorted(counts):
            while len(cluster.list_all_nodes()) < n + 1:
                cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            for _ in range(repeats):
                results[n].append(run_job(specs[n][0], specs[n][1], address=cluster.address))
                print(f"{n} node(s): {results[n][-1]}", file=sys.stderr, flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
