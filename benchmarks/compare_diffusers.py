"""Our pipeline and diffusers' StableDiffusionPipeline on the same weights, side by side.

    python benchmarks/compare_diffusers.py                      # tiny random model, CPU
    python benchmarks/compare_diffusers.py --device cuda        # SD 1.5 shapes, 512x512 grid
    python benchmarks/compare_diffusers.py --device cuda --configs float16:8:30,bfloat16:8:30
    python benchmarks/compare_diffusers.py --family sdxl        # tiny SDXL, CPU
    python benchmarks/compare_diffusers.py --family sdxl --device cuda   # SDXL base shapes, 1024x1024

SDXL (`--family sdxl`): the reference is a StableDiffusionXLPipeline over random weights of
the SDXL base 1.0 shapes on CUDA (the tiny test SDXL on the CPU); ours is loaded the way
users load it, from that model saved as a diffusers folder (float32 safetensors), and the
load's peak host RSS is printed beside the size of the weights in the target dtype (the
loader builds on the meta device and casts tensor by tensor while reading).

Both pipelines get the same weights (random: the tiny test model on the CPU, the SD 1.5
UNet/VAE/text-encoder shapes on CUDA, built in code, nothing downloaded), sampler, steps,
batch, dtype, prompts, seeds and torch threads, and both attend with PyTorch's SDPA.
Runs are interleaved (A, B, A, B, ...) after a warm-up each, and the table holds medians:

- images/s: batch / wall seconds of one whole `generate` / pipeline call (text encoding,
  the sampler loop, VAE decode, PIL images);
- s/step: the UNet loop alone (first UNet call's start to the last one's end, per step),
  timed with CUDA events on a GPU;
- peak MiB: memory above what was held before the call (CUDA: max_memory_allocated;
  CPU: the RSS high-water mark, reset through /proc/self/clear_refs);
- TFLOP/s and MFU: the UNet's FLOPs per call (counted once with FlopCounterMode at this
  shape) times its calls, over the loop time; MFU against --peak-tflops (989: H100/H200
  dense bf16/fp16). GPU only;
- px diff: max / mean |ours - diffusers| over the images of the last run, in 1/255 (a
  seed-for-seed sanity check, not a test).

A config is DTYPE:BATCH:STEPS, optionally :VARIANT[+VARIANT] for extra rows of ours:
`layout` (channels-last flipped from the pipeline's default), `whole-decode` (the VAE
decodes the batch at once instead of in chunks), `no-text-cache`, `compile` (the UNet under
torch.compile as `compute.compile: true` runs it; it compiles during the warm-up).
Not a test: nothing here asserts a speed. float16 runs the VAE in float32 on both sides
(ours always does; diffusers' decode gets float32 latents, as its force_upcast does).
Imports only torch, diffusers, transformers and this project's model package.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from procmem import status_bytes  # noqa: E402
from tiny_sd import (  # noqa: E402
    CLIP_DIR,
    SD1_SCHEDULER,
    Reference,
    diffusers_pipeline,
    make_reference,
    ours_from_reference,
)

GPU_GRID = [f"{dtype}:{batch}:{steps}" for dtype in ("float16", "bfloat16")
            for batch in (1, 4, 8, 16) for steps in (30, 50)]
VARIANTS = ("layout", "whole-decode", "no-text-cache", "compile")


# ----------------------------------------------------------------------------- models
def sd15_reference(device: str) -> Reference:
    """The SD 1.5 architecture (UNet, VAE, CLIP ViT-L/14 text tower), random float32 weights
    made directly on `device`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
            attention_head_dim=8, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
            norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
        )
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=49406, eos_token_id=49407,
        ))
    tokenizer = CLIPTokenizer(str(CLIP_DIR / "vocab.json"), str(CLIP_DIR / "merges.txt"),
                              model_max_length=77)
    return Reference(unet.eval(), vae.eval(), text.eval(), tokenizer, dict(SD1_SCHEDULER))


def sdxl_reference(device: str):
    """The SDXL base 1.0 architecture (UNet, VAE, CLIP ViT-L and OpenCLIP bigG with its
    projection), random float32 weights made directly on `device`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tiny_sdxl import SDXL_SCHEDULER, SDXLReference
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
            sample_size=1024, scaling_factor=0.13025)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, hidden_act="gelu", projection_dim=1280, bos_token_id=0, eos_token_id=2))
    vocab, merges = str(CLIP_DIR / "vocab.json"), str(CLIP_DIR / "merges.txt")
    return SDXLReference(
        "sdxl", unet.eval(), vae.eval(), text.eval(), text_2.eval(),
        CLIPTokenizer(vocab, merges, model_max_length=77),
        CLIPTokenizer(vocab, merges, pad_token="!", model_max_length=77), dict(SDXL_SCHEDULER))


def sdxl_ours(ref, device: str, dtype: str, out) -> Any:
    """Our pipeline loaded from the reference saved as a diffusers folder; prints the load's
    peak host RSS against the weights' size in `dtype`."""
    import tempfile

    from tiny_sdxl import save_sdxl_folder

    from ldm_jobs import load_pipeline

    folder = Path(tempfile.mkdtemp(prefix="sdxl-bench-")) / "sdxl"
    save_sdxl_folder(ref, folder)
    memory = PeakMemory("cpu")  # host memory, wherever the weights end up
    memory.start()
    start = time.perf_counter()
    pipe = load_pipeline(str(folder), device=device, dtype=dtype)
    seconds = time.perf_counter() - start
    peak = memory.stop()
    modules = [m for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2) if m is not None]
    size = sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / 2**20
    print(f"load ({dtype}): {seconds:.1f} s, peak host RSS +{peak:.0f} MiB; the weights in "
          f"{dtype} on the {device}: {size:.0f} MiB ({peak / size:.2f} copies)\n", file=out, flush=True)
    return pipe


def ours_on(ref: Reference, device: str, dtype: str, hashed: bool):
    """Our pipeline with the reference's weights, key for key (hashing 1B parameters is
    skipped for the big model: the hash only names the model)."""
    if hashed:
        pipe = ours_from_reference(ref, dtype=dtype)
        pipe.unet.to(device), pipe.text_encoder.to(device), pipe.vae.to(device)
        pipe.device = torch.device(device)
        pipe.set_channels_last(pipe.device.type == "cpu")  # the default for the device
        return pipe
    from ldm_jobs.model.configs import TextConfig, UNetConfig, VAEConfig, from_dict
    from ldm_jobs.model.loading import assemble
    from ldm_jobs.model.text_encoder import CLIPTextModel
    from ldm_jobs.model.tokenizer import CLIPTokenizer
    from ldm_jobs.model.unet import UNet
    from ldm_jobs.model.vae import AutoencoderKL

    with torch.device(device):
        unet = UNet(from_dict(UNetConfig, dict(ref.unet.config)))
        vae = AutoencoderKL(from_dict(VAEConfig, dict(ref.vae.config)))
        text = CLIPTextModel(from_dict(TextConfig, ref.text_encoder.config.to_dict()))
    unet.load_state_dict(ref.unet.state_dict(), strict=True)
    vae.load_state_dict(ref.vae.state_dict(), strict=True)
    text.load_state_dict({k: v for k, v in ref.text_encoder.state_dict().items()
                          if not k.endswith("position_ids")}, strict=True)
    return assemble(CLIPTokenizer.default(), text, unet, vae, ref.scheduler_config,
                    name="sd15-random", digest="random", device=device, dtype=dtype)


def theirs_on(ref: Reference, device: str, dtype: str, sampler: str):
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch_dtype = getattr(torch, dtype)
    if not isinstance(ref, Reference):  # SDXL: its own pipeline decodes in float32 (force_upcast)
        from tiny_sdxl import diffusers_sdxl_pipeline

        pipe = diffusers_sdxl_pipeline(copy.deepcopy(ref), sampler).to(device, torch_dtype)
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        return pipe
    parts = Reference(copy.deepcopy(ref.unet), copy.deepcopy(ref.vae),
                      copy.deepcopy(ref.text_encoder), ref.tokenizer, ref.scheduler_config)
    pipe = diffusers_pipeline(parts, sampler).to(device, torch_dtype)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    if dtype == "float16":  # decode in float32 on both sides (see the module docstring)
        pipe.vae.to(torch.float32)
        decode = pipe.vae.decode
        pipe.vae.decode = lambda z, *a, **k: decode(z.float(), *a, **k)
    return pipe


# ----------------------------------------------------------------------------- measuring
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class LoopTimer:
    """First UNet call's start to the last call's end, and the number of calls."""

    def __init__(self, unet: torch.nn.Module, device: str):
        self.cuda = device.startswith("cuda")
        self.handles = [unet.register_forward_pre_hook(self._pre),
                        unet.register_forward_hook(self._post)]
        self.reset()

    def reset(self) -> None:
        self.first, self.last, self.calls = None, None, 0

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _pre(self, module, args) -> None:
        if self.first is None:
            self.first = self._mark()

    def _post(self, module, args, output) -> None:
        self.last = self._mark()
        self.calls += 1

    def seconds(self) -> float:  # after a sync
        if self.cuda:
            return self.first.elapsed_time(self.last) / 1e3
        return self.last - self.first


class PeakMemory:
    """Peak memory above the level at `start()`, in MiB."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self._watch: threading.Thread | None = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        self.base = status_bytes("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current RSS
            self._sampled = None
        except OSError:  # no clear_refs: sample the RSS from a thread instead
            self._sampled, self._stop = self.base, threading.Event()
            self._watch = threading.Thread(target=self._sample, daemon=True)
            self._watch.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, status_bytes("VmRSS"))

    def stop(self) -> float:
        if self.cuda:
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        if self._watch is not None:
            self._stop.set()
            self._watch.join()
            self._watch = None
            peak = self._sampled
        else:
            peak = status_bytes("VmHWM")
        return max(0, peak - self.base) / 2**20


def unet_flops(ours, batch: int, size: int, device: str) -> float:
    """FLOPs of one UNet call on `batch` latents, counted on a call with one latent (FLOPs
    are linear in the batch; attention counted through the math backend so it is seen)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, f = ours.unet, ours.vae_factor
    dtype = next(unet.parameters()).dtype
    latents = torch.randn(1, ours.latent_channels, size // f, size // f, device=device, dtype=dtype)
    width = unet.config.cross_attention_dim
    context = torch.randn(1, 77, width, device=device, dtype=dtype)
    added = {}
    if unet.add_embedding is not None:  # SDXL: pooled text and six time ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"pooled": torch.randn(1, pooled, device=device, dtype=dtype),
                 "time_ids": torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype)}
    backend = contextlib.nullcontext()
    if device.startswith("cuda"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = sdpa_kernel(SDPBackend.MATH)
    with torch.inference_mode(), backend, FlopCounterMode(display=False) as counter:
        unet(latents, torch.tensor(500.0, device=device), context, **added)
    return float(counter.get_total_flops()) * batch


def as_uint8(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])


@dataclass
class Row:
    name: str
    seconds: list[float] = field(default_factory=list)
    loop: list[float] = field(default_factory=list)
    calls: int = 0
    peak_mib: float = 0.0
    images: np.ndarray | None = None


class _Outer(torch.nn.Module):
    """A plain module around the compiled UNet, so the loop timer's hooks stay outside
    the compiled graph."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args)


def compiled_run(ours, batch: int, ours_call):
    """Our pipeline (same modules) with `compute.compile`'s setting: the UNet under
    torch.compile, batches bucketed to `batch`. Compiles during the warm-up."""
    compiled = copy.copy(ours)
    compiled.compile(batch_size=batch)
    outer = _Outer(compiled._compiled[1])
    compiled._compiled = (compiled.unet, outer)

    return (lambda: ours_call(compiled)), outer


# ----------------------------------------------------------------------------- one config
def run_config(ours, theirs, args, dtype: str, batch: int, steps: int, variants: list[str],
               flops_per_image_call: float | None, out) -> None:
    device = args.device
    prompts = [f"benchmark prompt number {i}, a red circle on a blue square" for i in range(batch)]
    seeds = list(range(batch))
    size = args.size

    def ours_call(pipe=ours):
        return pipe.generate(prompts, seeds=seeds, steps=steps, guidance_scale=args.guidance,
                             sampler=args.sampler, width=size, height=size)

    def theirs_call():
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return theirs(prompts, num_inference_steps=steps, guidance_scale=args.guidance,
                      generator=generators, width=size, height=size, output_type="pil").images

    def variant(name):
        def call():
            saved = (ours.channels_last, ours.decode_chunk_size, ours.text_cache_size)
            if name == "layout":
                ours.set_channels_last(not saved[0])
            elif name == "whole-decode":
                ours.decode_chunk_size = None
            elif name == "no-text-cache":
                ours.text_cache_size = 0
            try:
                return ours_call()
            finally:
                ours.set_channels_last(saved[0])
                ours.decode_chunk_size, ours.text_cache_size = saved[1], saved[2]
        return call

    layout = "channels-last" if ours.channels_last else "NCHW"
    flipped = "NCHW" if ours.channels_last else "channels-last"
    names = {"layout": f"ldm-jobs {flipped}", "whole-decode": "ldm-jobs whole decode",
             "no-text-cache": "ldm-jobs no text cache", "compile": "ldm-jobs torch.compile"}
    runs = [("diffusers", theirs_call, theirs.unet), (f"ldm-jobs ({layout})", ours_call, ours.unet)]
    runs += [(names[v], *(compiled_run(ours, batch, ours_call) if v == "compile"
                          else (variant(v), ours.unet))) for v in variants]
    timers = {id(unet): LoopTimer(unet, device) for unet in {id(u): u for _, _, u in runs}.values()}
    rows = {name: Row(name) for name, _, _ in runs}
    memory = PeakMemory(device)

    with torch.inference_mode():
        for _, call, _ in runs:  # warm-up (cuDNN heuristics, allocator, caches)
            for _ in range(args.warmup):
                call()
        sync(device)
        for _ in range(args.repeats):
            for name, call, unet in runs:
                timer = timers[id(unet)]
                timer.reset()
                memory.start()
                start = time.perf_counter()
                images = call()
                sync(device)
                row = rows[name]
                row.seconds.append(time.perf_counter() - start)
                row.loop.append(timer.seconds())
                row.calls = timer.calls
                row.peak_mib = max(row.peak_mib, memory.stop())
                row.images = as_uint8(images)

    base = rows["diffusers"]
    base_ips = batch / statistics.median(base.seconds)
    for row in rows.values():
        total = statistics.median(row.seconds)
        loop = statistics.median(row.loop)
        ips = batch / total
        cells = [dtype, str(batch), str(steps), row.name, f"{ips:.3f}", f"{loop / steps:.4f}",
                 f"{total:.3f}", f"{row.peak_mib:.0f}"]
        if flops_per_image_call is not None:
            unet_batch = batch * (2 if args.guidance > 1 else 1)
            tflops = flops_per_image_call * unet_batch * row.calls / loop / 1e12
            cells += [f"{tflops:.1f}", f"{100 * tflops / args.peak_tflops:.1f}%"]
        diff = np.abs(row.images.astype(np.int16) - base.images.astype(np.int16))
        cells += [f"{ips / base_ips:.2f}x", f"{diff.max()}/{diff.mean():.2f}"]
        print("| " + " | ".join(cells) + " |", file=out, flush=True)
    for timer in timers.values():
        for handle in timer.handles:
            handle.remove()


def parse_configs(text: str) -> list[tuple[str, int, int, list[str]]]:
    configs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (3, 4) or parts[0] not in ("float32", "float16", "bfloat16"):
            raise SystemExit(f"--configs: {item!r} is not DTYPE:BATCH:STEPS[:VARIANT+...]")
        variants = parts[3].split("+") if len(parts) == 4 and parts[3] else []
        for v in variants:
            if v not in VARIANTS:
                raise SystemExit(f"--configs: variant {v!r} is not one of {VARIANTS}")
        configs.append((parts[0], int(parts[1]), int(parts[2]), variants))
    return configs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--family", choices=["sd1", "sdxl"], default="sd1",
                        help="sdxl: StableDiffusionXLPipeline on the SDXL base shapes (tiny on the CPU)")
    parser.add_argument("--shape", choices=["tiny", "sd15"], default=None,
                        help="default: tiny on cpu, sd15 on cuda")
    parser.add_argument("--configs", default=None,
                        help="DTYPE:BATCH:STEPS[:VARIANT+...],... (default: float32:4:20 on "
                             "cpu; float16 and bfloat16 x batch 1/4/8/16 x 30/50 steps on cuda)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 64 tiny, 512 sd15)")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each pipeline")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each first")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the card's dense fp16/bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--out", default=None, help="also append the table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    shape = args.shape or ("sd15" if cuda else "tiny")
    sdxl = args.family == "sdxl"
    args.size = args.size or (64 if shape == "tiny" else 1024 if sdxl else 512)
    configs = parse_configs(args.configs or (",".join(GPU_GRID) if cuda else "float32:4:20"))

    import diffusers

    class Tee:
        def __init__(self, *files):
            self.files = files

        def write(self, text):
            for f in self.files:
                f.write(text)

        def flush(self):
            for f in self.files:
                f.flush()

    files = [sys.stdout] + ([open(args.out, "a")] if args.out else [])
    out = Tee(*files)
    machine = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} torch thread(s)"
    print(f"\nmachine: {machine}; torch {torch.__version__}, diffusers {diffusers.__version__}; "
          f"family={args.family} shape={shape} size={args.size} sampler={args.sampler} guidance={args.guidance} "
          f"repeats={args.repeats} (medians, interleaved)\n", file=out)
    header = ["dtype", "batch", "steps", "pipeline", "images/s", "s/step (UNet loop)", "total s",
              "peak MiB"]
    if cuda:
        header += ["UNet TFLOP/s", f"MFU (of {args.peak_tflops:g})"]
    header += ["ratio vs diffusers", "px diff max/mean"]
    print("| " + " | ".join(header) + " |", file=out)
    print("|" + "---|" * len(header), file=out, flush=True)

    if sdxl:
        from tiny_sdxl import make_sdxl

        ref = make_sdxl("sdxl") if shape == "tiny" else sdxl_reference(args.device)
    else:
        ref = make_reference("sd1") if shape == "tiny" else sd15_reference(args.device)
    for dtype in dict.fromkeys(c[0] for c in configs):
        if sdxl:
            ours = sdxl_ours(ref, args.device, dtype, out)
        else:
            ours = ours_on(ref, args.device, dtype, hashed=shape == "tiny")
        theirs = theirs_on(ref, args.device, dtype, args.sampler)
        flops = unet_flops(ours, 1, args.size, args.device) if cuda else None
        if flops is not None:
            print(f"UNet FLOPs per latent per call at {args.size}x{args.size} ({dtype}): "
                  f"{flops / 1e9:.1f} GFLOP", file=sys.stderr)
        for c_dtype, batch, steps, variants in configs:
            if c_dtype != dtype:
                continue
            try:
                run_config(ours, theirs, args, dtype, batch, steps, variants, flops, out)
            except Exception:  # keep the other configs' rows (e.g. out of memory)
                traceback.print_exc()
                print(f"| {dtype} | {batch} | {steps} | failed: see the log |", file=out, flush=True)
        del ours, theirs
        if cuda:
            torch.cuda.empty_cache()
    for f in files[1:]:
        f.close()


if __name__ == "__main__":
    main()
