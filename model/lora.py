"""LoRA files -> per-module weight deltas, checked against the model they will serve.

A file names each delta by a module and a tensor role. Both halves are read by rules:
- *roles* (`.lora_down.weight`, `.lora_A.weight`, `.alpha`, `.hada_w1_a`, `.lokr_w1` ...)
  from the key's suffix;
- *modules* from its prefix: kohya / sd-scripts write `lora_unet_` / `lora_te_` (SDXL:
  `lora_te1_` / `lora_te2_`) and the module path with `_` for `.`; diffusers / PEFT write
  `unet.` / `text_encoder.` / `text_encoder_2.` and the module path as it is. Our module
  names are diffusers' and transformers', so a path is found by looking it up among the
  model's own Linear and Conv2d modules (with `_` for `.` for kohya). A family whose files
  use other names (SDXL's `input_blocks_*`) adds a rewrite to ``KOHYA_NAME_REWRITES``.

Low-rank files (kohya LoRA, LoCon convolutions, PEFT) stay low rank: ``LowRank(down, up,
scale)`` with ``scale = alpha / rank`` (no alpha: 1; PEFT's alpha comes from the file's
``lora_adapter_metadata``). LyCORIS LoHa and LoKr are full-rank in effect and become
``FullDelta`` weights. Anything that does not fit (another family's keys, wrong shapes,
unknown keys, a non-finite tensor, a pickle) is a ``LoraError`` (a ValueError) naming the
file and the first key at fault. Only safetensors are read: a pickle can run code.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


class LoraError(ValueError):
    """A LoRA file that cannot serve this model; the message names the file and key."""


@dataclass(frozen=True)
class LowRank:
    """``delta W = scale * up @ down``; down (r, in) or (r, in, kh, kw), up (out, r)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The full weight delta, shaped like the module's weight, in float32."""
        flat = self.up.float() @ self.down.float().reshape(self.rank, -1)
        return (flat * self.scale).reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass(frozen=True)
class FullDelta:
    """A delta as large as the weight (LoHa, LoKr), already scaled, in float32."""

    weight: torch.Tensor

    def delta(self) -> torch.Tensor:
        return self.weight


Delta = LowRank | FullDelta
ModuleKey = tuple[str, str]  # (component, module path), e.g. ("unet", "mid_block.resnets.0.conv1")


@dataclass(eq=False)
class Adapter:
    """One LoRA file read for one model: its deltas by module, and its identity."""

    name: str  # the file's stem, as the web UI names a LoRA
    source: str
    sha256: str  # of the file's bytes
    deltas: dict[ModuleKey, Delta]
    # the AUTOMATIC1111 web UI's hash of a safetensors LoRA (its `Lora hashes:` field shows
    # 12 characters of it): the file's `sshs_model_hash` metadata, else the sha256 of the
    # bytes after the header ("addnet" hash), so sites that index LoRAs by it find it
    webui_hash: str = ""
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        tensors = [t for d in self.deltas.values()
                   for t in ((d.down, d.up) if isinstance(d, LowRank) else (d.weight,))]
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)

    @property
    def full(self) -> bool:
        """Whether some delta is full-rank: rows using it are served in their own group."""
        return any(isinstance(d, FullDelta) for d in self.deltas.values())

    def components(self) -> set[str]:
        return {component for component, _ in self.deltas}


# ------------------------------------------------------------------------ model side
TARGET_TYPES = (nn.Linear, nn.Conv2d)
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def targets(pipeline) -> dict[str, dict[str, nn.Module]]:
    """The modules a LoRA may change: every Linear and Conv2d of the UNet and text
    encoder(s), by component and module path."""
    found = {}
    for component in COMPONENTS:
        model = getattr(pipeline, component, None)
        if isinstance(model, nn.Module):
            found[component] = {name: m for name, m in model.named_modules()
                                if isinstance(m, TARGET_TYPES)}
    return found


# ------------------------------------------------------------------------- key rules
# kohya prefix -> component. `lora_te1_` is what diffusers' converter writes for SD 1.x
# too, and what diffusers reads as the (first) text encoder.
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder",
                  "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
PEFT_PREFIXES = {f"{c}.": c for c in COMPONENTS}
_SGM = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$|^middle_block_(\d+)_(.+)$")
_SGM_RESNET = {"in_layers_2": "in_layers.2", "out_layers_3": "out_layers.3",
               "emb_layers_1": "emb_layers.1", "skip_connection": "skip_connection"}


def sgm_unet_name(name: str, names: Iterable[str]) -> str:
    """A kohya UNet name in the original (SGM / LDM) layout, `input_blocks_4_1_proj_in`,
    as the underscored diffusers name, `down_blocks_1_attentions_0_proj_in` (SDXL's
    kohya files use it; so do some SD 1.x ones). ``names``: the UNet's module paths."""
    from .convert_ldm import rename_unet_key  # the checkpoint converter's block rules

    m = _SGM.match(name)
    if m is None:
        return name
    head, rest = (f"{m[1]}.{m[2]}.{m[3]}", m[4]) if m[1] else (f"middle_block.{m[5]}", m[6])
    layers = 1 + max((int(n.split(".")[3]) for n in names
                      if n.startswith("down_blocks.0.resnets.")), default=1)
    renamed = rename_unet_key(f"{head}.{_SGM_RESNET.get(rest, rest)}.weight", layers)
    return name if renamed is None else renamed.removesuffix(".weight").replace(".", "_")


# Rewrites of a module name (kohya: underscored) per component, tried in order when the
# name is not one of the model's own; each gets the name and the component's module paths.
# Files written from a transformers 5 CLIP model lack its `text_model.` level.
Rewrite = Callable[[str, Iterable[str]], str]
KOHYA_NAME_REWRITES: dict[str, list[Rewrite]] = {
    "unet": [sgm_unet_name], "text_encoder": [lambda n, _: "text_model_" + n],
    "text_encoder_2": [lambda n, _: "text_model_" + n]}
PEFT_NAME_REWRITES: dict[str, list[Rewrite]] = {
    "unet": [], "text_encoder": [lambda n, _: "text_model." + n],
    "text_encoder_2": [lambda n, _: "text_model." + n]}

# key suffix -> role; the longest matching suffix wins
ROLES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b",
    ".hada_w2_a": "hada_w2_a", ".hada_w2_b": "hada_w2_b",
    ".lokr_w1": "lokr_w1", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b",
}
# Keys of real files that we recognise but do not serve: refused by name, not as "unknown".
UNSUPPORTED = {
    ".dora_scale": "DoRA (dora_scale)", ".lora_magnitude_vector": "DoRA (magnitude vector)",
    ".lora_mid.weight": "LoCon Tucker (lora_mid)", ".hada_t1": "LoHa Tucker (hada_t1)",
    ".hada_t2": "LoHa Tucker (hada_t2)", ".lokr_t2": "LoKr Tucker (lokr_t2)",
    ".diff": "full-weight diff", ".diff_b": "bias diff", ".bias": "bias delta",
}


def _suffix(key: str, table: dict[str, str]) -> str | None:
    matches = [s for s in table if key.endswith(s)]
    return max(matches, key=len) if matches else None


class _Resolver:
    """Module key of a file -> (component, module path) of this model."""

    def __init__(self, modules: dict[str, dict[str, nn.Module]]):
        self.modules = modules
        self.underscored = {c: {n.replace(".", "_"): n for n in names}
                            for c, names in modules.items()}

    def __call__(self, module_key: str) -> tuple[str, str] | str:
        """The module, or a reason why none fits."""
        for prefixes, rewrites, kohya in ((KOHYA_PREFIXES, KOHYA_NAME_REWRITES, True),
                                          (PEFT_PREFIXES, PEFT_NAME_REWRITES, False)):
            for prefix, component in prefixes.items():
                if not module_key.startswith(prefix):
                    continue
                if component not in self.modules:
                    return (f"it is for a model with a {component} (another family, e.g. "
                            f"SDXL); this model has {', '.join(sorted(self.modules))}")
                name = module_key[len(prefix):]
                index = self.underscored[component] if kohya else self.modules[component]
                paths = self.modules[component]
                for candidate in (name, *(rewrite(name, paths) for rewrite in rewrites[component])):
                    if candidate in index:
                        return component, index[candidate] if kohya else candidate
                return f"the model's {component} has no module {name!r} (another family?)"
        return ("unknown key: neither kohya (lora_unet_/lora_te_) nor diffusers/PEFT "
                "(unet./text_encoder.) naming")


# ----------------------------------------------------------------------- file reading
def read_safetensors(data: bytes, where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file's bytes; a pickle is refused."""
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
        metadata = header.get("__metadata__") or {}
        from safetensors.torch import load as load_tensors

        tensors = load_tensors(data)
    except Exception as error:  # noqa: BLE001 - any parse failure is "not safetensors"
        if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":  # torch.save's zip, a pickle
            raise LoraError(f"{where}: a pickled PyTorch file (.pt/.ckpt); LoRAs are read "
                            "only from .safetensors (a pickle can run code when loaded)") from None
        raise LoraError(f"{where}: not a readable safetensors file ({error})") from None
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def parse(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
          modules: dict[str, dict[str, nn.Module]], where: str) -> dict[ModuleKey, Delta]:
    """Every key checked against the model, in the file's order; deltas by module."""
    if not tensors:
        raise LoraError(f"{where}: the file holds no tensors")
    resolve = _Resolver(modules)
    groups: dict[ModuleKey, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        if not bool(torch.isfinite(tensor.float()).all()):
            raise LoraError(f"{where}: {key}: holds NaN or infinite values")
        unsupported = _suffix(key, UNSUPPORTED)
        if unsupported:
            raise LoraError(f"{where}: {key}: {UNSUPPORTED[unsupported]} is not supported")
        suffix = _suffix(key, ROLES)
        if suffix is None:
            raise LoraError(f"{where}: {key}: unknown key (not a LoRA, LoCon, LoHa or LoKr "
                            "tensor)")
        found = resolve(key[: -len(suffix)])
        if isinstance(found, str):
            raise LoraError(f"{where}: {key}: {found}")
        groups.setdefault(found, {})[ROLES[suffix]] = (key, tensor)
    peft_alpha = _peft_alphas(metadata, where)
    deltas = {}
    for module_key, parts in groups.items():
        module = modules[module_key[0]][module_key[1]]
        deltas[module_key] = _delta(parts, module, peft_alpha(module_key), where)
    return deltas


PeftAlpha = tuple[float, bool] | None  # (alpha, rsLoRA: alpha / sqrt(rank))


def _peft_alphas(metadata: dict[str, str], where: str) -> Callable[[ModuleKey], PeftAlpha]:
    """alpha for a module from diffusers' `lora_adapter_metadata` (LoraConfig per
    component: `unet.lora_alpha`, `unet.alpha_pattern`, `unet.use_rslora`), or None
    (then alpha = rank, as PEFT does without it)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return lambda module_key: None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise LoraError(f"{where}: lora_adapter_metadata is not JSON ({error})") from None

    def alpha(module_key: ModuleKey) -> PeftAlpha:
        component, name = module_key
        rslora = bool(config.get(f"{component}.use_rslora"))
        for pattern, value in (config.get(f"{component}.alpha_pattern") or {}).items():
            # PEFT's rule: the pattern matches the module path or a dotted tail of it
            if re.match(rf"(.*\.)?({pattern})$", name):
                return float(value), rslora
        value = config.get(f"{component}.lora_alpha")
        return None if value is None else (float(value), rslora)

    return alpha


def _delta(parts: dict[str, tuple[str, torch.Tensor]], module: nn.Module,
           peft_alpha: PeftAlpha, where: str) -> Delta:
    roles = set(parts)
    first = next(iter(parts.values()))[0]
    if roles & {"down", "up"}:
        return _low_rank(parts, module, peft_alpha, where)
    if any(r.startswith("hada_") for r in roles):
        return _full(parts, module, where, _loha)
    if any(r.startswith("lokr_") for r in roles):
        return _full(parts, module, where, _lokr)
    raise LoraError(f"{where}: {first}: an alpha without its LoRA weights")


def _need(parts, roles: Iterable[str], where: str) -> list[torch.Tensor]:
    first = next(key for role, (key, _) in parts.items() if role != "alpha")
    missing = [r for r in roles if r not in parts]
    if missing:
        raise LoraError(f"{where}: {first}: its {', '.join(missing)} tensor(s) are missing")
    return [parts[r][1].float() for r in roles]


def _alpha_scale(parts, rank: int, where: str, peft_alpha: PeftAlpha = None) -> float:
    """alpha / rank from the file's `.alpha` key, else from PEFT's metadata, else 1."""
    if "alpha" in parts:
        key, alpha = parts["alpha"]
        if alpha.numel() != 1:
            raise LoraError(f"{where}: {key}: alpha must be one number, has shape "
                            f"{tuple(alpha.shape)}")
        return float(alpha.float().item()) / rank
    if peft_alpha is None:
        return 1.0
    alpha, rslora = peft_alpha
    return alpha / (math.sqrt(rank) if rslora else rank)


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    return tuple(module.weight.shape)


def _low_rank(parts, module: nn.Module, peft_alpha: PeftAlpha, where: str) -> LowRank:
    down, up = _need(parts, ("down", "up"), where)
    key = parts["down"][0]
    shape = _weight_shape(module)  # (out, in) or (out, in, kh, kw)
    rank = down.shape[0]
    if isinstance(module, nn.Conv2d) and down.ndim == 2 and shape[2:] == (1, 1):
        down = down[:, :, None, None]  # a 1x1 conv's LoRA written as a linear one
    if isinstance(module, nn.Linear) and down.ndim == 4 and down.shape[2:] == (1, 1):
        down = down[:, :, 0, 0]
    up = up.reshape(up.shape[0], -1) if up.ndim == 4 and up.shape[2:] == (1, 1) else up
    if down.shape[1:] != shape[1:] or up.shape != (shape[0], rank):
        raise LoraError(
            f"{where}: {key}: shapes down {tuple(parts['down'][1].shape)} / up "
            f"{tuple(parts['up'][1].shape)} do not fit the module's weight {shape}")
    scale = _alpha_scale(parts, rank, where, peft_alpha)
    return LowRank(down.contiguous(), up.contiguous(), scale)


def _loha(t: dict[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """LoHa (FedPara): (w1_a @ w1_b) * (w2_a @ w2_b), elementwise; rank = w1_b's rows."""
    w1 = t["hada_w1_a"] @ t["hada_w1_b"].reshape(t["hada_w1_b"].shape[0], -1)
    w2 = t["hada_w2_a"] @ t["hada_w2_b"].reshape(t["hada_w2_b"].shape[0], -1)
    return (w1 * w2).reshape(shape), t["hada_w1_b"].shape[0]


def _lokr(t: dict[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """LoKr: kron(w1, w2), each factor whole or a product `_a @ _b`. alpha / rank applies
    only when a factor is decomposed (the rank of w2's, else w1's); else the scale is 1."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    else:
        rows = t["lokr_w2_b"].shape[0]
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"].reshape(rows, -1)
        w2 = w2.reshape(w2.shape[0], shape[1] // w1.shape[1], *shape[2:])
    if w2.ndim == 4 and w1.ndim == 2:
        w1 = w1[:, :, None, None]
    rank = next((t[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in t), 0)
    return torch.kron(w1, w2), rank


def _full_roles(build, roles) -> tuple[str, ...]:
    """The tensors a LoHa / LoKr module needs (a LoKr factor whole, or as `_a` and `_b`)."""
    if build is _loha:
        return ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    return tuple(r for w in ("lokr_w1", "lokr_w2")
                 for r in ((w,) if w in roles else (f"{w}_a", f"{w}_b")))


def _full(parts, module: nn.Module, where: str, build) -> FullDelta:
    first = next(iter(parts.values()))[0]
    shape = _weight_shape(module)
    roles = {r: parts[r][1].float() for r in parts if r != "alpha"}
    _need(parts, _full_roles(build, roles), where)
    try:
        weight, rank = build(roles, shape)
    except (RuntimeError, IndexError, ZeroDivisionError) as error:
        raise LoraError(f"{where}: {first}: factors do not fit the module's weight {shape} "
                        f"({error})") from None
    if tuple(weight.shape) != shape:
        raise LoraError(f"{where}: {first}: makes a delta of shape {tuple(weight.shape)}, the "
                        f"module's weight is {shape}")
    scale = _alpha_scale(parts, rank, where) if rank else 1.0
    return FullDelta((weight * scale).contiguous())


# --------------------------------------------------------------------------- loading
def load(data: bytes, source: str, modules: dict[str, dict[str, nn.Module]],
         device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Adapter:
    """An ``Adapter`` from a safetensors file's bytes, checked against ``modules``
    (see ``targets``). Low-rank factors are kept in the model's dtype on its device (they
    multiply its activations); full deltas in float32 (added to the weights in float32)."""
    tensors, metadata = read_safetensors(data, source)
    deltas = parse(tensors, metadata, modules, source)
    (header,) = struct.unpack("<Q", data[:8])
    webui_hash = metadata.get("sshs_model_hash") or hashlib.sha256(data[8 + header:]).hexdigest()
    placed: dict[ModuleKey, Delta] = {}
    for key, delta in deltas.items():
        if isinstance(delta, LowRank):
            placed[key] = LowRank(delta.down.to(device, dtype), delta.up.to(device, dtype),
                                  delta.scale)
        else:
            placed[key] = FullDelta(delta.weight.to(device))
    return Adapter(name=_stem(source), source=source, sha256=hashlib.sha256(data).hexdigest(),
                   deltas=placed, webui_hash=webui_hash)


def _stem(source: str) -> str:
    name = source.rstrip("/").rsplit("/", 1)[-1]
    return Path(name).stem if name.endswith(".safetensors") else name
