"""LoRA files for tests, written the way the ecosystem writes them.

Random low-rank weights for a diffusers reference model's modules (names taken from the
diffusers / transformers models themselves, not from ours), saved by diffusers'
``save_lora_weights`` (PEFT layout, with its adapter metadata) or converted by diffusers'
``convert_state_dict_to_kohya`` and saved with safetensors (the kohya / sd-scripts
layout: ``lora_unet_*``, ``lora_te_*``, ``lora_down`` / ``lora_up`` / ``alpha``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

# module-name endings a LoRA targets: attention and MLP Linears, the transformer's
# projections, and (LoCon) the ResNet, sampler and time-embedding layers
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                  "ff.net.2")
UNET_LOCON = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv",
              "upsamplers.0.conv")
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _modules(model: nn.Module, endings) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and name.endswith(tuple(endings))}


def random_peft(model: nn.Module, endings, rank: int, seed: int, strength: float = 1.0
                ) -> dict[str, torch.Tensor]:
    """PEFT-named low-rank weights (``{module}.lora_A.weight`` / ``lora_B.weight``)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    # transformers 5 keeps CLIP's layers at the top of the model; files name them as
    # transformers 4 and every trainer did, under `text_model.`
    level = "text_model." if hasattr(model, "encoder") and not hasattr(model, "text_model") else ""
    for name, m in _modules(model, endings).items():
        name = level + name
        w = m.weight
        down_shape = (rank, *w.shape[1:])
        up_shape = (w.shape[0], rank) + ((1, 1) if w.ndim == 4 else ())
        fan_in = w[0].numel()
        state[f"{name}.lora_A.weight"] = torch.randn(down_shape, generator=g) / fan_in**0.5
        state[f"{name}.lora_B.weight"] = torch.randn(up_shape, generator=g) * strength / rank**0.5
    return state


def _metadata(state, endings, alpha: float | None, rank: int) -> dict | None:
    """The LoraConfig metadata diffusers records beside a component's weights."""
    if alpha is None or not state:
        return None
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(endings)}


def save_peft(path: Path, unet_state=None, text_state=None, alpha: float | None = None,
              rank: int = 4) -> Path:
    """diffusers' own writer; with ``alpha``, the LoraConfig metadata it records."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        path.parent, unet_lora_layers=unet_state, text_encoder_lora_layers=text_state,
        weight_name=path.name,
        unet_lora_adapter_metadata=_metadata(unet_state, UNET_ATTENTION, alpha, rank),
        text_encoder_lora_adapter_metadata=_metadata(text_state, TEXT, alpha, rank))
    return path


def kohya_state(unet_state=None, text_state=None, alphas=None) -> dict[str, torch.Tensor]:
    """diffusers' PEFT -> kohya converter, with sd-scripts' SD 1.x/2.x text prefix
    (``lora_te_``). ``alphas``: module-name ending -> alpha (None drops the key)."""
    from diffusers.utils import convert_state_dict_to_kohya

    peft = {**{f"unet.{k}": v for k, v in (unet_state or {}).items()},
            **{f"text_encoder.{k}": v for k, v in (text_state or {}).items()}}
    kohya = convert_state_dict_to_kohya(peft)
    kohya = {k.replace("lora_te1_", "lora_te_"): v.contiguous() for k, v in kohya.items()}
    for ending, alpha in (alphas or {}).items():
        for key in [k for k in kohya if k.endswith(".alpha") and k[:-6].endswith(ending)]:
            if alpha is None:
                del kohya[key]
            else:
                kohya[key] = torch.tensor(float(alpha))
    return kohya


def save_safetensors(path: Path, state: dict[str, torch.Tensor], metadata=None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def kohya_name(module_path: str, prefix: str = "lora_unet_") -> str:
    """sd-scripts' name of a module: the prefix and the path with `_` for `.`."""
    return prefix + module_path.replace(".", "_")


def kohya_sdxl_state(unet_state=None, text_state=None, text_2_state=None, alpha: float = 2.0,
                     original_name=None) -> dict[str, torch.Tensor]:
    """An SDXL file as sd-scripts writes it: `lora_unet_` with the UNet's modules in the
    original (SGM) layout, `input_blocks_4_1_transformer_blocks_0_attn1_to_q` (from
    ``original_name``: diffusers module path -> original one), `lora_te1_` / `lora_te2_`
    for the two text encoders, and one alpha for all. Converted by diffusers'
    ``convert_state_dict_to_kohya``."""
    from diffusers.utils import convert_state_dict_to_kohya

    def renamed(key: str) -> str:
        module, _, role = key.rpartition(".lora_")
        return f"{original_name(module)}.lora_{role}"

    peft = {**{f"unet.{renamed(k)}": v for k, v in (unet_state or {}).items()},
            **{f"text_encoder.{k}": v for k, v in (text_state or {}).items()},
            **{f"text_encoder_2.{k}": v for k, v in (text_2_state or {}).items()}}
    kohya = {k: v.contiguous() for k, v in convert_state_dict_to_kohya(peft).items()}
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(float(alpha))
    return kohya


def save_peft_sdxl(path: Path, unet_state=None, text_state=None, text_2_state=None,
                   alpha: float | None = None, rank: int = 4) -> Path:
    """diffusers' SDXL writer (`unet.`, `text_encoder.`, `text_encoder_2.`), with the
    LoraConfig metadata it records when ``alpha`` is given."""
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.save_lora_weights(
        path.parent, unet_lora_layers=unet_state, text_encoder_lora_layers=text_state,
        text_encoder_2_lora_layers=text_2_state, weight_name=path.name,
        unet_lora_adapter_metadata=_metadata(unet_state, UNET_ATTENTION, alpha, rank),
        text_encoder_lora_adapter_metadata=_metadata(text_state, TEXT, alpha, rank),
        text_encoder_2_lora_adapter_metadata=_metadata(text_2_state, TEXT, alpha, rank))
    return path


def assert_close(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    assert diff.max() <= 2 and diff.mean() <= 0.5, \
        f"{what}: max {diff.max()}/255, mean {diff.mean():.3f}/255 from diffusers"
    assert theirs.std() > 5, f"{what}: the oracle image is flat"


def mean_change(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.abs(x.astype(np.int16) - y.astype(np.int16)).mean())


@dataclass(frozen=True)
class Rows:
    """The rows an oracle test draws, by diffusers alone and by ours in one batch."""

    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    side: int
    steps: int
    sampler: str
    empty_negative_as_none: bool = False  # SDXL: diffusers zeroes a None negative as we do ""

    def diffusers(self, pipe, i: int, adapters: dict[str, float]) -> np.ndarray:
        """The image diffusers draws for row i alone with ``adapters`` set (unfused)."""
        if adapters:
            pipe.enable_lora()
            pipe.set_adapters(list(adapters), list(adapters.values()))
        else:
            pipe.disable_lora()
        negative = self.negatives[i] or (None if self.empty_negative_as_none else "")
        out = pipe(prompt=[self.prompts[i]], negative_prompt=None if negative is None else [negative],
                   num_inference_steps=self.steps, guidance_scale=7.5,
                   generator=[torch.Generator("cpu").manual_seed(self.seeds[i])],
                   height=self.side, width=self.side, output_type="np").images
        return (out[0] * 255).round().astype(np.uint8)

    def ours(self, ours, loras, n: int | None = None) -> list[np.ndarray]:
        """Ours on the first ``n`` rows (all by default) in one call, ``loras`` per row."""
        n = len(self.prompts) if n is None else n
        images = ours.generate(self.prompts[:n], seeds=self.seeds[:n], negative_prompts=self.negatives[:n],
                               steps=self.steps, guidance_scale=7.5, sampler=self.sampler,
                               width=self.side, height=self.side, loras=loras)
        return [np.asarray(im) for im in images]

    def check_text_encoder_lora(self, ours, pipe, path: str, name: str, what: str) -> None:
        """A LoRA (``path``, loaded in ``pipe`` as ``name``) on a text encoder only: row 1
        with it and row 0 without match diffusers; then row 0 with it, served after the
        text cache saw it without; the row without is never handed its embedding."""
        mine = self.ours(ours, [{}, {path: 1.0}, {}], n=3)
        assert_close(mine[1], self.diffusers(pipe, 1, {name: 1.0}), f"{what} row")
        assert_close(mine[0], self.diffusers(pipe, 0, {}), "row without it")
        swapped = self.ours(ours, [{path: 1.0}, {}, {}], n=3)
        assert_close(swapped[0], self.diffusers(pipe, 0, {name: 1.0}), "row 0 with it, cached")
        assert np.array_equal(swapped[1], self.ours(ours, None, n=3)[1])
        assert mean_change(swapped[0], mine[0]) > 3
