"""Our pipeline and diffusers' on the same weights, side by side in one run.

    python benchmarks/compare_diffusers.py                       # tiny model, CPU
    python benchmarks/compare_diffusers.py --shape sd15 --device cuda --dtype float16 --batch 8

Same weights (random), sampler, steps, batch, dtype and threads for both; prints images/s,
seconds per step, peak memory and the ratio ours / diffusers. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_sd import diffusers_pipeline, make_reference, ours_from_reference  # noqa: E402


def sd15_reference():
    """The SD 1.5 architecture with random weights (no download)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tiny_sd import CLIP_DIR, SD1_SCHEDULER, Reference
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
    )
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, hidden_act="quick_gelu"))
    tok = CLIPTokenizer(str(CLIP_DIR / "vocab.json"), str(CLIP_DIR / "merges.txt"), model_max_length=77)
    return Reference(unet.eval(), vae.eval(), text.eval(), tok, dict(SD1_SCHEDULER))


def peak_memory(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=None, help="image side (default 64 tiny, 512 sd15)")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = args.size or (64 if args.shape == "tiny" else 512)
    ref = make_reference("sd1") if args.shape == "tiny" else sd15_reference()
    torch_dtype = getattr(torch, args.dtype)

    ours = ours_from_reference(ref, dtype=args.dtype)
    ours.unet.to(args.device)
    ours.text_encoder.to(args.device)
    ours.vae.to(args.device)
    ours.device = torch.device(args.device)

    theirs = diffusers_pipeline(ref, args.sampler).to(args.device, torch_dtype)
    if args.dtype == "float16":
        theirs.vae.to(torch.float32)  # diffusers upcasts the VAE for float16 SD too (force_upcast)
    prompts = [f"benchmark prompt number {i}" for i in range(args.batch)]
    seeds = list(range(args.batch))

    def run_ours():
        ours.generate(prompts, seeds=seeds, steps=args.steps, guidance_scale=args.guidance,
                      sampler=args.sampler, width=size, height=size)

    def run_theirs():
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        theirs(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
               generator=generators, width=size, height=size, output_type="np")

    rows = []
    for name, fn in (("diffusers", run_theirs), ("ldm-jobs", run_ours)):
        reset_peak(args.device)
        seconds = timed(fn, args.device, args.repeats)
        rows.append((name, args.batch / seconds, seconds / args.steps, peak_memory(args.device)))

    print(f"shape={args.shape} device={args.device} dtype={args.dtype} batch={args.batch} "
          f"steps={args.steps} size={size} sampler={args.sampler} threads={args.threads}")
    print(f"{'pipeline':<10} {'images/s':>10} {'s/step':>10} {'peak MiB':>10}")
    for name, ips, sps, mem in rows:
        print(f"{name:<10} {ips:>10.3f} {sps:>10.4f} {mem:>10.0f}")
    print(f"ratio ldm-jobs/diffusers images/s: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
