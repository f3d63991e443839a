"""Checkpoint files -> our modules, strictly.

Two source formats: a diffusers folder (our key names already) and an original
single-file checkpoint (renamed by the rules in ``convert_ldm``). Either way loading is
plan, check, execute:

1. plan: for every key our model will have, the file key and operation it comes from;
2. check: our model is built on the ``meta`` device (no memory, no init cost) and its
   keys and shapes are compared with the plan's; every missing, unexpected and
   mis-shaped key is listed in one ``CheckpointError`` before any tensor is read;
3. execute: tensor by tensor from the memory-mapped file, cast on the way, assigned
   into the meta-built model. No second full copy of the weights ever exists.

Files are read through ``checkpoint_files`` (pickles only as plain tensors); the
content hash that names the weights is ``hashing.files_hash``, computed beside the load.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import convert_ldm as ldm
from .checkpoint_files import CheckpointError, Source, open_source
from .configs import ConfigError, TextConfig, UNetConfig, VAEConfig, family_of, from_dict, read_json
from .hashing import BackgroundHash

_SHOWN = 12  # keys listed per kind in an error; the rest are counted


# ------------------------------------------------------------------ plan + check

def _format_keys(kind: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    more = f", ... (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return f"  {kind} ({len(items)}): {shown}{more}"


@dataclass
class _Problems:
    """Everything wrong with one file, gathered across components, raised once."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    misshaped: list[str] = field(default_factory=list)

    def raise_if_any(self, path: Path) -> None:
        kinds = (("missing", self.missing), ("unexpected", self.unexpected), ("mis-shaped", self.misshaped))
        if not any(items for _, items in kinds):
            return
        counts = ", ".join(f"{len(items)} {kind}" for kind, items in kinds if items)
        lines = [f"{path}: checkpoint does not fit the model ({counts} keys)"]
        lines += [_format_keys(kind, items) for kind, items in kinds if items]
        raise CheckpointError("\n".join(lines))


def check_plan(
    component: str, plan: ldm.Plan, source: Source, model: torch.nn.Module, problems: _Problems,
    optional: frozenset[str] = frozenset(),
) -> None:
    """Compare a plan with a (meta-built) model; record every disagreement in ``problems``.

    ``optional`` names model keys the file may lack (buffers the model derives itself).
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in sorted(expected.keys() - plan.keys() - optional):
        problems.missing.append(f"{component}: {key}")
    for key in sorted(plan.keys() - expected.keys()):
        problems.unexpected.append(f"{plan[key].key}" + (f" (-> {component}: {key})" if key != plan[key].key else ""))
    for key in sorted(plan.keys() & expected.keys()):
        ref = plan[key]
        shape = ldm.OPS[ref.op][1](source.shape(ref.key), ref.part)
        if shape != expected[key]:
            problems.misshaped.append(f"{ref.key}: file {list(shape)} vs model {list(expected[key])} ({component}: {key})")


def _materialize(plan: ldm.Plan, source: Source, device: torch.device | str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for key, ref in plan.items():
        tensor = ldm.OPS[ref.op][0](source.get(ref.key), ref.part)
        target = dtype if tensor.is_floating_point() else tensor.dtype
        # copy=True: our tensors never alias the memory-mapped file (or a slice of a
        # fused tensor), so deleting the file later cannot break a loaded model
        yield key, tensor.to(device=device, dtype=target, copy=True).contiguous()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on ``meta`` but real buffers.

    Parameters are replaced by the file's tensors; buffers the model derives itself
    (position ids, say) must keep real values, which ``with torch.device("meta")``
    would lose. The hook is process-wide while active: build nothing else meanwhile.
    """
    def to_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None):
        if param is None or param.device.type == "meta":
            return None
        return torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def fit_plan(component: str, plan: ldm.Plan, model: torch.nn.Module) -> ldm.Plan:
    """The plan with its key spelling matched to the module's (see ``fit_text_model_level``)."""
    if component not in _TEXT_ENCODERS:
        return plan
    return ldm.fit_text_model_level(plan, set(model.state_dict()))


def _derived_buffers(model: torch.nn.Module) -> frozenset[str]:
    params = {k for k, _ in model.named_parameters()}
    return frozenset(k for k in model.state_dict() if k not in params and k.endswith("position_ids"))


# ------------------------------------------------------------------- components

@dataclass
class Components:
    """Everything a pipeline needs, loaded; ``content_hash`` identifies the weights."""

    tokenizer: Any
    text_encoder: torch.nn.Module | None  # None: the SDXL refiner reads text_encoder_2 alone
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict[str, Any]
    name: str
    content_hash: str
    configs: dict[str, Any] = field(default_factory=dict)  # component -> its config dataclass
    family: str = "sd1"  # sd1, sd2, sdxl, sdxl_refiner (configs.family_of)
    tokenizer_2: Any = None
    text_encoder_2: torch.nn.Module | None = None
    # model_index.json settings that change how the pipeline reads text
    pipeline_options: dict[str, Any] = field(default_factory=dict)


# component -> (module, class, config dataclass); imported lazily
_MODELS: dict[str, tuple[str, str, type]] = {
    "unet": (".unet", "UNet", UNetConfig),
    "vae": (".vae", "AutoencoderKL", VAEConfig),
    "text_encoder": (".text_encoder", "CLIPTextModel", TextConfig),
    "text_encoder_2": (".text_encoder", "CLIPTextModelWithProjection", TextConfig),
}
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def build_ours(component: str, config: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    module, cls, config_cls = _MODELS[component]
    parsed = from_dict(config_cls, config)
    return getattr(importlib.import_module(module, __package__), cls)(parsed), parsed


Builder = Callable[[str, dict[str, Any]], tuple[torch.nn.Module, Any]]


@dataclass
class _Part:
    """One component of one file: its config, its plan and the file it reads."""

    config: dict[str, Any]
    plan: ldm.Plan
    source: Source


def _load_parts(
    parts: dict[str, _Part], path: Path, device, dtype: torch.dtype, builder: Builder,
    problems: _Problems | None = None,
) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    """Build each component on meta, check all plans, then fill them from the files."""
    problems = problems or _Problems()
    models, configs = {}, {}
    for component, part in parts.items():
        try:
            with _parameters_on_meta():
                models[component], configs[component] = builder(component, part.config)
        except (ConfigError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: cannot build the {component} from its config ({e})") from None
        part.plan = fit_plan(component, part.plan, models[component])
        check_plan(component, part.plan, part.source, models[component], problems,
                   _derived_buffers(models[component]))
    problems.raise_if_any(path)
    for component, part in parts.items():
        model = models[component]
        state = dict(_materialize(part.plan, part.source, "cpu" if device is None else device, dtype))
        model.load_state_dict(state, strict=False, assign=True)
        del state
        # the check above guarantees this; a builder whose state_dict() hides a
        # parameter would otherwise leave it silently unloaded
        left = [k for k, p in model.named_parameters() if p.device.type == "meta"]
        if left:
            raise CheckpointError(f"{path}: {component} parameters not loaded: {left[:_SHOWN]}")
        model.requires_grad_(False)  # inference only: no autograd bookkeeping
        models[component] = model.to(device).eval()
    return models, configs


def _prefixed(plan: ldm.Plan, prefix: str) -> ldm.Plan:
    return {k: ldm.Ref(prefix + r.key, r.op, r.part) for k, r in plan.items()}


def _split_single_file(source: Source, problems: _Problems) -> dict[str, dict[str, tuple[int, ...]]]:
    """File keys grouped by component (prefix removed) with their shapes."""
    groups: dict[str, dict[str, tuple[int, ...]]] = {name: {} for name in ldm.COMPONENT_PREFIXES}
    for key in source.keys():
        if ldm.IGNORED_KEYS.match(key):
            continue
        for component, prefix in ldm.COMPONENT_PREFIXES.items():
            if key.startswith(prefix):
                groups[component][key[len(prefix):]] = source.shape(key)
                break
        else:
            problems.unexpected.append(key)
    return groups


# The VAE's latent scale is not stored in the weights: each family's official value.
_VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025, "sdxl_refiner": 0.13025}


def _single_file_parts(
    path: Path, source: Source, overrides: dict[str, dict[str, Any]], problems: _Problems,
) -> tuple[dict[str, _Part], str]:
    """(component -> part, family) for an original single-file checkpoint."""
    groups = _split_single_file(source, problems)
    family = ldm.single_file_family(groups)
    towers = ldm.TEXT_TOWERS[family]
    # every component -> (key group, config from shapes, plan from keys)
    readers = {
        "unet": ("unet", ldm.unet_config_from_shapes, None),
        "vae": ("vae", ldm.vae_config_from_shapes, None),
        **{name: (group, *ldm.TOWER_READERS[kind]) for name, (group, kind) in towers.items()},
    }
    used = {group for group, _, _ in readers.values()}
    for group, keys in groups.items():  # another family's tower beside this one's
        if group not in used:
            problems.unexpected += [ldm.COMPONENT_PREFIXES[group] + k for k in keys]
    configs = {}
    for name, (group, infer, _) in readers.items():
        prefix = ldm.COMPONENT_PREFIXES[group]
        if not groups[group]:
            raise CheckpointError(
                f"{path}: no {name} weights (no keys under {prefix!r}); "
                "is this an original Stable Diffusion checkpoint?"
            )
        if name in overrides:
            configs[name] = overrides[name]
            continue
        try:
            configs[name] = infer(groups[group])
        except KeyError as e:
            raise CheckpointError(f"{path}: cannot infer the {name} config: no key {prefix}{e.args[0]}") from None
        except (ValueError, IndexError) as e:
            raise CheckpointError(f"{path}: cannot infer the {name} config: {e}") from None
    if "vae" not in overrides:
        configs["vae"]["scaling_factor"] = _VAE_SCALING[family]
    plans = {
        "unet": ldm.unet_plan(list(groups["unet"]), int(configs["unet"].get("layers_per_block", 2))),
        "vae": ldm.vae_plan(list(groups["vae"]), len(configs["vae"].get("block_out_channels", (0,) * 4))),
        **{name: plan(list(groups[readers[name][0]])) for name, (_, _, plan) in readers.items() if plan},
    }
    parts = {}
    for name, (plan, unknown) in plans.items():
        prefix = ldm.COMPONENT_PREFIXES[readers[name][0]]
        problems.unexpected += [prefix + k for k in unknown]
        parts[name] = _Part(configs[name], _prefixed(plan, prefix), source)
    return parts, family


# diffusers folder: component -> weight file stems, best first
_FOLDER_STEMS = {
    "unet": ("diffusion_pytorch_model",),
    "vae": ("diffusion_pytorch_model",),
    "text_encoder": ("model", "pytorch_model"),
    "text_encoder_2": ("model", "pytorch_model"),
}
# diffusers before 0.14 named the VAE's attention differently
_OLD_VAE_ATTENTION = re.compile(r"(mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.")
_OLD_VAE_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_FOLDER_IGNORED = re.compile(r"(^|\.)position_ids$")


def _folder_weights(folder: Path, component: str, dtype: torch.dtype) -> Path:
    variants = ["", ".fp16"] if dtype != torch.float16 else [".fp16", ""]
    candidates = [
        folder / component / f"{stem}{variant}{suffix}"
        for variant in variants
        for stem in _FOLDER_STEMS[component]
        for suffix in (".safetensors", ".bin")
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise CheckpointError(f"{folder / component}: no weights file (looked for {[p.name for p in candidates]})")


def _folder_plan(source: Source) -> ldm.Plan:
    plan = {}
    for key in source.keys():
        if _FOLDER_IGNORED.search(key):
            continue
        new = _OLD_VAE_ATTENTION.sub(lambda m: f"{m[1]}.{_OLD_VAE_NAMES[m[2]]}.", key)
        # 1x1-conv-shaped VAE attention weights (old exports) become Linear weights
        is_vae_attn = ".mid_block.attentions.0.to_" in new and new.endswith(".weight")
        plan[new] = ldm.Ref(key, "conv_to_linear" if is_vae_attn else "copy")
    return plan


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing config file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _folder_configs(folder: Path) -> dict[str, dict[str, Any]]:
    """Each component's config: the UNet and VAE always, the text encoders the folder has
    (SD 1.x/2.x text_encoder/, SDXL both, the SDXL refiner text_encoder_2/ alone)."""
    present = [c for c in _MODELS if c not in _TEXT_ENCODERS or (folder / c / "config.json").is_file()]
    if not any(c in present for c in _TEXT_ENCODERS):
        raise CheckpointError(f"{folder}: no text encoder (no text_encoder/config.json or text_encoder_2/config.json)")
    configs = {c: _read_config(folder / c / "config.json") for c in present}
    configs["scheduler"] = _read_config(folder / "scheduler" / "scheduler_config.json")
    return configs


def _folder_family(folder: Path, configs: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """(family, pipeline options) of a diffusers folder; its model_index.json may set
    ``force_zeros_for_empty_prompt`` (diffusers' SDXL pipelines default to True)."""
    family = family_of(configs["unet"], configs.get("text_encoder_2") or configs.get("text_encoder"))
    if family in ("sdxl", "sdxl_refiner") and "text_encoder_2" not in configs:
        raise CheckpointError(f"{folder}: an SDXL UNet needs text_encoder_2/ (none found)")
    index = _read_config(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    options = {}
    if family in ("sdxl", "sdxl_refiner"):
        options["force_zeros_for_empty_prompt"] = bool(index.get("force_zeros_for_empty_prompt", True))
    return family, options


def _config_files(folder: Path) -> dict[str, Path]:
    return {f"{p.parent.name}/{p.name}": p for p in folder.glob("*/*.json")}


def _tokenizer(folder: Path | None, name: str = "tokenizer"):
    """The folder's tokenizer; else the shipped CLIP vocabulary with the family's padding
    (SDXL's tokenizer_2 pads with "!", every other with the end token)."""
    from .tokenizer import CLIPTokenizer

    if folder is not None and (folder / name).is_dir():
        return CLIPTokenizer.from_folder(folder / name)
    return CLIPTokenizer.default(pad_token="!" if name == "tokenizer_2" else None)


def load_components(
    source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    config: str | Path | None = None, *, builder: Builder = build_ours,
) -> Components:
    """Load a diffusers folder or an original single-file checkpoint.

    ``config`` (a diffusers folder) replaces the configs a single file's shapes imply,
    and supplies its scheduler config and tokenizer. ``builder`` makes the module for a
    component from its config dict (ours by default; tests pass diffusers' to compare).
    """
    path = Path(source)
    config_dir = Path(config) if config is not None else None
    if config_dir is not None and not (config_dir / "model_index.json").is_file():
        raise CheckpointError(f"{config_dir}: config= must be a diffusers folder with model_index.json")
    problems = _Problems()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path}: not a diffusers folder (no model_index.json)")
        configs = _folder_configs(config_dir or path)
        family, options = _folder_family(config_dir or path, configs)
        files = {c: _folder_weights(path, c, dtype) for c in _MODELS if c in configs}
        parts = {}
        for component, file in files.items():
            src = open_source(file)
            parts[component] = _Part(configs[component], _folder_plan(src), src)
        hashed = {f"{c}/weights": f for c, f in files.items()} | _config_files(config_dir or path)
        scheduler, tokenizer_dir = configs["scheduler"], config_dir or path
    else:
        src = open_source(path)
        overrides = _folder_configs(config_dir) if config_dir is not None else {}
        parts, family = _single_file_parts(path, src, overrides, problems)
        hashed = {"checkpoint": path} | (_config_files(config_dir) if config_dir else {})
        # the official folders' model_index.json: the base zeroes empty negatives, the
        # refiner does not
        options = {"force_zeros_for_empty_prompt": family == "sdxl"} if family.startswith("sdxl") else {}
        scheduler = overrides.get("scheduler") or dict(ldm.OFFICIAL_SCHEDULERS[family])
        tokenizer_dir = config_dir
    digest = BackgroundHash(hashed)
    try:
        models, parsed = _load_parts(parts, path, device, dtype, builder, problems)
    except BaseException:
        digest.cancel()
        raise
    has_2 = "text_encoder_2" in models
    return Components(
        tokenizer=_tokenizer(tokenizer_dir) if "text_encoder" in models else None,
        text_encoder=models.get("text_encoder"),
        unet=models["unet"],
        vae=models["vae"],
        scheduler_config=scheduler,
        name=path.name,
        content_hash=digest.result(),
        configs=parsed,
        family=family,
        tokenizer_2=_tokenizer(tokenizer_dir, "tokenizer_2") if has_2 else None,
        text_encoder_2=models.get("text_encoder_2"),
        pipeline_options=options,
    )


def single_file_state_dicts(path: str | Path) -> dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """An original checkpoint as component -> (diffusers config, diffusers-layout state dict).

    For tools and tests (e.g. saving a diffusers folder); it holds a full copy in memory.
    """
    path = Path(path)
    problems = _Problems()
    parts, _ = _single_file_parts(path, open_source(path), {}, problems)
    problems.raise_if_any(path)
    return {c: (p.config, dict(_materialize(p.plan, p.source, "cpu", torch.float32))) for c, p in parts.items()}
