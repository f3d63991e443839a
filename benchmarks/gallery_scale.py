"""How long does `show --html` take, how much memory does it hold, and how fast does the
page render, on a large output?

Writes a synthetic job output of N rows (tiny noise PNGs, the shard columns a job writes,
per-shard records with worker and start/finish times, 1% rejected rows, a manifest) into
a temporary folder, then, each in a fresh Python process (so one run's peak cannot hide
another's):
  1. `ldm-jobs show OUT --html SITE` from nothing: wall time and peak RSS;
  2. the same again with nothing new (the incremental path);
  3. on the largest size only, the page in headless Chromium: page 1 rendered with its
     visible thumbnails decoded (ms since navigation start), and a prompt search over
     every row (ms from the query to the rendered results).

    .venv/bin/python benchmarks/gallery_scale.py [--sizes 10000 100000] [--loads 5]

Targets: page 1 under 2 s at 100,000 rows; peak RSS flat in N (the thumbnails stream
shard by shard). Not part of the tests: figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS_PER_SHARD = 256
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,900"]

# Writes the synthetic output (in its own process: the parent stays small).
MAKE = r"""
import io, json, os, sys, time
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from PIL import Image
from ldm_jobs.jobs.sinks import IMAGE_FIELDS
rows, out, per_shard = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
os.makedirs(os.path.join(out, "_shards"), exist_ok=True)
rng = np.random.default_rng(0)
words = ["red", "green", "blue", "cube", "ball", "tree", "house", "cat", "dog", "boat"]
clock, schema = 1.8e9, pa.schema(IMAGE_FIELDS + [pa.field("style", pa.string())])
for number, first in enumerate(range(0, rows, per_shard)):
    count = min(per_shard, rows - first)
    ids = [f"{i:07d}" for i in range(first, first + count)]
    rejected = [i for i in ids if int(i) % 100 == 99]
    kept = [i for i in ids if int(i) % 100 != 99]
    images = []
    for _ in kept:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
        images.append(buffer.getvalue())
    n = len(kept)
    table = pa.table({
        "id": kept, "prompt": [f"a {words[int(i) % 3]} {words[3 + int(i) % 7]} {i}" for i in kept],
        "negative_prompt": [""] * n, "seed": [int(i) * 7919 for i in kept],
        "sampler": [["euler", "ddim", "dpmpp_2m"][int(i) % 3] for i in kept], "steps": [20] * n,
        "guidance_scale": [[3.0, 5.0, 7.5][int(i) % 3] for i in kept], "width": [8] * n,
        "height": [8] * n, "strength": [None] * n, "model": ["builtin:shapes@sha256:00"] * n,
        "loras": [[]] * n,
        "image": images, "image_format": ["png"] * n,
        "style": [["oil", "photo", "sketch", "ink"][int(i) % 4] for i in kept]}, schema=schema)
    name = f"part-{number:05d}"
    pq.write_table(table, os.path.join(out, name + ".parquet"), row_group_size=64)
    errors = pa.table({"id": rejected, "reason": ["prompt: empty"] * len(rejected),
                       "row": [int(i) for i in rejected], "shard": [name] * len(rejected),
                       "prompt": [""] * len(rejected)})
    pq.write_table(errors, os.path.join(out, "_shards", name + ".errors.parquet"))
    worker, busy = f"node{number % 4}:cuda", 20.0 + (number % 7)
    started = clock + (number // 4) * 27.0
    record = {"name": name, "fingerprint": "synthetic", "file": name + ".parquet", "rows": n,
              "input_rows": count, "accepted_rows": n, "rejected": len(rejected), "bytes": 0,
              "sha256": f"synthetic-{number}", "busy_seconds": busy, "worker": worker,
              "model": "builtin:shapes@sha256:00", "errors": name + ".errors.parquet",
              "started_at": started, "finished_at": started + busy}
    with open(os.path.join(out, "_shards", name + ".json"), "w") as handle:
        json.dump(record, handle)
rejected = rows // 100
manifest = {"name": f"synthetic-{rows}", "spec": {"input": {"prompt_column": "prompt"}},
            "model": {"name": "builtin:shapes", "hash": "sha256:00"},
            "counts": {"input_rows": rows, "generated": rows - rejected, "rejected": rejected,
                       "accepted_rows": rows - rejected},
            "timings": {"wall_seconds": 0, "busy_seconds": {}, "busy_seconds_total": 0,
                        "images_per_gpu_hour": None}, "shards": [], "complete": True}
with open(os.path.join(out, "_manifest.json"), "w") as handle:
    json.dump(manifest, handle)
open(os.path.join(out, "_SUCCESS"), "w").close()
"""

# Runs `show --html` in a fresh process and reports its time and memory high-water mark.
SHOW = r"""
import json, sys, time, contextlib, io
sys.path.insert(0, "benchmarks")  # run with the checkout as its working directory
from ldm_jobs.jobs.cli import main
from procmem import status_bytes
started = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    code = main(["show", sys.argv[1], "--html", sys.argv[2]])
seconds = time.perf_counter() - started
print(json.dumps({"code": code, "seconds": seconds, "peak_mib": status_bytes("VmHWM") / 2**20}))
"""


def run_child(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def browser_figures(site: Path, loads: int) -> dict[str, float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="gallery-bench-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options,
                              service=Service(shutil.which("chromedriver") or "chromedriver"))
    driver.set_script_timeout(120)
    page_ms, search_ms = [], []
    try:
        for _ in range(loads):
            driver.get("about:blank")
            driver.get((site / "index.html").as_uri())
            page_ms.append(driver.execute_async_script("""
                const done = arguments[arguments.length - 1];
                (function wait() {
                  if (!document.body.dataset.page) return setTimeout(wait, 2);
                  const shown = Array.from(document.images)
                    .filter(i => i.getBoundingClientRect().top < innerHeight);
                  Promise.all(shown.map(i => i.decode().catch(() => null)))
                    .then(() => done(performance.now()));
                })();"""))
            search_ms.append(driver.execute_async_script("""
                const done = arguments[arguments.length - 1];
                const start = performance.now();
                document.body.dataset.page = "";
                location.hash = "#q=" + encodeURIComponent("green house");
                (function wait() {
                  if (!document.body.dataset.page) return setTimeout(wait, 2);
                  done(performance.now() - start);
                })();"""))
        results = driver.find_element("tag name", "body").get_attribute("data-results")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return {"page1_ms": statistics.median(page_ms), "page1_ms_max": max(page_ms),
            "search_ms": statistics.median(search_ms), "search_hits": int(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--loads", type=int, default=5, help="page loads in the browser")
    parser.add_argument("--keep", help="write under this folder and keep it")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="gallery-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        for rows in args.sizes:
            out, site = root / f"out-{rows}", root / f"site-{rows}"
            started = time.perf_counter()
            if not out.exists():
                run_child(MAKE, str(rows), str(out), str(ROWS_PER_SHARD))
            made = time.perf_counter() - started
            shutil.rmtree(site, ignore_errors=True)  # the first run makes everything
            first = json.loads(run_child(SHOW, str(out), str(site)))
            again = json.loads(run_child(SHOW, str(out), str(site)))
            files = sum(1 for _ in site.rglob("*") if _.is_file())
            size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file()) / 2**20
            line = {"rows": rows, "output_made_s": round(made, 1),
                    "show_html_s": round(first["seconds"], 1),
                    "show_html_peak_mib": round(first["peak_mib"]),
                    "rerun_s": round(again["seconds"], 1),
                    "rerun_peak_mib": round(again["peak_mib"]),
                    "site_files": files, "site_mib": round(size, 1)}
            if rows == max(args.sizes):
                line.update({k: round(v, 1) if isinstance(v, float) else v
                             for k, v in browser_figures(site, args.loads).items()})
            print(json.dumps(line), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
