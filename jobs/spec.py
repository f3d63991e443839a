"""The job spec: one pydantic model, validated once, with errors that name the field.

A spec is read from YAML or JSON (JSON is YAML), `--set a.b=v` overrides are applied
to the raw mapping before validation (values typed as YAML scalars), and every
problem surfaces as a `SpecError` whose message starts with the dotted field path.
Relative paths are taken relative to the current directory, as a shell user expects.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from ldm_jobs.model.seeds import MAX_SEED

# The sampler names of CONTRACT.md; the model package maps each to its scheduler.
SAMPLERS = ("ddim", "ddpm", "pndm", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras")
MIN_SIZE, MAX_SIZE = 8, 4096
MAX_STEPS = 1000
# Longer prompts are rejected, not truncated: the tokenizer keeps 77 tokens (a few hundred
# characters), so a 10,000-character "prompt" is a data bug (a pasted document, a wrong
# column) that the user should hear about rather than get an image of its first words.
MAX_PROMPT_CHARS = 10_000

Sampler = Literal["ddim", "ddpm", "pndm", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras"]


class SpecError(ValueError):
    """A job spec that cannot run; the message starts with the field path at fault."""


def check_size(value: int) -> int:
    """Width/height rule shared by the spec and per-row overrides."""
    if not MIN_SIZE <= value <= MAX_SIZE or value % 8:
        raise ValueError(f"must be a multiple of 8 between {MIN_SIZE} and {MAX_SIZE}, got {value}")
    return value


def check_guidance(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    return value


def check_strength(value: float) -> float:
    if not (0.0 < value <= 1.0):
        raise ValueError(f"must be in (0, 1], got {value}")
    return value


def _not_bool(value: Any) -> Any:
    # YAML reads `yes`/`on`/`true` as booleans, and pydantic would take them as 1: a
    # `steps: yes` is a mistake, not one step.
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not a boolean ({str(value).lower()})")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
Size = Annotated[int, BeforeValidator(_not_bool), AfterValidator(check_size)]
Guidance = Annotated[float, BeforeValidator(_not_bool), AfterValidator(check_guidance)]
Strength = Annotated[float, BeforeValidator(_not_bool), AfterValidator(check_strength)]


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must never silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _no_userinfo(field: str) -> AfterValidator:
    """Credentials never live in the spec: `scheme://user:secret@host` loses `user:secret@`.

    The spec travels to every worker, into `_manifest.json` and into the Ray Jobs
    entrypoint, so a secret in it would leak everywhere; and neither boto3 nor pyarrow
    reads userinfo (the request would fail with the secret in its error message).
    Credentials come from the AWS environment only.
    """
    def drop(value: str | None) -> str | None:
        if isinstance(value, str) and _URL_USERINFO.match(value):
            warnings.warn(f"{field}: credentials in the URL were removed; they come from the "
                          "AWS environment only (AWS_ACCESS_KEY_ID, ...)", stacklevel=2)
            return redact_url(value, replacement="")
        return value
    return AfterValidator(drop)


class InputSpec(_Strict):
    path: Annotated[str, _no_userinfo("input.path")] = Field(
        min_length=1, description="Parquet file, folder, glob or s3:// prefix "
        "(CSV, JSON Lines, .txt one prompt per line for small local batches)")
    prompt_column: str = Field("prompt", min_length=1, description="text column; a row whose "
                               f"prompt is null, blank or over {MAX_PROMPT_CHARS} characters "
                               "is rejected into errors.parquet")
    id_column: str | None = Field(
        None, description="column holding row ids; unset: the column 'id' if the input has "
        "one, else the row's global index zero-padded to 8 digits")


class OutputSpec(_Strict):
    path: Annotated[str, _no_userinfo("output.path")] = Field(
        min_length=1, description="local folder or s3:// prefix")
    format: Literal["parquet", "webdataset"] = "parquet"
    image_format: Literal["png", "jpeg", "webp"] = "png"
    rows_per_shard: Int = Field(256, ge=1, description="images per output shard")
    quality: Int = Field(95, ge=1, le=100, description="jpeg/webp quality")


class SamplingSpec(_Strict):
    sampler: Sampler = "dpmpp_2m"
    steps: Int = Field(25, ge=1, le=MAX_STEPS)
    guidance_scale: Guidance = 7.5
    width: Size | None = Field(None, description="image width; unset: the model's native "
                               "size (64 for builtin:shapes, 512 SD 1.x, 768 SD 2.x v, 1024 SDXL)")
    height: Size | None = Field(None, description="image height; unset: the model's native size")
    seed: Int = Field(0, ge=0, le=MAX_SEED)
    images_per_prompt: Int = Field(1, ge=1, le=10_000)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    strength: Strength = 0.75
    prompt_syntax: Literal["plain", "a1111"] = Field("plain", description=(
        "plain: diffusers' reading, cut at 77 tokens; a1111: the AUTOMATIC1111 web UI's "
        "(emphasis:1.2), [less], BREAK, prompts of any length in 75-token chunks, "
        "<lora:NAME:WEIGHT> tags, prompt editing [from:to:when], alternation [a|b] and "
        "AND with :WEIGHT (composable diffusion)"))
    loras: dict[Annotated[str, Field(min_length=1)], Guidance] = Field(
        default_factory=dict, description="{PATH: WEIGHT} of .safetensors LoRAs (local or "
        "s3://) for every row; a row's own `loras` column replaces it")
    lora_dir: str | None = Field(None, min_length=1, description=(
        "folder (local or s3://) where <lora:NAME:WEIGHT> tags find NAME.safetensors"))


def _actor_count(value: Any) -> Any:
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"a whole number of actors >= 1, or auto (got {value!r})")
    return value


class ComputeSpec(_Strict):
    actors: Annotated[int | Literal["auto"], BeforeValidator(_actor_count)] = Field(
        1, description="actors to run; auto: one per free slot of the cluster "
        "(gpus_per_actor GPUs, or one CPU on a CPU-only cluster), growing as nodes join and "
        "shrinking as they leave, up to max_actors")
    max_actors: Int = Field(64, ge=1, description="the most actors `actors: auto` runs")
    batch_size: Int = Field(8, ge=1)
    gpus_per_actor: Float = Field(0, ge=0, allow_inf_nan=False,
                                  description="fractions share one GPU between actors")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    lora_cache_mb: Int = Field(1024, ge=1, description=(
        "LoRA adapters each actor keeps loaded, in MiB (least recently used out)"))
    compile: bool = Field(False, description=(
        "torch.compile the UNet when each actor loads the model; batches are padded to "
        "batch_size so a job compiles once per image size, never mid-run"))


class StorageSpec(_Strict):
    """Where S3-compatible stores live; credentials come from the AWS environment only."""

    endpoint_url: Annotated[str | None, _no_userinfo("storage.endpoint_url")] = None
    region: str | None = None


class PromptExpansion(_Strict):
    """Template variants per input row (dynamicprompts syntax), see jobs/expand.py."""

    mode: Literal["random", "combinatorial"] = "random"
    variants: Int = Field(1, ge=1, le=1_000_000, description="random mode: prompts per row")
    max: Int | None = Field(None, ge=1, le=1_000_000,
                            description="combinatorial mode: at most this many per row")
    wildcards: str | None = Field(None, description="folder or s3:// prefix of NAME.txt files")


class ExpandSpec(_Strict):
    prompts: PromptExpansion | None = None
    sweep: dict[str, list[Any]] = Field(default_factory=dict, description=(
        "a grid over per-row sampling fields, crossed with each row's variants"))


class RefinerSpec(_Strict):
    """An SDXL refiner as a second stage: it takes the base model's latents over at
    ``switch_at`` of the steps (diffusers' ``denoising_end`` / ``denoising_start``)."""

    model: Annotated[str, _no_userinfo("refiner.model")] = Field(
        ..., min_length=1, description="the SDXL refiner: a folder or checkpoint, local or s3://")
    switch_at: float = Field(0.8, gt=0.0, lt=1.0, description=(
        "the fraction of the schedule the base model runs before the refiner takes over"))


class JobSpec(_Strict):
    name: str = Field("job", min_length=1)
    model: Annotated[str, _no_userinfo("model")] = Field("builtin:shapes", min_length=1)
    input: InputSpec
    output: OutputSpec
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    expand: ExpandSpec | None = None
    refiner: RefinerSpec | None = None
    # Dotted paths of the URL fields whose credentials were dropped (see _no_userinfo).
    _credentials_dropped: frozenset[str] = PrivateAttr(default=frozenset())

    @model_validator(mode="after")
    def _expansion_alone(self) -> JobSpec:
        if self.expand is not None and self.sampling.images_per_prompt > 1:
            raise ValueError("sampling.images_per_prompt: must be 1 with expand "
                             "(use expand.prompts.variants or a seed sweep)")
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _note_dropped_credentials(cls, data: Any, handler: Any) -> JobSpec:
        spec = handler(data)
        if isinstance(data, dict):
            spec._credentials_dropped = frozenset(
                path for path in URL_FIELDS
                if isinstance(value := _lookup(data, path), str) and _URL_USERINFO.match(value))
        return spec

    def public_dict(self) -> dict[str, Any]:
        """The resolved spec for the manifest: no credentials, and `***@` where some were
        given in a URL and dropped, so a reader of the manifest sees that they were."""
        public = _redact(self.model_dump(mode="json"))
        for path in self._credentials_dropped:
            section, _, key = path.rpartition(".")
            node = public.get(section, {}) if section else public
            if isinstance(node.get(key), str):
                node[key] = _SCHEME.sub(lambda m: m.group(1) + "***@", node[key], count=1)
        return public


URL_FIELDS = ("model", "refiner.model", "input.path", "output.path", "storage.endpoint_url")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)")


def _lookup(data: dict, path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


_URL_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")
# The same anywhere in a text (error messages quote URLs inside sentences and quotes).
_URL_USERINFO_ANYWHERE = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s\"'<>]*@")
# Environment variables whose values are secrets; they must never reach a message.
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_MIN_SECRET_CHARS = 8  # shorter values (test dummies like "testing") would mangle words


def resolved_note(path: str) -> str:
    """` (resolved to /abs/path)` for a relative local path, else ``: a message about a
    relative path says where it was looked for (the current directory decides)."""
    local = path.removeprefix("file://")
    if "://" in local or local.startswith("builtin:") or os.path.isabs(local):
        return ""
    return f" (resolved to {os.path.abspath(local)})"


def redact_url(text: str, replacement: str = "***@") -> str:
    """`https://user:secret@host/x` -> `https://***@host/x`; anything else unchanged."""
    return _URL_USERINFO.sub(lambda m: m.group(1) + replacement, text)


def redact_text(text: str) -> str:
    """A message made safe to show: URL userinfo and secret env values become `***`."""
    text = _URL_USERINFO_ANYWHERE.sub(lambda m: m.group(1) + "***@", text)
    for name in SECRET_VARIABLES:
        secret = os.environ.get(name, "")
        if len(secret) >= _MIN_SECRET_CHARS:
            text = text.replace(secret, "***")
    return text


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return redact_text(value) if isinstance(value, str) else value


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(spec)"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{where}: {msg}")
    return "\n".join(lines)


def parse_spec(data: Any, source: str = "spec") -> JobSpec:
    """Validate a raw mapping into a JobSpec; every failure is one SpecError."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a job spec must be a mapping, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(_format_errors(error)) from None


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b=v` to a raw mapping; v is typed as a YAML scalar (`20` -> int)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {override!r}: expected FIELD=VALUE, e.g. sampling.steps=20")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise SpecError(f"{key}: cannot parse value {raw!r}: {error}") from None
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"{'.'.join(parts[:depth + 1])}: is not a section, cannot set {key}")
        node = child
    node[parts[-1]] = value


def load_spec(path: str, overrides: Sequence[str] = ()) -> JobSpec:
    """Read a YAML or JSON job spec, apply `--set` overrides, validate."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise SpecError(f"{path}: cannot read job spec: {error.strerror or error}") from None
    except UnicodeDecodeError:  # a Parquet file or an image given where the spec goes
        raise SpecError(f"{path}: not a job spec: a binary file, not YAML/JSON text "
                        "(an input file goes in the spec's input.path)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML/JSON: {' '.join(str(error).split())}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a job spec must be a mapping, got {type(data).__name__}")
    for override in overrides:
        apply_override(data, override)
    return parse_spec(data, source=path)


def spec_schema() -> dict[str, Any]:
    """JSON schema of the job spec (what `ldm-jobs schema` prints)."""
    return JobSpec.model_json_schema()
