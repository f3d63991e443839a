"""Noise schedules: the scheduler config, and the timesteps and noise levels of one run.

Everything here is a pure function of (sampler, config, steps, strength). The numbers
follow diffusers' schedulers made with ``Scheduler.from_config(model_scheduler_config)``:
same training betas, same timestep spacing per class, same float32/float64 rounding,
so the UNet sees the very same timesteps. ``plan`` computes it all once; the sampler
loops in ``samplers.py`` only read it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .configs import ConfigError

SAMPLER_NAMES = ("ddim", "ddpm", "pndm", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras")
SIGMA_SAMPLERS = frozenset({"euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras"})

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")

# Defaults that differ between diffusers classes. A key the model's config leaves out
# takes the target class's own default (diffusers does not carry defaults across
# from_config), so e.g. SD 1.x's PNDM config gives "leading" to DDIM but "linspace" to Euler.
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddim": {"timestep_spacing": "leading", "clip_sample": True, "set_alpha_to_one": True},
    "ddpm": {"timestep_spacing": "leading", "clip_sample": True},
    "pndm": {"timestep_spacing": "leading", "set_alpha_to_one": False},
    "euler": {"timestep_spacing": "linspace"},
    "euler_ancestral": {"timestep_spacing": "linspace"},
    "dpmpp_2m": {"timestep_spacing": "linspace"},
    "dpmpp_2m_karras": {"timestep_spacing": "linspace"},
}

# Options some scheduler configs carry that would change the numbers in ways we do not
# implement: refused (with the key named) unless they hold the value diffusers defaults to.
_ONLY_DEFAULT: dict[str, tuple[Any, ...]] = {
    "thresholding": (False,),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
    "final_sigmas_type": ("zero",),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "solver_type": ("midpoint",),
    "lambda_min_clipped": (None, -math.inf),
    "sigma_min": (None,),
    "sigma_max": (None,),
}


class SamplerError(ValueError):
    """A bad sampler request; the message names the argument and its allowed values."""


@dataclass(frozen=True)
class SchedulerConfig:
    """The fields of a diffusers ``scheduler_config.json`` that shape sampling.

    ``SchedulerConfig()`` is Stable Diffusion 1.x's scheduler (PNDM, PLMS, epsilon).
    ``None`` means "not in the model's config": the sampler's diffusers class default.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 1
    set_alpha_to_one: bool | None = False
    skip_prk_steps: bool = True
    clip_sample: bool | None = False
    clip_sample_range: float = 1.0
    variance_type: str | None = None
    rescale_betas_zero_snr: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SchedulerConfig:
        """Read a diffusers scheduler config; unknown keys are ignored, absent ones take
        the diffusers default (not SD's), as ``from_config`` does."""
        for key, allowed in _ONLY_DEFAULT.items():
            if key in data and data[key] not in allowed:
                raise ConfigError(
                    f"scheduler config {key}={data[key]!r} is not supported (only {allowed})"
                )
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in data.items() if k in names}}
        if fields["trained_betas"] is not None:
            fields["trained_betas"] = tuple(float(b) for b in fields["trained_betas"])
        config = cls(**fields)
        config.check()
        return config

    def check(self) -> None:
        choices = {
            "beta_schedule": (self.beta_schedule, BETA_SCHEDULES),
            "prediction_type": (self.prediction_type, PREDICTION_TYPES),
            "timestep_spacing": (self.timestep_spacing, (None, *TIMESTEP_SPACINGS)),
            "variance_type": (self.variance_type, (None, *VARIANCE_TYPES)),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"scheduler config {name}={value!r} is not one of {allowed}")
        if int(self.num_train_timesteps) < 2:
            raise ConfigError(
                f"scheduler config num_train_timesteps={self.num_train_timesteps} must be >= 2"
            )
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ConfigError(
                "scheduler config trained_betas must have num_train_timesteps entries"
            )

    def resolved(self, sampler: str, name: str) -> Any:
        """A field as the sampler's diffusers class sees it."""
        value = getattr(self, name)
        return _CLASS_DEFAULTS[sampler].get(name) if value is None else value


# The values diffusers' scheduler classes share when a config leaves a key out.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": None,
    "steps_offset": 0,
    "set_alpha_to_one": None,
    "skip_prk_steps": False,
    "clip_sample": None,
    "clip_sample_range": 1.0,
    "variance_type": None,
    "rescale_betas_zero_snr": False,
}


# ----------------------------------------------------------------------- training betas
def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    )


def _zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    # Lin et al. 2023: shift and rescale sqrt(alpha_bar) so the last step is pure noise.
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def alphas_cumprod(config: SchedulerConfig, sampler: str) -> torch.Tensor:
    """alpha_bar_t for t = 0..T-1, float32, as the sampler's diffusers class builds it."""
    n = int(config.num_train_timesteps)
    if config.trained_betas is not None:
        betas = torch.tensor(config.trained_betas, dtype=torch.float32)
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = (
            torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32)
            ** 2
        )
    else:
        betas = _cosine_betas(n)
    # PNDMScheduler has no rescale option, so diffusers ignores it there.
    rescale = config.rescale_betas_zero_snr and sampler != "pndm"
    if rescale:
        betas = _zero_terminal_snr(betas)
    abar = torch.cumprod(1.0 - betas, dim=0)
    if rescale and sampler in SIGMA_SAMPLERS:
        abar[-1] = 2**-24  # sigma would be infinite at alpha_bar = 0
    return abar


# ----------------------------------------------------------------------- timestep spacing
# Descending timesteps for `n` steps over `T` training steps (Lin et al. 2023, table 2).
# Leading and trailing are whole numbers already; linspace is left unrounded because
# the Euler classes keep its fractions.
_SPACINGS = {
    "leading": lambda n, T, offset: (np.arange(0, n) * (T // n)).round()[::-1] + offset,
    "trailing": lambda n, T, offset: np.arange(T, 0, -T / n).round() - 1,
    "linspace": lambda n, T, offset: np.linspace(0, T - 1, n)[::-1],
}

# DPM-Solver spaces n+1 points and drops the last (t = 0), so its grids differ.
_DPM_SPACINGS = {
    "leading": lambda n, T, offset: (
        (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + offset
    ),
    "trailing": lambda n, T, offset: np.arange(T, 0, -T / n).round() - 1,
    "linspace": lambda n, T, offset: np.linspace(0, T - 1, n + 1).round()[::-1][:-1],
}


def _spaced(config: SchedulerConfig, sampler: str, steps: int, table: dict) -> np.ndarray:
    spacing = config.resolved(sampler, "timestep_spacing")
    return np.ascontiguousarray(
        table[spacing](steps, int(config.num_train_timesteps), int(config.steps_offset))
    )


def _train_sigmas(abar: torch.Tensor) -> np.ndarray:
    return (((1 - abar) / abar) ** 0.5).numpy()  # float32, ascending in t


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """The fractional timestep whose log-sigma interpolates to log(sigma)."""
    log_sigma = np.log(max(sigma, 1e-10))
    low = int(
        np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    )
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _karras_sigmas(train_sigmas: np.ndarray, steps: int, rho: float = 7.0) -> np.ndarray:
    # Karras et al. 2022, eq. 5: evenly spaced in sigma^(1/rho) between the training extremes.
    lo, hi = train_sigmas[0].item() ** (1 / rho), train_sigmas[-1].item() ** (1 / rho)
    return (hi + np.linspace(0, 1, steps) * (lo - hi)) ** rho


# ----------------------------------------------------------------------- per-sampler grids
# Each returns (timesteps the UNet sees, sigmas or None, the timestep each step lands on).
def _alpha_grid(config: SchedulerConfig, sampler: str, steps: int):
    t = _spaced(config, sampler, steps, _SPACINGS).round().astype(np.int64)
    if sampler == "ddpm":  # DDPM steps to the next listed timestep, then to "-1" (alpha_bar 1)
        prev = np.append(t[1:], -1)
    else:  # DDIM and PLMS step a fixed stride, whatever the spacing
        prev = t - int(config.num_train_timesteps) // steps
    if sampler == "pndm":
        # PLMS with skipped PRK steps evaluates the second timestep twice: once after a
        # plain Euler step, once more after the averaged (Heun-like) restart of step one.
        t = np.concatenate([t[:1], t[1:2], t[1:]])
        prev = np.concatenate([prev[:1], prev[1:2], prev[1:]])
    return torch.from_numpy(t), None, torch.from_numpy(prev)


def _euler_grid(config: SchedulerConfig, sampler: str, steps: int):
    t = _spaced(config, sampler, steps, _SPACINGS).astype(np.float32)
    train = _train_sigmas(alphas_cumprod(config, sampler))
    sigmas = np.append(np.interp(t, np.arange(len(train)), train), 0.0).astype(np.float32)
    return torch.from_numpy(t), torch.from_numpy(sigmas), None


def _dpm_grid(config: SchedulerConfig, sampler: str, steps: int):
    t = _spaced(config, sampler, steps, _DPM_SPACINGS).astype(np.int64)
    train = _train_sigmas(alphas_cumprod(config, sampler))
    if sampler == "dpmpp_2m_karras":
        sigmas = _karras_sigmas(train, steps)
        t_frac = np.array([_sigma_to_t(s, np.log(train)) for s in sigmas])
        # diffusers rounds these, except for the cosine schedule where int64 truncates.
        t = (t_frac if config.beta_schedule == "squaredcos_cap_v2" else t_frac.round()).astype(
            np.int64
        )
    else:
        sigmas = np.interp(t, np.arange(len(train)), train)
    sigmas = np.append(sigmas, 0.0).astype(np.float32)
    return torch.from_numpy(t), torch.from_numpy(sigmas), None


_GRIDS = {
    "ddim": _alpha_grid,
    "ddpm": _alpha_grid,
    "pndm": _alpha_grid,
    "euler": _euler_grid,
    "euler_ancestral": _euler_grid,
    "dpmpp_2m": _dpm_grid,
    "dpmpp_2m_karras": _dpm_grid,
}


@dataclass(frozen=True)
class Plan:
    """One run's schedule, computed once. Tensors live on the CPU."""

    sampler: str
    timesteps: torch.Tensor  # (N,) what the UNet sees, in call order
    sigmas: torch.Tensor | None  # (N+1,) float32 noise levels, sigma samplers only; ends at 0
    prev_timesteps: torch.Tensor | None  # (N,) where each alpha-sampler step lands; < 0: the end
    alphas_cumprod: torch.Tensor  # (T,) float32
    final_alpha_cumprod: torch.Tensor  # alpha_bar used past t = 0
    step_ratio: int  # T // steps: the fixed stride DDIM and PLMS assume
    init_noise_sigma: torch.Tensor  # txt2img latents = unit noise * this
    prediction_type: str
    clip_sample_range: float | None  # None: x0 is not clipped
    variance_type: str


def _cutoff(config: SchedulerConfig, fraction: float) -> int:
    """The training timestep at `fraction` of the way from pure noise, as diffusers'
    ``denoising_end`` / ``denoising_start`` place it."""
    num_train = int(config.num_train_timesteps)
    return int(round(num_train - fraction * num_train))


def plan(sampler: str, config: SchedulerConfig, steps: int, strength: float = 1.0, *,
         start: float | None = None, end: float | None = None) -> Plan:
    """The schedule of `steps` steps; img2img (strength < 1) keeps diffusers' tail of it.

    A two-stage run (SDXL base, then refiner) cuts one schedule at a fraction: ``end``
    keeps the steps at or above its timestep cutoff, ``start`` the steps below it, so the
    two windows of the same schedule meet exactly.
    """
    if sampler not in _GRIDS:
        raise SamplerError(f"sampler {sampler!r} is not one of {list(SAMPLER_NAMES)}")
    num_train = int(config.num_train_timesteps)
    if (
        isinstance(steps, bool)
        or not isinstance(steps, (int, np.integer))
        or not 1 <= steps <= num_train
    ):
        raise SamplerError(f"steps={steps!r} must be an integer in [1, {num_train}]")
    if not 0.0 <= strength <= 1.0:
        raise SamplerError(f"strength={strength!r} must be in [0, 1]")
    steps = int(steps)
    timesteps, sigmas, prev = _GRIDS[sampler](config, sampler, steps)
    abar = alphas_cumprod(config, sampler)

    # StableDiffusionImg2ImgPipeline.get_timesteps: keep the last int(steps * strength).
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise SamplerError(f"steps={steps} with strength={strength} leaves no denoising step")
    t_start = steps - kept
    if (start is not None or end is not None) and sampler == "pndm":
        # PLMS repeats its second timestep: a cut would split that warm-up step
        raise SamplerError("sampler 'pndm' cannot be cut into two stages; use another sampler")
    if start is not None:
        t_start = steps - int((timesteps < _cutoff(config, start)).sum())
    stop = len(timesteps) if end is None else int((timesteps >= _cutoff(config, end)).sum())
    if stop - t_start < 1:
        raise SamplerError(f"steps={steps} cut at start={start}, end={end} leaves no denoising step")
    init_sigma = torch.tensor(1.0)  # alpha samplers and DPM-Solver keep latents variance preserving
    if sampler in ("euler", "euler_ancestral"):
        # diffusers' Euler classes scale by sigma_max alone unless the spacing is "leading".
        max_sigma = sigmas.max()
        leading = config.resolved(sampler, "timestep_spacing") == "leading"
        init_sigma = (max_sigma**2 + 1) ** 0.5 if leading else max_sigma
    if sigmas is not None:
        sigmas = sigmas[t_start : stop + 1]  # a cut run ends at the next step's noise level
    if prev is not None:
        prev = prev[t_start:stop]
    if sampler == "ddpm":
        final = torch.tensor(1.0)
    else:
        final = torch.tensor(1.0) if config.resolved(sampler, "set_alpha_to_one") else abar[0]
    clip = bool(config.resolved(sampler, "clip_sample")) and sampler in ("ddim", "ddpm")
    return Plan(
        sampler=sampler,
        timesteps=timesteps[t_start:stop],
        sigmas=sigmas,
        prev_timesteps=prev,
        alphas_cumprod=abar,
        final_alpha_cumprod=final,
        step_ratio=num_train // steps,
        init_noise_sigma=init_sigma,
        prediction_type=config.prediction_type,
        clip_sample_range=float(config.clip_sample_range) if clip else None,
        variance_type=config.variance_type or "fixed_small",
    )
