"""Row checks: input rows -> image tasks (id, seed, settings) or rejections with a reason.

A bad row never crashes its shard and is never dropped silently: it becomes a
`Rejection` that ends up in `errors.parquet`. Rules, so users can predict them:
- the prompt must be a non-empty string of at most MAX_PROMPT_CHARS (10,000) characters;
  a longer one is rejected, not truncated: the tokenizer keeps only 77 tokens, so such
  a "prompt" is a data bug (a pasted document, the wrong column) worth hearing about.
  The negative prompt has the same limit;
- ids are the id column as text (null or empty ids are rejected), else the row's global
  index zero-padded to 8 digits; a repeated id rejects every later row that has it;
- per-row override columns replace the sampling field of the same name; a null keeps
  the spec's value; a bad value rejects the row naming the column (integers may come as
  integral floats or decimals: 20.0 is 20, 20.5 is rejected; a seed must fit in
  [0, 2**63 - 1], so a negative or 2**64 seed is rejected, never wrapped);
- images_per_prompt k gives ids `id`, `id-1`, ... `id-(k-1)`; seeds: an explicit seed s
  gives s, s+1, ...; otherwise each image's seed is derived from sampling.seed and its
  own id (`derive_seed`), so a rerun reproduces it whatever the shard layout;
- under `prompt_syntax: a1111` a prompt or negative prompt the web UI's syntax cannot
  read (a weight or prompt-edit step that is not a finite number, an edit touching a
  stray bracket) rejects the row naming the column; edits are scheduled over the row's steps,
  each AND sub-prompt on its own; a prompt with AND (or a trailing :WEIGHT) and LoRAs, or
  in a job with a refiner, is rejected (``composable.unsupported``).
"""

from __future__ import annotations

import decimal
import importlib.util
import json
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from ldm_jobs.model.composable import check_prompt, unsupported
from ldm_jobs.model.prompts import PromptSyntaxError, split_lora_tags
from ldm_jobs.model.seeds import MAX_SEED, derive_seed

from .spec import (
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    SAMPLERS,
    JobSpec,
    check_guidance,
    check_size,
    check_strength,
)

OVERRIDE_COLUMNS = ("negative_prompt", "seed", "steps", "guidance_scale", "sampler", "width",
                    "height", "strength", "init_image", "loras")


def with_native_size(spec: JobSpec, native_size: tuple[int, int]) -> JobSpec:
    """The spec with the sampling width/height it leaves out set to the model's native
    (width, height), so every image task and output row carries its real size."""
    sampling = spec.sampling
    width, height = native_size
    if sampling.width is not None and sampling.height is not None:
        return spec
    resolved = sampling.model_copy(update={"width": sampling.width or width,
                                           "height": sampling.height or height})
    return spec.model_copy(update={"sampling": resolved})


def native_size_hint(source: str) -> tuple[int, int] | None:
    """A model's native (width, height) where its configs tell it without loading weights
    or torch (a built-in or local diffusers folder); None where they cannot (a single
    file, s3://, a model built in code)."""
    if source.startswith("builtin:"):
        package = importlib.util.find_spec("ldm_jobs.model")
        roots = (package.submodule_search_locations or []) if package else []
        folders = [Path(root, "builtin", source.removeprefix("builtin:")) for root in roots]
    else:
        folders = [] if "://" in source else [Path(source)]
    for folder in folders:
        try:
            sample = json.loads((folder / "unet" / "config.json").read_text())["sample_size"]
            levels = json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"]
            height, width = sample if isinstance(sample, list) else (sample, sample)
            factor = 2 ** (len(levels) - 1)
            return int(width) * factor, int(height) * factor
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def size_text(spec: JobSpec) -> str:
    """The job's image size for the plan: `WxH`, resolved from the model's configs where
    that is cheap, else said to be the model's native size."""
    width, height = spec.sampling.width, spec.sampling.height
    if width is not None and height is not None:
        return f"{width}x{height}"
    unset = "width" if width is None else "height"
    note = ("the model's native size" if width is None and height is None
            else f"{unset}: the model's native {unset}")
    native = native_size_hint(spec.model)
    if native is not None:
        return f"{width or native[0]}x{height or native[1]} ({note})"
    if width is None and height is None:
        return "native size of the model"
    return f"{width or '?'}x{height or '?'} ({note})"


@dataclass
class ImageTask:
    row: int  # position of the input row in the shard's table
    id: str
    prompt: str
    negative_prompt: str
    seed: int
    sampler: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    strength: float | None  # None for txt2img
    init_image: Any = None  # PIL image for img2img
    loras: tuple[tuple[str, float], ...] = ()  # (source, weight), sorted by source
    text: str | None = None  # the prompt the model reads, when not `prompt` (tags cut out)
    adapters: tuple = ()  # (name, sha256, web UI hash, weight) per LoRA, set by the worker

    def batch_key(self) -> tuple:
        """Tasks with equal keys can share one `generate` call."""
        return (self.width, self.height, self.sampler, self.steps, self.strength,
                self.init_image is not None)


@dataclass(frozen=True)
class Rejection:
    row: int  # position of the input row in the shard's table
    id: str | None
    reason: str


def _integer(value: Any) -> int:
    # bool is an int subclass; a True "seed" is a data error, not 1.
    if isinstance(value, decimal.Decimal) and value.is_finite() and value == value.to_integral():
        return int(value)  # a decimal(38, 0) column is how Parquet holds integers over 2**63
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"must be an integer, got {_short(value)}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"must be an integer, got {value!r}")
    return int(value)


def _short(value: Any, limit: int = 80) -> str:
    """repr of a bad cell for a message, cut so a huge cell cannot bloat errors.parquet."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _in_range(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        number = _integer(value)
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}, got {number}")
        return number
    return check


def _real(value: Any) -> float:
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"must be a number, got {_short(value)}")
    return float(value)


def _sampler(value: Any) -> str:
    if not isinstance(value, str) or value not in SAMPLERS:
        raise ValueError(f"unknown sampler {_short(value)} (choose from {', '.join(SAMPLERS)})")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be text, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"{len(value)} characters, more than {MAX_PROMPT_CHARS}")
    return value


# Per-row override column -> check returning the normalized value (init_image is separate).
OVERRIDE_CHECKS: dict[str, Callable[[Any], Any]] = {
    "negative_prompt": _text,
    "seed": _in_range(0, MAX_SEED),
    "steps": _in_range(1, MAX_STEPS),
    "guidance_scale": lambda v: check_guidance(_real(v)),
    "sampler": _sampler,
    "width": lambda v: check_size(_integer(v)),
    "height": lambda v: check_size(_integer(v)),
    "strength": lambda v: check_strength(_real(v)),
}


def lora_tags(prompt: str, lora_dir: str | None) -> tuple[str, dict[str, float]]:
    """The prompt without its web-UI `<lora:NAME:WEIGHT>` tags (model/prompts.py reads
    them), and {lora_dir/NAME.safetensors: WEIGHT} of the tags (a name given twice: the
    last weight)."""
    try:
        text, tags = split_lora_tags(prompt)
    except ValueError as error:
        raise ValueError(f"prompt: {error}") from None
    if tags and lora_dir is None:
        raise ValueError(f"prompt: <lora:{tags[0].name}> names a LoRA but sampling.lora_dir "
                         "is not set")
    found = {}
    for tag in tags:
        if not math.isfinite(tag.weight):
            raise ValueError(f"prompt: <lora:{tag.name}:{tag.weight}>: the weight is not finite")
        found[f"{lora_dir.rstrip('/')}/{tag.name}.safetensors"] = tag.weight
    return text, found


def _lora_weight(value: Any) -> float:
    weight = _real(value)
    if not math.isfinite(weight):
        raise ValueError(f"weight must be a finite number, got {weight}")
    return weight


def parse_loras(value: Any) -> dict[str, float]:
    """A `loras` cell in any of its three forms -> {path: weight}: a map<string, float>
    (pyarrow gives a list of pairs), a list of {path, weight} structs, or the text
    "a.safetensors:0.8, b.safetensors" (weight optional, 1)."""
    if isinstance(value, str):
        pairs = []
        for item in filter(None, (part.strip() for part in value.split(","))):
            path, sep, weight = item.rpartition(":")
            # a path with a colon (s3://...) and no weight keeps its colon
            pairs.append((path, float(weight)) if sep and "/" not in weight else (item, 1.0))
    elif isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)):
        pairs = [(item.get("path"), item.get("weight", 1.0)) if isinstance(item, dict)
                 else tuple(item) for item in value]
    else:
        raise ValueError(f"expected a map, a list of {{path, weight}} or text, got "
                         f"{type(value).__name__}")
    loras: dict[str, float] = {}
    for path, weight in pairs:
        if not isinstance(path, str) or not path:
            raise ValueError(f"a LoRA path must be non-empty text, got {_short(path)}")
        loras[path] = _lora_weight(1.0 if weight is None else weight)
    return loras


def row_loras(record: dict, prompt: str, spec: JobSpec) -> tuple[tuple[tuple[str, float], ...], str | None]:
    """A row's LoRAs (its `loras` column, else sampling.loras, plus prompt tags under
    a1111) and the prompt text the model reads when tags were cut from it."""
    sampling = spec.sampling
    loras = dict(sampling.loras)
    if record.get("loras") is not None:
        try:
            loras = parse_loras(record["loras"])
        except (ValueError, TypeError) as error:
            raise ValueError(f"loras: {error}") from None
    text = None
    if sampling.prompt_syntax == "a1111" and "<lora:" in prompt:
        text, tagged = lora_tags(prompt, sampling.lora_dir)
        loras.update(tagged)
    return tuple(sorted(loras.items())), text


def check_syntax(prompt: str, negative: str, steps: int) -> None:
    """Under a1111: the prompt and negative read in the web UI's syntax, their prompt
    edits scheduled over the row's steps; a ValueError names the column that cannot be."""
    for column, text in (("prompt", prompt), ("negative_prompt", negative)):
        try:  # each AND sub-prompt of the prompt on its own (see composable)
            check_prompt(text, steps, positive=column == "prompt")
        except PromptSyntaxError as error:
            raise ValueError(f"{column}: {error}") from None


def row_id(value: Any, global_row: int, has_id_column: bool) -> str:
    """The row's id as text; raises ValueError for a null or empty id."""
    if not has_id_column:
        return f"{global_row:08d}"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError("null id")
    text = str(value)
    if not text:
        raise ValueError("empty id")
    return text


def _check_prompt(value: Any) -> str:
    if value is None:
        raise ValueError("prompt: null")
    if not isinstance(value, str):
        raise ValueError(f"prompt: not text ({type(value).__name__})")
    if not value.strip():
        raise ValueError("prompt: empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt: {len(value)} characters, more than {MAX_PROMPT_CHARS}")
    return value


def check_rows(
    table: pa.Table,
    spec: JobSpec,
    global_rows: list[int],
    id_column: str | None,
    duplicates: dict[int, int],
    load_image: Callable[[Any, int], Any],
) -> tuple[list[ImageTask], list[Rejection]]:
    """Turn a shard's input rows into image tasks, in row order, and rejections.

    `global_rows[i]` is row i's index in the whole input; `duplicates` maps a global
    row to the first row with the same id; `load_image(value, i)` decodes an init_image
    cell of row i (raising on failure).
    """
    sampling = spec.sampling
    records = table.to_pylist()
    tasks: list[ImageTask] = []
    rejected: list[Rejection] = []
    seen_ids: set[str] = set()
    for position, record in enumerate(records):
        global_row = global_rows[position]
        image_id = None
        try:
            image_id = row_id(record.get(id_column) if id_column else None, global_row,
                              bool(id_column))
            if global_row in duplicates:
                first = duplicates[global_row]
                if sampling.images_per_prompt > 1:
                    raise ValueError(
                        f"duplicate id {_short(image_id)}: one of its image ids (the id, or "
                        f"the id plus -1, -2, ...) is also an image id of input row {first}")
                raise ValueError(f"duplicate id {_short(image_id)} (already used by input row "
                                 f"{first})")
            prompt = _check_prompt(record.get(spec.input.prompt_column))
            settings = sampling.model_dump()
            for column, check in OVERRIDE_CHECKS.items():
                if record.get(column) is not None:
                    try:
                        settings[column] = check(record[column])
                    except (ValueError, TypeError, ArithmeticError) as error:
                        raise ValueError(f"{column}: {error}") from None
            init_image = None
            if record.get("init_image") is not None:
                try:
                    init_image = load_image(record["init_image"], position)
                except Exception as error:  # any decode/read failure rejects this row only
                    raise ValueError(f"init_image: {error}") from None
                if int(settings["steps"] * settings["strength"]) < 1:
                    raise ValueError(f"strength: {settings['strength']} x steps "
                                     f"{settings['steps']} leaves no denoising step")
            loras, text = row_loras(record, prompt, spec)
            if sampling.prompt_syntax == "a1111":
                check_syntax(prompt, settings["negative_prompt"], settings["steps"])
                reason = unsupported(prompt, bool(loras), spec.refiner is not None)
                if reason:
                    raise ValueError(f"prompt: {reason}")
            row_tasks = []
            for k in range(sampling.images_per_prompt):
                out_id = image_id if k == 0 else f"{image_id}-{k}"
                if out_id in seen_ids:
                    raise ValueError(f"duplicate id {_short(out_id)} (another row in this shard)")
                seed = ((settings["seed"] + k) & MAX_SEED if record.get("seed") is not None
                        else derive_seed(sampling.seed, out_id))
                row_tasks.append(ImageTask(
                    position, out_id, prompt, settings["negative_prompt"], seed,
                    settings["sampler"], settings["steps"], settings["guidance_scale"],
                    settings["width"], settings["height"],
                    settings["strength"] if init_image is not None else None, init_image,
                    loras, text))
            seen_ids.update(task.id for task in row_tasks)
            tasks.extend(row_tasks)
        except ValueError as error:
            rejected.append(Rejection(position, image_id, str(error)))
    return tasks, rejected


def batches(tasks: list[ImageTask], batch_size: int) -> list[list[ImageTask]]:
    """Group tasks of equal shape, in first-appearance order, into batches of batch_size."""
    groups: dict[tuple, list[ImageTask]] = {}
    for task in tasks:
        groups.setdefault(task.batch_key(), []).append(task)
    return [group[i:i + batch_size] for group in groups.values()
            for i in range(0, len(group), batch_size)]
