"""Train the built-in ``builtin:shapes`` model from nothing, on pictures it draws itself.

    python -m ldm_jobs.model.builtin.shapes.train --out model/builtin/shapes          # the shipped model
    python -m ldm_jobs.model.builtin.shapes.train --out /tmp/shapes --quick           # a minute, for a try

Three stages, all seeded: draw a captioned data set (``scenes``); train the VAE to
reconstruct it; encode it once, then train the text encoder and the UNet together with
the usual noise-prediction objective, dropping 10% of captions (empty prompt) so that
classifier-free guidance works. The UNet and text encoder weights written are an
exponential moving average of the trained ones. The folder written is diffusers'
layout in float16 safetensors; ``--eval`` then measures it on held-out captions and
writes the README beside the weights.

It runs on the CPU (2 threads by default) in under an hour; a GPU makes it minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ldm_jobs.model.configs import TextConfig, UNetConfig, VAEConfig
from ldm_jobs.model.convert_ldm import SD1_SCHEDULER
from ldm_jobs.model.export import save_folder
from ldm_jobs.model.text_encoder import CLIPTextModel
from ldm_jobs.model.tokenizer import CLIPTokenizer
from ldm_jobs.model.unet import UNet
from ldm_jobs.model.vae import AutoencoderKL

from . import scenes as shapes

MAX_TOKENS = 77  # the contract's [B, 77] prompt length, as every SD 1.x/2.x checkpoint has

VAE_CONFIG = VAEConfig(
    block_out_channels=(16, 32, 64),  # 64x64 pixels -> 16x16x4 latents
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
    latent_channels=4,
    mid_block_add_attention=False,  # fully convolutional: it trains on crops
)
VAE_CROP = 32
TEXT_CONFIG = TextConfig(
    hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS, hidden_act="gelu",
)
UNET_CONFIG = UNetConfig(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=64,
    norm_num_groups=16,
)
# DDPM's linear betas leave almost no signal at the last step (sqrt(alpha_bar) 0.006,
# against SD 1.x's 0.068). On 16x16 latents SD's schedule lets the picture's mean colour
# survive the noise, so the model learns to take the background from the noise and
# ignores the caption; here it must come from the text. Trailing spacing starts sampling
# at the last step. Near zero signal, a predicted noise says almost nothing about the
# picture (the picture estimate divides it by sqrt(alpha_bar)), so the UNet predicts
# v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0 instead, as SD 2.x does.
SCHEDULER = {
    **SD1_SCHEDULER,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "timestep_spacing": "trailing",
    "steps_offset": 0,
    "prediction_type": "v_prediction",
}
MIN_SNR_GAMMA = 5.0  # loss weight min(SNR, 5) / (SNR + 1) for v: faster convergence (Hang et al., 2023)


LR = 1e-3


def _fast_adam(device: str) -> dict:
    # the fused kernel updates every parameter in one pass (CPU and CUDA), a tenth of a
    # training step on the CPU otherwise
    return {"fused": True}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def draw_data(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    pictures = np.empty((n, shapes.SIZE, shapes.SIZE, 3), dtype=np.uint8)
    captions = []
    for i, (scene, picture) in enumerate(shapes.scenes(n, seed)):
        pictures[i] = picture
        captions.append(scene.caption)
    return torch.from_numpy(pictures).permute(0, 3, 1, 2).contiguous(), captions


def to_unit(pictures: torch.Tensor) -> torch.Tensor:
    return pictures.float() / 127.5 - 1.0


def random_crops(pictures: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = pictures.shape
    ys = torch.randint(h - size + 1, (n,), generator=gen).tolist()
    xs = torch.randint(w - size + 1, (n,), generator=gen).tolist()
    return torch.stack([p[:, y:y + size, x:x + size] for p, y, x in zip(pictures, ys, xs, strict=True)])


def train_vae(pictures: torch.Tensor, steps: int, batch: int, gen: torch.Generator,
              device: str = "cpu") -> tuple[AutoencoderKL, list]:
    vae = AutoencoderKL(VAE_CONFIG).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0, **_fast_adam(device))
    history, started = [], time.time()
    step_seconds = []
    for step in range(steps):
        tick = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, 1e-3, 100)
        idx = torch.randint(len(pictures), (batch,), generator=gen)
        x = to_unit(random_crops(pictures[idx], VAE_CROP, gen)).to(device)
        mean, logvar = vae.encode_moments(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen).to(device)
        recon = vae.decode(z)
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        history.append(float(rec))
        step_seconds.append(time.perf_counter() - tick)
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} rec {np.mean(history[-100:]):.5f} kl {float(kl):.3f} "
                f"({time.time() - started:.0f}s)")
    train_vae.step_seconds = float(np.median(step_seconds)) if step_seconds else 0.0
    return vae.eval(), history


@torch.no_grad()
def encode_all(vae: AutoencoderKL, pictures: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(vae.parameters()).device
    means, stds = [], []
    for i in range(0, len(pictures), batch):
        mean, logvar = vae.encode_moments(to_unit(pictures[i:i + batch]).to(device))
        means.append(mean.cpu())
        stds.append(torch.exp(0.5 * logvar).cpu())
    return torch.cat(means), torch.cat(stds)


def alphas_cumprod() -> torch.Tensor:
    n = SCHEDULER["num_train_timesteps"]
    betas = torch.linspace(SCHEDULER["beta_start"], SCHEDULER["beta_end"], n, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).float()


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def train_denoiser(
    means: torch.Tensor, stds: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor,
    scale: float, steps: int, batch: int, gen: torch.Generator, device: str = "cpu",
) -> tuple[UNet, CLIPTextModel, list]:
    unet, text = UNet(UNET_CONFIG).to(device), CLIPTextModel(TEXT_CONFIG).to(device)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01, **_fast_adam(device))
    abar = alphas_cumprod()
    snr = abar / (1 - abar)
    weights = (snr.clamp(max=MIN_SNR_GAMMA) / (snr + 1)).to(device)
    history, started = [], time.time()
    warmup = min(200, steps // 10 + 1)
    step_seconds = []
    for step in range(steps):
        tick = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, LR, warmup)
        idx = torch.randint(len(means), (batch,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scale
        tokens = ids[idx].clone()
        dropped = torch.rand(batch, generator=gen) < 0.1  # caption dropout -> unconditional
        tokens[dropped] = empty_ids
        t = torch.randint(len(abar), (batch,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        noisy = (a.sqrt() * latents + (1 - a).sqrt() * noise).to(device)
        target = (a.sqrt() * noise - (1 - a).sqrt() * latents).to(device)
        pred = unet(noisy, t.to(device), text(tokens.to(device)))
        loss = (weights[t.to(device)] * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text, decay)
        history.append(float(loss))
        step_seconds.append(time.perf_counter() - tick)
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {np.mean(history[-100:]):.4f} ({time.time() - started:.0f}s)")
    train_denoiser.step_seconds = float(np.median(step_seconds)) if step_seconds else 0.0
    return ema_unet, ema_text, history


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="model/builtin/shapes", help="folder to write the model to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pictures", type=int, default=40000, help="size of the drawn training set")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=3500)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (the reference) or cuda")
    parser.add_argument("--quick", action="store_true", help="tiny run to try the script")
    parser.add_argument("--eval", type=int, default=100, help="held-out captions to measure (0: skip)")
    args = parser.parse_args(argv)
    if args.quick:
        args.pictures, args.vae_steps, args.unet_steps, args.eval = 512, 20, 20, 10
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    started = time.time()

    log(f"drawing {args.pictures} pictures (seed {args.seed})")
    pictures, captions = draw_data(args.pictures, args.seed)
    log(f"training the VAE for {args.vae_steps} steps")
    vae, vae_history = train_vae(pictures, args.vae_steps, 32, gen, args.device)
    means, stds = encode_all(vae, pictures)
    scale = float(1.0 / (means + stds * torch.randn(means.shape, generator=gen)).std())
    vae_config = VAEConfig(**{**VAE_CONFIG.__dict__, "scaling_factor": round(scale, 5)})
    log(f"latent scaling factor {scale:.5f}")

    tokenizer = CLIPTokenizer.default()
    assert tokenizer.model_max_length == MAX_TOKENS
    ids = tokenizer(captions)
    empty_ids = tokenizer([""])[0]
    log(f"training the text encoder and UNet for {args.unet_steps} steps")
    unet, text, unet_history = train_denoiser(
        means, stds, ids, empty_ids, vae_config.scaling_factor, args.unet_steps, args.batch, gen, args.device)
    trained_s = time.time() - started

    out = save_folder(
        args.out, text_encoder=text, text_config=TEXT_CONFIG, unet=unet, unet_config=UNET_CONFIG,
        vae=vae, vae_config=vae_config, scheduler_config=SCHEDULER, model_max_length=MAX_TOKENS,
        dtype=torch.float16,
    )
    record = {
        "seed": args.seed, "pictures": args.pictures, "vae_steps": args.vae_steps,
        "unet_steps": args.unet_steps, "batch": args.batch, "max_tokens": MAX_TOKENS, "threads": args.threads, "device": args.device,
        "train_seconds": round(trained_s, 1),
        # medians, so a busy machine's stalls do not count: what an idle machine takes
        "vae_seconds_per_step": round(train_vae.step_seconds, 3),
        "unet_seconds_per_step": round(train_denoiser.step_seconds, 3),
        "vae_reconstruction_loss_last100": float(np.mean(vae_history[-100:])),
        "unet_loss_last100": float(np.mean(unet_history[-100:])),
        "unet_loss_first100": float(np.mean(unet_history[:100])),
        "scaling_factor": vae_config.scaling_factor,
        "parameters": {name: sum(p.numel() for p in m.parameters())
                       for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text))},
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {out} after {trained_s:.0f}s of training")
    if args.eval:
        from .evaluate import evaluate_folder, write_readme

        figures = evaluate_folder(out, captions=set(captions), n=args.eval, seed=args.seed + 1)
        write_readme(out, record, figures)
        log(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
