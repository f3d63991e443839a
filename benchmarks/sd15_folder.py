"""A random-weight model of the SD 1.5 shapes as a diffusers folder, for the job benchmarks.

    python benchmarks/sd15_folder.py OUT_DIR [--dtype float16] [--device cuda]

The UNet (860M parameters), VAE and CLIP ViT-L/14 text tower of SD 1.5, built with this
project's own classes (their default configs are the SD 1.5 shapes) and written with
`model.export.save_folder`, so `job_overhead.py` and `scaling.py` can run real jobs on the
shape that GPU users run, without downloading a checkpoint. Random weights make noise
images, which is all a speed benchmark needs. About 2.1 GB in float16.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_jobs.model.configs import TextConfig, UNetConfig, VAEConfig  # noqa: E402
from ldm_jobs.model.convert_ldm import SD1_SCHEDULER  # noqa: E402
from ldm_jobs.model.export import save_folder  # noqa: E402
from ldm_jobs.model.text_encoder import CLIPTextModel  # noqa: E402
from ldm_jobs.model.unet import UNet  # noqa: E402
from ldm_jobs.model.vae import AutoencoderKL  # noqa: E402

NAME = "sd15-random"  # what `--model sd15-random` in the job benchmarks asks for


def write_sd15_folder(folder: str | Path, dtype: str = "float16", device: str = "cpu") -> Path:
    """Build the three SD 1.5-shaped parts with random weights on `device`; write them."""
    torch.manual_seed(0)
    configs = UNetConfig(), VAEConfig(), TextConfig()
    for config in configs:
        config.check()
    with torch.device(device):
        unet, vae, text = UNet(configs[0]), AutoencoderKL(configs[1]), CLIPTextModel(configs[2])
    return save_folder(folder, text_encoder=text, text_config=configs[2], unet=unet,
                       unet_config=configs[0], vae=vae, vae_config=configs[1],
                       scheduler_config=dict(SD1_SCHEDULER), dtype=getattr(torch, dtype))


def resolve_model(model: str, work: Path, device: str = "cpu") -> str:
    """`sd15-random` becomes a folder written under `work`; any other source is kept."""
    if model != NAME:
        return model
    start = time.perf_counter()
    folder = write_sd15_folder(work / NAME, "float16", device)
    print(f"wrote a random SD 1.5-shaped model to {folder} in {time.perf_counter() - start:.1f} s",
          flush=True)
    return str(folder)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--device", default="cpu", help="where the random weights are made")
    args = parser.parse_args(argv)
    print(write_sd15_folder(args.out, args.dtype, args.device))


if __name__ == "__main__":
    main()
