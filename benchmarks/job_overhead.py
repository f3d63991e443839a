"""What the job system costs over the bare pipeline, on the same rows.

    python benchmarks/job_overhead.py                 # 96 prompts, tiny model, 64x64, 1 actor
    python benchmarks/job_overhead.py --rows 128 --repeats 3 --actors 1
    python benchmarks/job_overhead.py --model sd15-random --gpus-per-actor 1 --size 512 \
        --steps 30 --rows 64 --batch 8 --rows-per-shard 32        # GPU: SD 1.5 shapes, float16

Three ways through the same rows (same prompts, seeds, sampler, steps and batch size),
interleaved (job, bare, worker, job, ...), medians reported:

- job:    `python -m ldm_jobs run SPEC --overwrite --quiet` in a fresh process on a local Ray,
          writing real Parquet shards (PNG images), manifest and _SUCCESS;
- bare:   `pipeline.generate` over the rows in batches, in this process, model already
          loaded, same torch threads as one Ray actor gets (num_cpus=1 -> 1 thread);
          PNG encoding of its images timed apart;
- worker: the job's own ShardWorker over the same shard plan in this process, without
          Ray, with `generate` timed inside it: the per-shard work around generation.

Efficiency = bare generation time / job time, with the job's time counted three ways:
the whole process (interpreter, imports, Ray start, actor start and model load, shards,
finalize), the manifest's wall seconds (from `run_job`'s start), and the shards' busy
seconds (steady state: start-up excluded). A probe times Ray start plus one actor that
loads the model, to split the start-up. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "ring", "cross"]


def write_prompts(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = [f"a {COLORS[i % 8]} {SHAPES[(i // 8) % 6]} on a {COLORS[(i * 3 + 1) % 8]} "
               f"background, number {i}" for i in range(rows)]
    ids = [f"p{i:05d}" for i in range(rows)]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), path)


def job_spec(args, input_path: Path, output_path: Path) -> dict:
    return {
        "name": "job-overhead",
        "model": args.model,
        "input": {"path": str(input_path), "prompt_column": "prompt", "id_column": "id"},
        "output": {"path": str(output_path), "format": "parquet", "image_format": "png",
                   "rows_per_shard": args.rows_per_shard},
        "sampling": {"sampler": args.sampler, "steps": args.steps, "guidance_scale": 7.5,
                     "width": args.size, "height": args.size, "seed": 0,
                     "images_per_prompt": 1, "negative_prompt": ""},
        "compute": {"actors": args.actors, "batch_size": args.batch,
                    "gpus_per_actor": args.gpus_per_actor, "dtype": args.dtype},
    }


# ----------------------------------------------------------------------------- the three ways
def run_job(spec_path: Path, output_path: Path, address: str | None = None) -> dict:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    if address:
        env["RAY_ADDRESS"] = address
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ldm_jobs", "run", str(spec_path), "--overwrite",
                           "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True)
    process = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the job failed ({done.returncode}):\n{done.stderr[-3000:]}")
    manifest = json.loads((output_path / "_manifest.json").read_text())
    timings = manifest["timings"]
    busy = timings["busy_seconds"]
    return {"process": process, "wall": timings["wall_seconds"],
            "busy": max(busy.values()) if busy else 0.0, "busy_total": timings["busy_seconds_total"],
            "generated": manifest["counts"]["generated"], "shards": len(manifest["shards"])}


class RunningRay:
    """A local Ray started once with `ray start --head`, as a user keeps one up for many
    small jobs; `run` joins it through RAY_ADDRESS instead of starting its own."""

    def __init__(self, cpus: int):
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
        self.ray = str(Path(sys.executable).with_name("ray"))
        subprocess.run([self.ray, "start", "--head", f"--num-cpus={cpus}", "--include-dashboard=false",
                        "--disable-usage-stats", "--object-store-memory=200000000"],
                       env=self.env, check=True, capture_output=True, text=True)
        self.address = "auto"  # the cluster `ray start` just recorded on this machine
        time.sleep(10)  # a cluster kept up is a settled one: let its agents finish starting

    def stop(self) -> None:
        subprocess.run([self.ray, "stop", "--force"], env=self.env, capture_output=True)


def task_rows(spec) -> list[tuple[str, str, int]]:
    """(id, prompt, seed) of every row, as the job derives them."""
    import pyarrow.parquet as pq

    from ldm_jobs.model.seeds import derive_seed

    table = pq.read_table(spec.input.path)
    return [(i, p, derive_seed(spec.sampling.seed, i))
            for i, p in zip(table.column("id").to_pylist(), table.column("prompt").to_pylist())]


def run_bare(pipeline, spec, rows) -> dict:
    from ldm_jobs.jobs.images import encode

    s = spec.sampling
    start = time.perf_counter()
    images = []
    for i in range(0, len(rows), spec.compute.batch_size):
        batch = rows[i:i + spec.compute.batch_size]
        images += pipeline.generate([p for _, p, _ in batch], seeds=[seed for *_, seed in batch],
                                    negative_prompts=s.negative_prompt, steps=s.steps,
                                    guidance_scale=s.guidance_scale, sampler=s.sampler,
                                    width=s.width, height=s.height)
    generate = time.perf_counter() - start
    start = time.perf_counter()
    for image in images:
        encode(image, spec.output.image_format, "", spec.output.quality)
    return {"generate": generate, "encode": time.perf_counter() - start}


def run_worker(pipeline, spec) -> dict:
    from ldm_jobs.jobs import sinks
    from ldm_jobs.jobs.plan import make_plan
    from ldm_jobs.jobs.worker import ShardWorker

    sinks.clear_output(spec)
    plan = make_plan(spec)
    spent = {"generate": 0.0}
    original = pipeline.generate

    def timed_generate(*a, **k):
        start = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            spent["generate"] += time.perf_counter() - start

    pipeline.generate = timed_generate
    worker = ShardWorker(spec, pipeline=pipeline)
    try:
        start = time.perf_counter()
        for shard in plan.pending():
            worker.run(shard)
        total = time.perf_counter() - start
    finally:
        worker.close()
        del pipeline.generate
    return {"total": total, "generate": spent["generate"]}


BARE_PROCESS = """
import json, sys, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
import pyarrow.parquet as pq
from ldm_jobs.jobs.images import encode
from ldm_jobs.model.seeds import derive_seed
from ldm_jobs.model import load_pipeline
s = args["sampling"]
pipe = load_pipeline(args["model"], device=args["device"], dtype=args["dtype"])
table = pq.read_table(args["input"])
ids, prompts = table.column("id").to_pylist(), table.column("prompt").to_pylist()
seeds = [derive_seed(s["seed"], i) for i in ids]
batch = args["batch"]
for i in range(0, len(prompts), batch):
    images = pipe.generate(prompts[i:i + batch], seeds=seeds[i:i + batch],
                           negative_prompts=s["negative_prompt"], steps=s["steps"],
                           guidance_scale=s["guidance_scale"], sampler=s["sampler"],
                           width=s["width"], height=s["height"])
    for image in images:
        encode(image, "png", "", 95)
"""


def run_bare_process(args, spec, device: str) -> float:
    """Seconds of a fresh process that does what a user's own script would: import, load
    the model, generate every row in batches and PNG-encode the images (no job system)."""
    payload = {"threads": args.threads, "model": args.model, "device": device,
               "dtype": args.dtype, "input": spec.input.path, "batch": args.batch,
               "sampling": spec.sampling.model_dump()}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", BARE_PROCESS, json.dumps(payload)], cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
    return time.perf_counter() - start


def startup_probe(model: str, gpus: float = 0.0, dtype: str = "float32") -> dict[str, float]:
    """What a job pays before its first shard, in a fresh process like the job's: a local
    Ray's start, one actor's start (a worker process importing torch and the model
    package), and the model load inside it (on the GPU when `gpus`)."""
    device = "cuda" if gpus else "cpu"
    code = f"""
import json, logging, time
start = time.perf_counter()
import ray
ray.init(include_dashboard=False, logging_level=logging.WARNING)
ray_up = time.perf_counter()

@ray.remote(num_cpus=1, num_gpus={gpus!r})
class Loader:
    def __init__(self):
        from ldm_jobs import model
    def load(self):
        from ldm_jobs.model import load_pipeline
        start = time.perf_counter()
        self.pipe = load_pipeline({model!r}, device={device!r}, dtype={dtype!r})
        return time.perf_counter() - start

actor = Loader.remote()
ray.get(actor.__ray_ready__.remote())
actor_up = time.perf_counter()
load = ray.get(actor.load.remote())
print(json.dumps({{"ray_start": ray_up - start, "actor_start": actor_up - ray_up, "model_load": load}}))
ray.shutdown()
"""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def interpreter_probe() -> float:
    """Seconds for a fresh interpreter to import what `python -m ldm_jobs run` imports before
    it starts Ray (the driver never imports torch)."""
    code = "import ldm_jobs.jobs.cli, ldm_jobs.jobs.runner, ldm_jobs.jobs.spec"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows-per-shard", type=int, default=32)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--model", default="builtin:tiny-random",
                        help="a model source, or sd15-random: a random SD 1.5-shaped folder "
                             "written for the run (benchmarks/sd15_folder.py)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0,
                        help="> 0: the job's actors and the bare pipeline run on CUDA")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default float16 with GPUs, float32 without")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the in-process runs (a Ray actor with "
                             "num_cpus=1 gets OMP_NUM_THREADS=1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-running-ray", dest="running_ray", action="store_false",
                        help="skip the runs that join a Ray kept up with `ray start --head`")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("float16" if args.gpus_per_actor else "float32")
    device = "cuda" if args.gpus_per_actor else "cpu"

    import torch
    from sd15_folder import resolve_model

    from ldm_jobs.jobs.spec import parse_spec
    from ldm_jobs.model import load_pipeline

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="job-overhead-"))
    args.model = resolve_model(args.model, work, device)
    input_path = work / "prompts.parquet"
    write_prompts(input_path, args.rows)
    job_out, worker_out = work / "job-out", work / "worker-out"
    spec_path = work / "job.json"
    spec_path.write_text(json.dumps(job_spec(args, input_path, job_out)))
    spec = parse_spec(job_spec(args, input_path, worker_out))
    rows = task_rows(spec)

    start = time.perf_counter()
    pipeline = load_pipeline(args.model, device=device, dtype=args.dtype)
    load_seconds = time.perf_counter() - start
    run_bare(pipeline, spec, rows[: args.batch])  # warm-up

    results: dict[str, list[dict]] = {"job": [], "bare": [], "worker": [], "joined": [],
                                      "bare_process": []}
    probes: dict[str, list] = {"startup": [], "interpreter": []}
    for _ in range(args.repeats):
        results["job"].append(run_job(spec_path, job_out))
        results["bare"].append(run_bare(pipeline, spec, rows))
        results["bare_process"].append({"process": run_bare_process(args, spec, device)})
        results["worker"].append(run_worker(pipeline, spec))
        probes["startup"].append(startup_probe(args.model, args.gpus_per_actor, args.dtype))
        probes["interpreter"].append(interpreter_probe())
        if args.running_ray:
            # kept up only for these runs: a plain ray.init() on this machine joins a Ray
            # that `ray start` left running, so the runs above must not see one
            running = RunningRay(cpus=args.actors)
            try:
                results["joined"].append(run_job(spec_path, job_out, running.address))
            finally:
                running.stop()

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    bare = med("bare", "generate")
    job_process, job_wall, job_busy = med("job", "process"), med("job", "wall"), med("job", "busy")
    worker_total, worker_generate = med("worker", "total"), med("worker", "generate")
    interpreter = statistics.median(probes["interpreter"])
    ray_start, actor_start, model_load = (statistics.median(p[key] for p in probes["startup"])
                                          for key in ("ray_start", "actor_start", "model_load"))
    startup = ray_start + actor_start + model_load
    n = args.rows
    print(f"\nmachine: {os.cpu_count()} CPU(s); rows={n} batch={args.batch} "
          f"rows_per_shard={args.rows_per_shard} actors={args.actors} steps={args.steps} "
          f"size={args.size} sampler={args.sampler} model={args.model} threads={args.threads} "
          f"device={device} dtype={args.dtype} "
          f"repeats={args.repeats} (medians, interleaved)\n")
    print("| way | seconds | images/s | efficiency (bare gen / this) |")
    print("|---|---|---|---|")
    table = [
        ("bare pipeline, generate only", bare),
        ("bare pipeline, generate + PNG encode", bare + med("bare", "encode")),
        ("worker without Ray (read, generate, encode, commit)", worker_total),
        ("job: shards' busy seconds (steady state)", job_busy),
        ("job: manifest wall (Ray start, actor load, shards, finalize)", job_wall),
        ("job: whole process (+ interpreter and imports)", job_process),
    ]
    if results["joined"]:
        table += [("job joining a running local Ray: manifest wall", med("joined", "wall")),
                  ("job joining a running local Ray: whole process", med("joined", "process"))]
    for name, seconds in table:
        print(f"| {name} | {seconds:.2f} | {n / seconds:.2f} | {100 * bare / seconds:.0f}% |")
    bare_process = med("bare_process", "process")
    print(f"\nend to end, imports and model load included: a bare script's process "
          f"{bare_process:.2f} s, the job's process {job_process:.2f} s: efficiency "
          f"{bare_process / job_process:.2f}")
    print("\nwhere the job's time goes (medians; seconds):\n")
    print("| part | seconds | share of job process |")
    print("|---|---|---|")
    shards_overhead = worker_total - worker_generate
    parts = [
        ("interpreter start and imports (probe)", interpreter),
        ("local Ray start (probe)", ray_start),
        ("actor start: worker process, torch and model imports (probe)", actor_start),
        ("model load inside the actor (probe)", model_load),
        ("generation (bare, same rows)", bare),
        ("per-shard work around generation (worker without Ray)", shards_overhead),
        ("Ray dispatch, finalize, rest (job wall - probe - busy)", max(0.0, job_wall - startup - job_busy)),
        ("actor's busy seconds beyond the in-process worker's", job_busy - worker_total),
    ]
    for name, seconds in parts:
        print(f"| {name} | {seconds:.2f} | {100 * seconds / job_process:.0f}% |")
    print(f"\nin-process model load: {load_seconds:.2f} s; generate inside the worker: "
          f"{worker_generate:.2f} s; PNG encode of {n} images: {med('bare', 'encode'):.2f} s; "
          f"job shards: {results['job'][-1]['shards']}; output kept in {work}")


if __name__ == "__main__":
    main()
