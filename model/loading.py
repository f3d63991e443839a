"""Where a pipeline's weights come from: ``builtin:NAME``, a local path, or ``s3://``.

Nothing is ever downloaded from a model hub: a source is the shipped built-in model, or a
path/URI the user names.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .configs import TextConfig, UNetConfig, VAEConfig
from .hashing import modules_hash
from .pipeline import Pipeline, resolve_dtype, vae_dtype

BUILTIN_DIR = Path(__file__).parent / "builtin"

# SD 1.x's scheduler is what single-file checkpoints and the random model use.
from .convert_ldm import SD1_SCHEDULER  # noqa: E402

# A tiny model with random weights (seeded, so the same everywhere): for tests and for
# trying the job system without any weights at hand. It draws noise, not pictures.
TINY_UNET = UNetConfig(
    sample_size=8,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=2,
    cross_attention_dim=32,
    norm_num_groups=16,
)
TINY_VAE = VAEConfig(
    block_out_channels=(8, 8, 16, 16),  # four levels: the SD downsampling factor of 8
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=64,
)
TINY_TEXT = TextConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
)


def build_tiny_random(device, dtype) -> Pipeline:
    from .text_encoder import CLIPTextModel
    from .tokenizer import CLIPTokenizer
    from .unet import UNet
    from .vae import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20261125)
        unet, vae, text = UNet(TINY_UNET), AutoencoderKL(TINY_VAE), CLIPTextModel(TINY_TEXT)
        # Default inits leave some output projections near zero; spread them so the
        # images carry visible structure, which makes tests of the job system stronger.
        for module in (unet, vae, text):
            for p in module.parameters():
                if p.ndim > 1:
                    p.data.normal_(0.0, 1.0 / max(1.0, p[0].numel() ** 0.5))
    digest = modules_hash({"unet": unet, "vae": vae, "text_encoder": text})
    return assemble(CLIPTokenizer.default(), text, unet, vae, SD1_SCHEDULER,
                    name="builtin:tiny-random", digest=digest, device=device, dtype=dtype)


def assemble(tokenizer, text_encoder, unet, vae, scheduler_config, *, name, digest, device, dtype,
             **family) -> Pipeline:
    """The pipeline over loaded modules; ``family`` holds the Pipeline's family arguments
    (``family``, ``tokenizer_2``, ``text_encoder_2``, ``force_zeros_for_empty_prompt``)."""
    torch_dtype = resolve_dtype(dtype)
    for encoder in (text_encoder, family.get("text_encoder_2")):
        if encoder is not None:
            encoder.to(device, torch_dtype).eval()
    unet.to(device, torch_dtype).eval()
    vae.to(device, vae_dtype(vae, torch_dtype)).eval()
    return Pipeline(tokenizer, text_encoder, unet, vae, scheduler_config,
                    name=name, content_hash=digest, device=device, dtype=torch_dtype, **family)


def load_builtin_folder(name: str, device, dtype) -> Pipeline:
    folder = BUILTIN_DIR / name
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"built-in model builtin:{name} is not shipped in this installation "
            f"(no {folder}/model_index.json); available: {available_builtins()}"
        )
    return load_path(str(folder), device, dtype, None, name=f"builtin:{name}")


def available_builtins() -> list[str]:
    shipped = [p.name for p in BUILTIN_DIR.glob("*") if (p / "model_index.json").exists()]
    return sorted({"tiny-random", *shipped})


def load_path(path: str, device, dtype, config, *, name: str | None = None) -> Pipeline:
    from . import weights

    components = weights.load_components(path, device=device, dtype=resolve_dtype(dtype), config=config)
    return assemble(
        components.tokenizer, components.text_encoder, components.unet, components.vae,
        components.scheduler_config, name=name or components.name,
        digest=components.content_hash, device=device, dtype=dtype,
        family=components.family, tokenizer_2=components.tokenizer_2,
        text_encoder_2=components.text_encoder_2, **components.pipeline_options,
    )


def fetch_s3(uri: str, storage_spec=None) -> str:
    """Copy an s3:// model (a folder prefix or one file) to a local cache; returns the path.

    The cache is keyed by the URI; files already there are kept, so a second load of the
    same model (e.g. another actor on the machine) reads nothing from the store again.
    """
    from ldm_jobs.jobs.storage import open_storage  # the project's one storage interface

    cache_root = Path(os.environ.get("LDM_JOBS_CACHE", Path.home() / ".cache" / "ldm-jobs")) / "models"
    local = cache_root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    storage = open_storage(uri, storage_spec)
    prefix = uri.rstrip("/") + "/"
    files = {path: local / path[len(prefix):] for path in storage.list(uri)}
    if not files:  # not a folder: one checkpoint file, or nothing at all
        if not storage.exists(uri):
            raise FileNotFoundError(f"no model found at {uri}")
        files = {uri: local / uri.rsplit("/", 1)[-1]}
    for remote, target in files.items():
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            partial.write_bytes(storage.read_bytes(remote))
            os.replace(partial, target)  # never leave a half-written file under its real name
    return str(local) if uri not in files else str(files[uri])


BUILTINS = {"tiny-random": build_tiny_random}


def check_source(source: str, storage=None) -> None:
    """Raise, naming the problem, unless ``load(source)`` can find a model there; no
    weights are read (a job checks its model this way before starting any worker).

    Built-in names must exist; a folder needs ``model_index.json``, its components'
    configs and weight files; a single file's header must parse and its keys and shapes
    fit a known family (the loader's own inference); ``s3://`` objects must exist.
    """
    from . import weights
    from .checkpoint_files import open_source

    if not isinstance(source, str) or not source:
        raise ValueError("model source must be a non-empty string")
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name in BUILTINS:
            return
        if not (BUILTIN_DIR / name / "model_index.json").is_file():
            raise FileNotFoundError(f"no built-in model builtin:{name}; available: "
                                    f"{', '.join('builtin:' + b for b in available_builtins())}")
        source = str(BUILTIN_DIR / name)
    if source.startswith("s3://"):
        from ldm_jobs.jobs.storage import open_storage

        store = open_storage(source, storage)
        paths = store.list(source)
        if not paths and not store.exists(source):
            raise FileNotFoundError(f"no model found at {source}")
        if paths and source.rstrip("/") + "/model_index.json" not in paths:
            raise FileNotFoundError(f"{source}: not a diffusers folder (no model_index.json)")
        return
    path = Path(source)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise weights.CheckpointError(f"{path}: not a diffusers folder (no model_index.json)")
        configs = weights._folder_configs(path)
        for component in weights._MODELS:
            if component in configs:  # as loading does: text encoders the folder has
                weights._folder_weights(path, component, torch.float32)
        return
    weights._single_file_parts(path, open_source(path), {}, weights._Problems())


def load(source: str, *, device="cpu", dtype="float32", config: str | None = None, storage=None) -> Pipeline:
    if not isinstance(source, str) or not source:
        raise ValueError("model source must be a non-empty string")
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        builder = BUILTINS.get(name)
        if builder is not None:
            return builder(device, dtype)
        return load_builtin_folder(name, device, dtype)
    if source.startswith("s3://"):
        return load_path(fetch_s3(source, storage), device, dtype, config, name=source)
    return load_path(source, device, dtype, config, name=source)
