"""LoRA per row: what a batch of 8 rows costs with 8 different LoRAs, one shared LoRA, none.

    python benchmarks/lora.py                     # tiny random SD 1.x model, CPU
    python benchmarks/lora.py --side 64 --steps 10 --repeats 7 --threads 1

Each LoRA (ranks 16 and 64, alternating) covers the UNet's attention and feed-forward
layers and the text encoder, written in the kohya layout. Variants, interleaved
(plain, shared, mixed, plain, ...) after one warm-up each, medians reported:

- plain: no LoRA;
- shared: one LoRA for all 8 rows (added to the weights for the call, restored after);
- mixed: 8 different LoRAs, one per row (the base layers run once for the batch; each
  row's low-rank terms are added by stacked batched products, ranks padded: Punica's idea);
- mixed-gathered: the same batch, each LoRA's rows gathered, its two small layers run on
  them and scatter-added (PEFT's mixed-batch way).

Not a test: nothing here asserts a speed. Weights are random, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import lora_files as lf  # noqa: E402
from tiny_sd import make_reference, ours_from_reference  # noqa: E402

from ldm_jobs.model import lora_rows  # noqa: E402

ROWS = 8


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    ref = make_reference("sd1")
    pipe = ours_from_reference(ref)
    folder = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    paths = []
    for i in range(ROWS):
        rank = (16, 64)[i % 2]
        state = lf.kohya_state(lf.random_peft(ref.unet, lf.UNET_ATTENTION, rank, i),
                               lf.random_peft(ref.text_encoder, lf.TEXT, rank, 100 + i))
        paths.append(str(lf.save_safetensors(folder / f"l{i}.safetensors", state)))
    mixed = [{p: 0.8} for p in paths]
    variants = {
        "plain": (None, "stacked"),
        "shared": ([{paths[0]: 0.8}] * ROWS, "stacked"),
        "mixed": (mixed, "stacked"),
        "mixed-gathered": (mixed, "gathered"),
    }
    prompts = [f"prompt number {i}" for i in range(ROWS)]

    def run(loras, strategy="stacked") -> float:
        lora_rows.STRATEGY = strategy
        start = time.perf_counter()
        pipe.generate(prompts, seeds=list(range(ROWS)), steps=args.steps, guidance_scale=7.5,
                      sampler="dpmpp_2m", width=args.side, height=args.side, loras=loras)
        return time.perf_counter() - start

    pipe.text_cache_size = 0  # every call encodes its texts, as a job's fresh prompts do
    times: dict[str, list[float]] = {name: [] for name in variants}
    for loras, strategy in variants.values():
        run(loras, strategy)  # warm-up; adapters read and cached
    for _ in range(args.repeats):
        for name, (loras, strategy) in variants.items():
            times[name].append(run(loras, strategy))
    base = statistics.median(times["plain"])
    print(f"batch {ROWS}, {args.side}x{args.side}, {args.steps} steps, dpmpp_2m, cfg 7.5, "
          f"float32, {args.threads} thread(s), {args.repeats} interleaved runs")
    print("| variant | median s | vs plain |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
