"""Peak host memory of loading an SDXL base 1.0-shaped model (2.6 B parameters), per dtype.

The model is built here with random weights (diffusers + transformers, the SDXL base 1.0
configs of compare_diffusers.sdxl_reference), saved once as a diffusers folder in float16
(the hub's usual variant), then loaded by `load_pipeline` in a fresh process per dtype. The
figure is the load's peak RSS above the process's RSS after its imports (VmHWM, reset at
the start) and its peak anonymous memory (sampled; the RSS also counts the mapped file's
pages, which are cache), against the size of the weights in the target dtype: our loader
builds the modules on the meta device and casts each tensor as it is copied in, so about
one copy of the weights should be the anonymous peak. Needs about 16 GB of RAM and 6 GB of disk; CPU only.

    python benchmarks/sdxl_load_memory.py [--dtypes float16,float32] [--folder DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_folder(folder: Path) -> None:
    sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
    import torch
    from compare_diffusers import sdxl_reference
    from tiny_sdxl import save_sdxl_folder

    ref = sdxl_reference("cpu")
    for module in (ref.unet, ref.vae, ref.text_encoder, ref.text_encoder_2):
        module.to(torch.float16)
    save_sdxl_folder(ref, folder)


def measure(folder: str, dtype: str) -> dict:
    """Run in a fresh process: load, report the peak above the post-import baseline."""
    import threading

    import torch  # noqa: F401 - imported before the baseline, as any user has it
    from procmem import status_bytes as rss

    from ldm_jobs import load_pipeline

    base, base_anon = rss("VmRSS"), rss("RssAnon")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM restarts from the current RSS
    # VmHWM counts the safetensors files' mapped pages too (page cache the kernel can drop);
    # the anonymous peak is what the loader itself holds: sampled every 5 ms
    anon_peak, done = [base_anon], threading.Event()

    def watch() -> None:
        while not done.wait(0.005):
            anon_peak[0] = max(anon_peak[0], rss("RssAnon"))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    pipe = load_pipeline(folder, dtype=dtype)
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    peak = rss("VmHWM") - base
    anon = max(anon_peak[0], rss("RssAnon")) - base_anon
    modules = [pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2]
    weights = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    return {"dtype": dtype, "family": pipe.family, "seconds": round(seconds, 1),
            "weights_mib": round(weights / 2**20), "peak_rss_mib": round(peak / 2**20),
            "peak_anonymous_mib": round(anon / 2**20), "anonymous_copies": round(anon / weights, 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float16,float32")
    parser.add_argument("--folder", help="an SDXL folder to load (default: build one)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.folder, args.measure)))
        return
    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="sdxl-mem-")) / "sdxl"
    if not (folder / "model_index.json").exists():
        start = time.perf_counter()
        build_folder(folder)
        print(f"built {folder} in {time.perf_counter() - start:.0f} s", flush=True)
    for dtype in args.dtypes.split(","):
        done = subprocess.run([sys.executable, __file__, "--folder", str(folder), "--measure", dtype],
                              capture_output=True, text=True, check=True)
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
