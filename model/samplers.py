"""Samplers: short loops that turn unit noise into latents, step for step as diffusers does.

The caller supplies ``model_fn(x_in, t, step) -> out``: the raw UNet prediction (after
classifier-free guidance, in the model's ``prediction_type``) for input ``x_in`` already
scaled as diffusers feeds the UNet, at diffusers' timestep ``t``; ``step`` counts the
loop's model calls from 0 (every sampler here calls the model once per step, PNDM once
per listed timestep), so a caller may condition each step on its own text. Two families use it:

- sigma samplers (euler, euler_ancestral, dpmpp_2m[_karras]) in the manner of
  k-diffusion: ``Denoiser`` wraps ``model_fn`` once into ``(x, sigma) -> x0`` (input
  scaling, eps/v conversion, sigma -> timestep), and each loop is a few lines over sigmas.
- alpha samplers (ddim, ddpm, pndm) step over alpha_bar(t) with diffusers' formulas,
  because their timestep arithmetic (fixed strides, PLMS's repeated step) is not a
  function of sigma alone.

Latents stay float32 between and inside steps; schedules (``schedules.Plan``) stay on
the CPU. Every random draw for sample i comes from ``generators[i]``, one
``(1, C, H, W)`` float32 draw per sample per step, as diffusers' ``randn_tensor`` does
with a list of generators: an image depends only on its own seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .schedules import (
    SAMPLER_NAMES,
    Plan,
    SamplerError,
    SchedulerConfig,
    plan,
)

__all__ = [
    "SAMPLERS",
    "SAMPLER_NAMES",
    "Denoiser",
    "Plan",
    "SamplerError",
    "SchedulerConfig",
    "add_noise",
    "img2img",
    "plan",
    "resume",
    "sample",
    "txt2img",
]

ModelFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
Generators = Sequence[torch.Generator] | None


def _randn(x: torch.Tensor, generators: Generators) -> torch.Tensor:
    """Unit noise like x; row i drawn from generators[i] alone."""
    if generators is None or len(generators) != x.shape[0]:
        got = "none" if generators is None else len(generators)
        raise SamplerError(
            f"generators: this sampler needs one per sample ({x.shape[0]}), got {got}"
        )
    rows = [
        torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=torch.float32)
        for g in generators
    ]
    return to_device(torch.cat(rows), x.device)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor moved to ``device``; on CUDA through pinned memory and without
    blocking, so the host keeps queueing work instead of waiting on the copy."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


# --------------------------------------------------------------------- the denoiser
# x0 from the raw output at noise level sigma, for latents x in sigma (VE) scale.
_X0_FROM_SIGMA = {
    "epsilon": lambda out, x, sigma: x - sigma * out,
    "v_prediction": lambda out, x, sigma: (
        out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    ),
    "sample": lambda out, x, sigma: out,
}


class Denoiser:
    """``(x, sigma) -> x0`` around ``model_fn``, for latents x = x0 + sigma * noise."""

    def __init__(self, model_fn: ModelFn, plan: Plan):
        self.model_fn = model_fn
        self.to_x0 = _X0_FROM_SIGMA[plan.prediction_type]
        # The UNet must see diffusers' own timestep for each sigma (Euler's are fractional,
        # interpolated in sigma), so map the planned sigmas back exactly, not by formula.
        self.timestep_of = {float(s): t for s, t in zip(plan.sigmas[:-1], plan.timesteps)}

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
        t = self.timestep_of[float(sigma)]
        out = self.model_fn(x / ((sigma**2 + 1) ** 0.5), t, step).float()
        return self.to_x0(out, x, sigma)


# --------------------------------------------------------------------- sigma samplers
def euler(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generators: Generators = None
) -> torch.Tensor:
    for step, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        d = (x - denoiser(x, sigma, step)) / sigma
        x = x + d * (sigma_next - sigma)
    return x


def euler_ancestral(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generators: Generators = None
) -> torch.Tensor:
    for step, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        d = (x - denoiser(x, sigma, step)) / sigma
        # Split the step into a deterministic part down to sigma_down and fresh noise of
        # sigma_up, so the marginal lands exactly on sigma_next.
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + d * (sigma_down - sigma)
        # diffusers draws on every step, the last (sigma_up = 0) too: keep generators in step.
        x = x + _randn(x, generators) * sigma_up
    return x


def dpmpp_2m(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generators: Generators = None
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in log-SNR time lambda = -log(sigma)."""
    old_denoised, h_last = None, None
    for step, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoiser(x, sigma, step)
        h = torch.log(sigma) - torch.log(sigma_next)  # inf on the last step (sigma_next = 0)
        c = torch.exp(-h) - 1.0
        x = (sigma_next / sigma) * x - c * denoised
        # First order on the first step (no history) and the last (h is infinite there).
        if old_denoised is not None and sigma_next > 0:
            r = h_last / h
            x = x - 0.5 * c * (denoised - old_denoised) / r
        old_denoised, h_last = denoised, h
    return x


def _dpmpp_2m_vp(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generators: Generators = None
) -> torch.Tensor:
    # diffusers keeps DPM-Solver latents variance preserving (x0 + sigma * noise scaled by
    # alpha = 1 / sqrt(sigma^2 + 1)); at the final sigma = 0 both scales agree, and a run
    # cut early (a two-stage run's first stage) hands over in diffusers' scale.
    x = dpmpp_2m(denoiser, x * (sigmas[0] ** 2 + 1) ** 0.5, sigmas, generators=generators)
    return x / (sigmas[-1] ** 2 + 1) ** 0.5


def _over_sigmas(loop: Callable) -> Callable:
    def run(model_fn: ModelFn, x: torch.Tensor, plan: Plan, generators: Generators) -> torch.Tensor:
        return loop(Denoiser(model_fn, plan), x, plan.sigmas, generators=generators)

    run.__name__ = loop.__name__
    return run


# --------------------------------------------------------------------- alpha samplers
# (x0, eps) from the raw output at alpha_bar = a, for variance-preserving latents x.
_X0_EPS = {
    "epsilon": lambda out, x, a: ((x - (1 - a) ** 0.5 * out) / a**0.5, out),
    "v_prediction": lambda out, x, a: (
        a**0.5 * x - (1 - a) ** 0.5 * out,
        a**0.5 * out + (1 - a) ** 0.5 * x,
    ),
    "sample": lambda out, x, a: (out, (x - a**0.5 * out) / (1 - a) ** 0.5),
}

# DDPM's posterior variance, from alpha_bar now, alpha_bar at the next step, and beta.
_DDPM_VARIANCE = {
    # floored so the final step (variance 0) still draws, as diffusers does
    "fixed_small": lambda a, a_prev, beta: torch.clamp((1 - a_prev) / (1 - a) * beta, min=1e-20),
    "fixed_large": lambda a, a_prev, beta: beta,
}


def _alpha_bar(plan: Plan, t: torch.Tensor) -> torch.Tensor:
    return plan.alphas_cumprod[t] if t >= 0 else plan.final_alpha_cumprod


def _x0_eps(plan: Plan, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor):
    x0, eps = _X0_EPS[plan.prediction_type](out.float(), x, a)
    if plan.clip_sample_range is not None:
        x0 = x0.clamp(-plan.clip_sample_range, plan.clip_sample_range)
    return x0, eps


def ddim(
    model_fn: ModelFn, x: torch.Tensor, plan: Plan, generators: Generators = None
) -> torch.Tensor:
    """DDIM with eta = 0 (Song et al. 2020, eq. 12): re-noise the predicted x0 to t_prev."""
    for step, (t, t_prev) in enumerate(zip(plan.timesteps, plan.prev_timesteps)):
        a, a_prev = _alpha_bar(plan, t), _alpha_bar(plan, t_prev)
        x0, eps = _x0_eps(plan, model_fn(x, t, step), x, a)
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


def ddpm(
    model_fn: ModelFn, x: torch.Tensor, plan: Plan, generators: Generators = None
) -> torch.Tensor:
    """Ancestral DDPM (Ho et al. 2020, eqs. 6-7) between the planned timesteps."""
    variance = _DDPM_VARIANCE[plan.variance_type]
    for step, (t, t_prev) in enumerate(zip(plan.timesteps, plan.prev_timesteps)):
        a, a_prev = _alpha_bar(plan, t), _alpha_bar(plan, t_prev)
        x0, _ = _x0_eps(plan, model_fn(x, t, step), x, a)
        alpha = a / a_prev
        beta = 1 - alpha
        x = (a_prev**0.5 * beta) / (1 - a) * x0 + alpha**0.5 * (1 - a_prev) / (1 - a) * x
        if t > 0:  # diffusers tests the timestep, not the step: t = 0 adds no noise
            x = x + variance(a, a_prev, beta) ** 0.5 * _randn(x, generators)
    return x


# Adams-Bashforth weights on the newest-first history of model outputs.
_ADAMS_BASHFORTH = {
    1: ((1,), 1),
    2: ((3, -1), 2),
    3: ((23, -16, 5), 12),
    4: ((55, -59, 37, -9), 24),
}


def _plms_transfer(
    plan: Plan, x: torch.Tensor, out: torch.Tensor, t: torch.Tensor, t_to: torch.Tensor
):
    """PNDM's transfer from t to t_to (Liu et al. 2022, eq. 9) along the output `out`."""
    a, a_prev = _alpha_bar(plan, t), _alpha_bar(plan, t_to)
    _, eps = _X0_EPS[plan.prediction_type](out, x, a)
    denom = a * (1 - a_prev) ** 0.5 + (a * (1 - a) * a_prev) ** 0.5
    return (a_prev / a) ** 0.5 * x - (a_prev - a) * eps / denom


def pndm(
    model_fn: ModelFn, x: torch.Tensor, plan: Plan, generators: Generators = None
) -> torch.Tensor:
    """PLMS: linear multistep on the raw outputs; its second call restarts step one."""
    history: list[torch.Tensor] = []  # raw outputs, oldest first
    x_start = x
    for i, t in enumerate(plan.timesteps):
        out = model_fn(x, t, i).float()
        if i == 1:
            # The second evaluation (at step one's end point) is averaged with the first
            # and step one is redone from its start: a Heun-like warm-up, not in history.
            out = (out + history[-1]) / 2
            x, t, t_to = x_start, t + plan.step_ratio, t
        else:
            history = [*history[-3:], out]
            weights, denom = _ADAMS_BASHFORTH[len(history)]
            out = sum(w * h for w, h in zip(weights, reversed(history))) / denom
            t_to = t - plan.step_ratio
        # diffusers converts v to eps after combining the raw outputs, at this step's x
        x = _plms_transfer(plan, x, out, t, t_to)
    return x


# --------------------------------------------------------------------- public API
SAMPLERS: dict[str, Callable[[ModelFn, torch.Tensor, Plan, Generators], torch.Tensor]] = {
    "ddim": ddim,
    "ddpm": ddpm,
    "pndm": pndm,
    "euler": _over_sigmas(euler),
    "euler_ancestral": _over_sigmas(euler_ancestral),
    "dpmpp_2m": _over_sigmas(_dpmpp_2m_vp),
    "dpmpp_2m_karras": _over_sigmas(_dpmpp_2m_vp),
}
assert tuple(SAMPLERS) == SAMPLER_NAMES


def _noise_alpha(plan: Plan, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    a = plan.alphas_cumprod[plan.timesteps[0]]
    return a**0.5 * latents + (1 - a) ** 0.5 * noise


def _noise_sigma(plan: Plan, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return latents + noise * plan.sigmas[0]


def _noise_sigma_vp(plan: Plan, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    alpha = 1 / ((plan.sigmas[0] ** 2 + 1) ** 0.5)
    return alpha * latents + (plan.sigmas[0] * alpha) * noise


# Each class's add_noise at the first kept timestep, in the latent scale its loop starts from.
_ADD_NOISE = {
    "ddim": _noise_alpha,
    "ddpm": _noise_alpha,
    "pndm": _noise_alpha,
    "euler": _noise_sigma,
    "euler_ancestral": _noise_sigma,
    "dpmpp_2m": _noise_sigma_vp,
    "dpmpp_2m_karras": _noise_sigma_vp,
}


def add_noise(plan: Plan, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """img2img's starting latents: clean `latents` noised to the plan's first step."""
    return _ADD_NOISE[plan.sampler](plan, latents.float(), noise.float())


def sample(
    plan: Plan, model_fn: ModelFn, latents: torch.Tensor, *, generators: Generators = None
) -> torch.Tensor:
    """Run the plan from `latents` (already at its first noise level) to clean latents."""
    return SAMPLERS[plan.sampler](model_fn, latents.float(), plan, generators)


def txt2img(
    sampler: str,
    model_fn: ModelFn,
    noise: torch.Tensor,
    steps: int,
    config: SchedulerConfig,
    *,
    generators: Generators = None,
    end: float | None = None,
) -> torch.Tensor:
    """Clean latents from unit noise (the caller's per-sample draws), as diffusers' pipeline;
    with ``end``, the latents where diffusers' ``denoising_end=end`` stops."""
    p = plan(sampler, config, steps, end=end)
    return sample(p, model_fn, noise.float() * p.init_noise_sigma, generators=generators)


def img2img(
    sampler: str,
    model_fn: ModelFn,
    init_latents: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    strength: float,
    config: SchedulerConfig,
    *,
    generators: Generators = None,
) -> torch.Tensor:
    """Clean latents from init latents noised to `strength`, as diffusers' img2img pipeline."""
    p = plan(sampler, config, steps, strength)
    return sample(p, model_fn, add_noise(p, init_latents, noise), generators=generators)


def resume(
    sampler: str,
    model_fn: ModelFn,
    latents: torch.Tensor,
    steps: int,
    start: float,
    config: SchedulerConfig,
    *,
    generators: Generators = None,
) -> torch.Tensor:
    """Clean latents from a first stage's latents (``txt2img(..., end=start)``), as
    diffusers' img2img with ``denoising_start=start`` continues them: no noise is added."""
    return sample(plan(sampler, config, steps, start=start), model_fn, latents, generators=generators)
