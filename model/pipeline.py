"""txt2img / img2img over the model components, seed for seed with diffusers.

The pipeline owns no randomness of its own: every draw for sample i comes from
``torch.Generator("cpu").manual_seed(seeds[i])`` in the order diffusers' pipelines draw
them when given one generator per sample (initial latents; or VAE sample then noise for
img2img; then any ancestral noise inside the sampler). An image therefore depends only on
its own row, never on its batch or machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import composable, conditioning, generate_args, prompt_encoding, step_conditioning
from . import samplers as sampling
from .generate_args import GenerationRequest

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Distinct prompt strings whose text embeddings a pipeline keeps (an SD 1.x entry is
# 77 x 768 values): a job's negative prompt, and prompts repeated across images, are
# encoded once. 0 turns the cache off.
TEXT_CACHE_SIZE = 128
# Texts go through the encoder in groups of exactly this many rows (the last group padded),
# so an embedding never depends on which other texts, or how many, were encoded with it:
# with a cache, that would otherwise depend on what the pipeline served before (a retried
# shard must give the same bytes; GEMM kernels may be chosen by batch size).
TEXT_ENCODE_GROUP = 8
# Images the VAE decodes at a time: its full-resolution activations dominate peak memory
# (hundreds of MiB per 512x512 image in float32), and beyond a few images a larger batch
# buys no speed. None decodes the whole batch at once.
DECODE_CHUNK_SIZE = 4


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise ValueError(f"dtype {dtype} is not one of {sorted(DTYPES)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class Pipeline:
    """A loaded latent diffusion model: tokenizer, text encoder, UNet, VAE and a schedule."""

    def __init__(
        self,
        tokenizer,
        text_encoder: torch.nn.Module,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        scheduler_config: dict,
        *,
        name: str,
        content_hash: str,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        text_cache_size: int = TEXT_CACHE_SIZE,
        decode_chunk_size: int | None = DECODE_CHUNK_SIZE,
        channels_last: bool | None = None,
        family: str = "sd1",
        tokenizer_2=None,
        text_encoder_2: torch.nn.Module | None = None,
        force_zeros_for_empty_prompt: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        # SDXL: the second tokenizer and encoder (the refiner has only these)
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        self.family = family
        alive = weakref.ref(self)  # no cycle: a dropped pipeline frees its weights at once
        self.text = conditioning.TextEncoders(family, lambda: alive().text_components(),
                                              force_zeros_for_empty_prompt)
        self.unet = unet
        self.vae = vae
        self.scheduler_config = dict(scheduler_config)
        self.schedule_config = sampling.SchedulerConfig.from_dict(self.scheduler_config)
        self.name = name
        self.content_hash = content_hash
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.vae_dtype = vae_dtype(vae, self.dtype)
        self.latent_channels = int(getattr(unet.config, "in_channels", 4))
        self.vae_factor = int(vae.downsampling_factor)
        self.text_cache_size = int(text_cache_size)
        # keyed by the model and the text (plain) or its parsed chunks (a1111)
        self._text_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        # the text-encoder LoRAs patched in while texts are encoded (a text cache key part)
        self.text_adapter_key: tuple = ()
        if decode_chunk_size is not None and int(decode_chunk_size) < 1:
            raise ValueError(f"decode_chunk_size={decode_chunk_size} must be None or >= 1")
        self.decode_chunk_size = decode_chunk_size
        # Channels-last convolutions measured faster on the CPU (oneDNN); on CUDA, PyTorch's
        # GroupNorm makes its input contiguous, so every norm would convert layouts back
        # and forth: off there unless asked for.
        self.channels_last = False
        self.set_channels_last(self.device.type == "cpu" if channels_last is None else channels_last)
        # (the UNet compiled, its compiled form): see ``compile``
        self._compiled: tuple[torch.nn.Module, Any] | None = None
        self._clone_output = False
        self.batch_bucket: int | None = None

    def text_components(self) -> list[tuple[Any, torch.nn.Module]]:
        """The (tokenizer, text encoder) pairs this family reads, first to last."""
        pairs = ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
        return [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]

    def compile(self, batch_size: int | None = None, *, mode: str | None = None,
                backend: str = "inductor") -> None:
        """Compile the UNet, which is nearly all of a generation's time, with ``torch.compile``
        for static shapes.

        A compiled graph is specialised to one input shape, and a new shape compiles again
        (seconds on a GPU, a minute on a small CPU). With ``batch_size``, every ``generate``
        call runs in batches of exactly that many rows: a smaller call is padded by
        repeating its last row (the extra images are dropped) and a larger one is split,
        so a job whose shards end in a short batch never recompiles mid-run. Images do not
        change with the padding: every row still draws only from its own seed. ``mode``
        and ``backend`` go to ``torch.compile`` (``mode="reduce-overhead"`` adds CUDA
        graphs on a GPU).
        """
        if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
            raise ValueError(f"batch_size={batch_size} must be None or >= 1")
        self._compiled = (self.unet, torch.compile(self.unet, dynamic=False, mode=mode,
                                                   backend=backend))
        # CUDA graphs replay into the same output buffer: keep each step's output apart
        self._clone_output = mode in ("reduce-overhead", "max-autotune")
        self.batch_bucket = int(batch_size) if batch_size is not None else None

    @property
    def compiled(self) -> bool:
        """Whether ``generate`` runs a compiled UNet (the one in ``self.unet``: replacing
        the module falls back to running the new one as it is)."""
        return self._compiled is not None and self._compiled[0] is self.unet

    def _unet_call(self, *args: torch.Tensor, **kwargs) -> torch.Tensor:
        return self._compiled[1](*args, **kwargs) if self.compiled else self.unet(*args, **kwargs)

    def set_channels_last(self, enabled: bool) -> None:
        """Run the UNet and VAE with channels-last (NHWC) weights and activations, or not."""
        layout = torch.channels_last if enabled else torch.contiguous_format
        for module in (self.unet, self.vae):
            if isinstance(module, torch.nn.Module):
                module.to(memory_format=layout)
        self.channels_last = bool(enabled)

    def clear_text_cache(self) -> None:
        """Forget cached text embeddings (needed after changing the text encoder's weights
        in place; a different encoder object or dtype gets its own entries anyway)."""
        self._text_cache.clear()

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return sampling.to_device(x, self.device)

    # ----------------------------------------------------------------- public API
    @property
    def native_size(self) -> tuple[int, int]:
        """(width, height) the model was trained at: the UNet's ``sample_size`` (latent
        pixels) times the VAE factor. What ``generate`` draws when no size is given."""
        sample = self.unet.config.sample_size
        height, width = sample if isinstance(sample, (list, tuple)) else (sample, sample)
        return int(width) * self.vae_factor, int(height) * self.vae_factor

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        negative_prompts: Sequence[str] | str | None = None,
        steps: int = 30,
        guidance_scale: float | Sequence[float] = 7.5,
        sampler: str = "dpmpp_2m",
        width: int | None = None,
        height: int | None = None,
        init_images: Sequence[Image.Image] | None = None,
        strength: float = 0.75,
        prompt_syntax: str = "plain",
        loras: Sequence[dict[str, float]] | None = None,
        *,
        seed: int | None = None,
        refiner: Pipeline | None = None,
        switch_at: float = 0.8,
        **micro_conditioning: Any,
    ) -> list[Image.Image]:
        """One image per prompt; each image's ``info["seed"]`` is the seed it was drawn from.

        SDXL takes diffusers' micro-conditioning arguments ``original_size``,
        ``crops_coords_top_left``, ``target_size`` and, for the refiner, ``aesthetic_score``
        / ``negative_aesthetic_score`` (see ``conditioning``).

        Seeds: ``seeds`` (one per prompt), or ``seed=s`` (prompt i gets ``s + i``, as a job
        row with seed s and several images per prompt), or neither (prompt i gets the seed a
        job with ``sampling.seed: 0`` derives for row i of an input without ids).
        ``width``/``height`` left out: the model's ``native_size``.

        ``refiner``: a second pipeline in the same latent space (the SDXL refiner) takes the
        latents over at ``switch_at`` of the schedule and decodes them, as diffusers'
        ensemble of experts (base ``denoising_end`` -> refiner ``denoising_start``). Each
        stage draws from its own fresh generator per row seed.
        """
        native_width, native_height = self.native_size
        request = self.check(
            prompts, generate_args.seeds_for(prompts, seeds, seed), negative_prompts, steps, guidance_scale,
            sampler, native_width if width is None else width,
            native_height if height is None else height, init_images, strength, prompt_syntax,
        )
        unknown = set(micro_conditioning) - set(conditioning.OPTIONS)
        if unknown:
            raise TypeError(f"generate() got unexpected keyword arguments {sorted(unknown)}")
        request.extra.update(conditioning.check_options(micro_conditioning))
        if loras is not None:  # one {source: weight} per prompt; see lora_rows
            from . import lora_rows

            request.loras = lora_rows.resolve(self, loras, len(request.prompts))
        if refiner is not None:
            self._check_refiner(refiner, switch_at, request)
        if request.prompt_syntax == "a1111":
            with_loras = bool(request.loras) and any(request.loras)
            for i, prompt in enumerate(request.prompts):
                reason = composable.unsupported(prompt, with_loras, refiner is not None)
                if reason:
                    raise ValueError(f"prompts[{i}]: {reason}")
        if not self.batch_bucket:
            decoder, latents = self._stages(request, refiner, switch_at)
            images = decoder.decode(latents)
        else:
            images = []
            for part in generate_args.split(request, self.batch_bucket):
                rows = len(part.prompts)
                decoder, latents = self._stages(generate_args.pad(part, self.batch_bucket), refiner, switch_at)
                images += decoder.decode(latents[:rows])
        for image, row_seed in zip(images, request.seeds):
            image.info["seed"] = row_seed
        return images

    def _check_refiner(self, refiner: Pipeline, switch_at: float, request: GenerationRequest) -> None:
        if not isinstance(refiner, Pipeline):
            raise TypeError(f"refiner must be a Pipeline, got {type(refiner).__name__}")
        if (refiner.latent_channels, refiner.vae_factor) != (self.latent_channels, self.vae_factor):
            raise ValueError(f"refiner {refiner.name} ({refiner.family}) does not share the latent space "
                             f"of {self.name} ({self.family})")
        if isinstance(switch_at, bool) or not isinstance(switch_at, (int, float)) or not 0 < switch_at < 1:
            raise ValueError(f"switch_at={switch_at!r} must be a number in (0, 1)")
        if request.init_images is not None or request.loras is not None:
            raise ValueError("refiner= is for txt2img without loras= (init_images and loras are not "
                             "supported in a two-stage run)")
        if request.prompt_syntax == "a1111" and step_conditioning.schedules(
                request.prompts, request.negative_prompts, request.steps) is not None:
            raise ValueError("refiner= with prompt editing or alternating words ([from:to:when], "
                             "[a|b]) under prompt_syntax='a1111' is not supported: the two stages "
                             "would split the prompt's schedule")
        for pipe, window in ((self, dict(end=switch_at)), (refiner, dict(start=switch_at))):
            sampling.plan(request.sampler, pipe.schedule_config, request.steps, **window)  # names an empty stage

    def _stages(self, request: GenerationRequest, refiner: Pipeline | None,
                switch_at: float) -> tuple[Pipeline, torch.Tensor]:
        """(the pipeline whose VAE decodes, the final latents) of one or two stages."""
        if refiner is None:
            return self, self._denoise(request)
        latents = self._denoise(dataclasses.replace(request, window=(None, switch_at)))
        return refiner, refiner._denoise(dataclasses.replace(
            request, window=(switch_at, None), init_latents=latents))

    def check(
        self, prompts, seeds, negative_prompts, steps, guidance_scale, sampler, width, height,
        init_images, strength, prompt_syntax="plain",
    ) -> GenerationRequest:
        """Every argument checked (``generate_args.check``), against this model's schedule
        length and VAE factor."""
        return generate_args.check(
            prompts, seeds, negative_prompts, steps, guidance_scale, sampler, width, height,
            init_images, strength, prompt_syntax,
            num_train_timesteps=int(self.schedule_config.num_train_timesteps), vae_factor=self.vae_factor)

    # ------------------------------------------------------------------- stages
    def encode_text(self, texts: list[str], adapters: Sequence | None = None) -> torch.Tensor:
        """Text embeddings (B, 77, D) in the pipeline's dtype, read plainly.

        Each distinct text is encoded once per call, and the last ``text_cache_size``
        distinct texts are remembered (keyed by the text and the encoder, its dtype and
        device, and its LoRAs), so a repeated prompt or negative prompt skips the text
        encoder. ``adapters``: one LoRA set per text (``request.loras``' entries).
        """
        return torch.stack([context for context, _ in self._text_rows(list(texts), "plain", adapters)])

    def encode_prompts(self, texts: list[str], syntax: str = "plain",
                       adapters: Sequence | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet context (B, S, D) of the texts read in ``syntax``, and its key mask
        (B, S) where the texts' lengths differ (None where they do not). Plain texts are
        77 tokens each; web-UI ones 77 per chunk, cached by their parsed chunks. A text
        is read as one step's text: prompt edits are resolved per step by ``generate``
        (``call_conditioning``), not here."""
        return prompt_encoding.pad_contexts(
            [context for context, _ in self._text_rows(list(texts), syntax, adapters)])

    def sdxl_prompts(self, texts: list[str], syntax: str = "plain", adapters: Sequence | None = None
                     ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """SDXL: one context (S_i, D) per text (77 tokens plain, 77 per chunk in the web
        UI's syntax) and the pooled embeddings (B, P), in the pipeline's dtype, through the
        text cache. ``adapters``: one LoRA set per text; both encoders are patched per set
        (``lora_rows.encode_rows``), the cache keyed by it."""
        return self._contexts(list(texts), syntax, adapters)

    def _contexts(self, texts: list[str], syntax: str, adapters: Sequence | None
                  ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """One context per text, and the pooled embeddings (B, P) (None: SD 1.x / 2.x)."""
        contexts, pooled = zip(*self._text_rows(texts, syntax, adapters))
        return list(contexts), (None if pooled[0] is None else torch.stack(pooled))

    def _text_rows(self, texts: list[str], syntax: str, adapters: Sequence | None = None
                   ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """One (context (S_i, D), pooled (P,) or None) per text, through the text cache;
        texts with text-encoder LoRAs are encoded with their own set patched in
        (``lora_rows.encode_rows``)."""
        if adapters is not None and any(adapters):
            from . import lora_rows

            return lora_rows.encode_rows(self, texts, adapters,
                                         lambda group: self._text_rows(group, syntax))
        keys = self.text.keys(texts, syntax)
        if self.text_cache_size <= 0:
            return self._encode(keys, syntax)
        return self._cached(keys, lambda missing: self._encode(missing, syntax))

    def _encode(self, keys: list, syntax: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``TextEncoders.encode`` in the pipeline's dtype, its rows in fixed-size groups."""
        rows = self.text.encode(keys, syntax, lambda ids: self._in_groups(self.text.run, ids))
        return [(c.to(self.dtype), None if p is None else p.to(self.dtype)) for c, p in rows]

    def _cached(self, keys: list, encode) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """One row per key; ``encode(missing keys)`` makes those not cached yet."""
        model_key = (id(self.text_encoder), self.content_hash, self.dtype, str(self.device),
                     self.text_adapter_key)
        found: dict = {}
        for key in dict.fromkeys(keys):
            row = self._text_cache.get((model_key, key))
            if row is not None:
                self._text_cache.move_to_end((model_key, key))
                found[key] = row
        missing = [key for key in dict.fromkeys(keys) if key not in found]
        if missing:
            for key, row in zip(missing, encode(missing)):
                # clones, not views that pin the whole batch
                found[key] = row = tuple(None if t is None else t.clone() for t in row)
                self._text_cache[(model_key, key)] = row
            while len(self._text_cache) > self.text_cache_size:
                self._text_cache.popitem(last=False)
        return [found[key] for key in keys]

    def _in_groups(self, run, ids: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``run(ids on the device) -> tensors`` over rows of ids (N, 77) in groups of
        exactly TEXT_ENCODE_GROUP rows (the last padded), the outputs joined."""
        groups = []
        for i in range(0, ids[0].shape[0], TEXT_ENCODE_GROUP):
            group = [x[i : i + TEXT_ENCODE_GROUP] for x in ids]
            n = group[0].shape[0]
            out = run([self._to_device(torch.cat([g, g[-1:].expand(TEXT_ENCODE_GROUP - n, -1)])) for g in group])
            groups.append([o[:n] for o in out])
        return tuple(torch.cat(parts) for parts in zip(*groups))

    def text_context(self, request: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The UNet context for one call, its key mask (None: every key is real), and
        which rows are guided (see ``unet_conditioning``)."""
        cond, mask, guided = self.unet_conditioning(request)
        return cond.context, mask, guided

    def unet_conditioning(self, request: GenerationRequest, composed: bool = False
                          ) -> tuple[conditioning.Conditioning, torch.Tensor | None, torch.Tensor]:
        """What the UNet reads besides latents and timesteps (context; SDXL's pooled text
        and time ids), the context's key mask (None: every key is real), and which rows
        are guided.

        Guided rows stack [uncond; cond] so both branches run in one UNet call; rows with
        scale <= 1 run the conditional branch alone, as diffusers does. ``composed``: the
        request's prompts are the sub-prompts of a ``composable.Composition``, whose
        negatives always run.
        """
        guided = torch.tensor([s > 1.0 for s in request.guidance_scales])
        prompts, negatives = request.prompts, request.negative_prompts
        if request.prompt_syntax == "a1111":  # the text of the first step (the only one
            # where no row's text changes; see ``call_conditioning`` for the others)
            prompts, negatives = step_conditioning.first_texts(prompts, negatives, request.steps)
        cond = self._build(request, prompts, negatives,
                           lambda texts, sets: self._contexts(texts, request.prompt_syntax, sets), composed)
        return cond, cond.context_mask, guided

    def _build(self, request: GenerationRequest, prompts: list[str], negatives: list[str],
               encode, composed: bool = False) -> conditioning.Conditioning:
        """``conditioning.build`` for these rows' texts (``encode(texts, sets)``: see there)."""
        guided = composed or any(s > 1.0 for s in request.guidance_scales)
        return conditioning.build(self.text, encode, prompts, negatives, guided, request.height,
                                  request.width, request.extra, self.dtype, self.device, request.loras)

    def call_conditioning(self, request: GenerationRequest, composed: bool = False
                          ) -> step_conditioning.StepConditioning | None:
        """The conditioning of each model call where a row's text changes during sampling
        (the web UI's prompt editing and alternation, ``prompt_syntax="a1111"``), over the
        request's steps; None where no row's text changes. Every distinct text (with its
        row's LoRA set) is encoded once, up front. ``composed``: see ``unet_conditioning``."""
        if request.prompt_syntax != "a1111":
            return None
        found = step_conditioning.schedules(request.prompts, request.negative_prompts, request.steps)
        if found is None:
            return None
        guided = composed or any(s > 1.0 for s in request.guidance_scales)
        sides = [found[0]] + ([found[1]] if guided else [])
        texts = [text for side in sides for entries in side for _, text in entries]
        row_sets = None
        if request.loras is not None:
            row_sets = [request.loras[i] for side in sides for i, entries in enumerate(side) for _ in entries]
        from . import lora_rows

        encode = step_conditioning.encoder_of(
            texts, row_sets, lora_rows.set_key,
            lambda group, sets: self._text_rows(group, request.prompt_syntax, sets))
        return step_conditioning.StepConditioning(
            *found, lambda prompts, negatives: self._build(request, prompts, negatives, encode, composed))

    def initial_noise(self, generators: list[torch.Generator], shape: tuple) -> torch.Tensor:
        # One draw of batch 1 per sample from its own generator, in float32 on the CPU.
        return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])

    def encode_images(
        self, images: list[Image.Image], request: GenerationRequest
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's posterior (mean, logvar) of the init images, resized to the asked size."""
        pixels = torch.cat([self.image_to_tensor(im, request.width, request.height) for im in images])
        return self.vae.encode_moments(pixels.to(self.device, self.vae_dtype))

    @staticmethod
    def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.LANCZOS)
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)[None]  # (1, 3, H, W)
        return tensor * 2.0 - 1.0

    def model_fn(self, context: torch.Tensor | None, guided: torch.Tensor, scales: torch.Tensor,
                 context_mask: torch.Tensor | None = None, added: dict | None = None,
                 at_call: Callable[[int], conditioning.Conditioning] | None = None,
                 composition: composable.Composition | None = None):
        """The raw UNet prediction with classifier-free guidance, for the sampler.
        ``added``: the UNet's other inputs (SDXL's ``pooled`` and ``time_ids``).
        ``at_call(step)``: the conditioning of each model call instead of one for all
        (prompt editing, see ``step_conditioning``). ``composition``: the conditioning's
        rows are ``[negatives; sub-prompts]`` and each row's prediction is
        ``uncond + scale * sum_k w_k * (cond_k - uncond)`` over its sub-prompts (the web
        UI's AND); a row of one sub-prompt at weight 1 computes exactly what it would alone."""
        fixed = (context, context_mask, added or {})
        all_guided = bool(guided.all())
        # The UNet's rows: x alone (no row guided), or [x; x[cond_rows]]: the negatives,
        # then each row's positive (every row), or each of its sub-prompts (composed).
        if composition is not None:  # the negatives run: a composed row reads them at any scale
            cond_rows = torch.tensor(composition.rows)
            first = self._to_device(torch.tensor(composition.first))
            weights = self._to_device(torch.tensor(composition.weights)).view(-1, 1, 1, 1)
        else:
            cond_rows = torch.arange(len(scales)) if bool(guided.any()) else None
        cond_rows = None if cond_rows is None else self._to_device(cond_rows)
        guided = self._to_device(guided).view(-1, 1, 1, 1)
        scales = self._to_device(scales).view(-1, 1, 1, 1)

        def predict(x_in: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
            context, context_mask, added = fixed
            if at_call is not None:
                cond = at_call(step)
                context, context_mask, added = cond.context, cond.context_mask, cond.unet_kwargs()
            x_unet = x_in if cond_rows is None else torch.cat([x_in, x_in[cond_rows]])
            x_unet = self._layout(x_unet.to(self.device, self.dtype))
            out = self._unet_call(x_unet, self._timesteps(t, cond_rows), context,
                                  context_mask=context_mask, **added)
            if self._clone_output and self.compiled:
                out = out.clone()
            out = out.float()
            if cond_rows is None:
                return out
            uncond, cond = out[: x_in.shape[0]], out[x_in.shape[0] :]
            if composition is None:
                mixed = uncond + scales * (cond - uncond)
            else:  # the web UI's combine: uncond + scale * sum_k w_k (cond_k - uncond)
                mixed = uncond + scales * torch.zeros_like(uncond).index_add_(
                    0, cond_rows, weights * (cond - uncond[cond_rows]))
                cond = cond[first]
            return mixed if all_guided else torch.where(guided, mixed, cond)

        return predict

    def _timesteps(self, t, cond_rows: torch.Tensor | None) -> torch.Tensor:
        """The UNet's timesteps on the device, for the rows ``x`` (``cond_rows`` None) or
        ``[x; x[cond_rows]]``. One shared step stays a scalar: the UNet then embeds it
        once, and it is made on the device from a number, with no host copy."""
        t = torch.as_tensor(t)
        if t.ndim == 0:
            return torch.full((), float(t), dtype=torch.float32, device=self.device)
        t = t.to(self.device)
        return t if cond_rows is None else torch.cat([t, t[cond_rows]])

    def _denoise(self, request: GenerationRequest) -> torch.Tensor:
        if request.loras and any(request.loras):
            from . import lora_rows

            return lora_rows.denoise(self, request)
        return self.denoise(request)

    def denoise(self, request: GenerationRequest) -> torch.Tensor:
        generators = [torch.Generator("cpu").manual_seed(s) for s in request.seeds]
        shape = (self.latent_channels, request.height // self.vae_factor, request.width // self.vae_factor)
        scales = torch.tensor(request.guidance_scales, dtype=torch.float32)
        guided = torch.tensor([s > 1.0 for s in request.guidance_scales])
        composition = composable.compose(request.prompts) if request.prompt_syntax == "a1111" else None
        texts = request
        if composition is not None:  # the web UI's AND: each sub-prompt is a row of text
            texts = dataclasses.replace(request, prompts=list(composition.texts), loras=None)
            guided |= torch.tensor(composition.composed)
        composed = composition is not None
        stepped = self.call_conditioning(texts, composed)
        if stepped is None:
            cond, context_mask, _ = self.unet_conditioning(texts, composed)
            context = cond.context
            predict = self.model_fn(context, guided, scales, context_mask, cond.unet_kwargs(),
                                    composition=composition)
            # every step attends to the same text: its keys and values are computed once (a
            # compiled UNet computes them inside its graph instead)
            cached = None if self.compiled else getattr(self.unet, "cached_context", None)
        else:  # the text changes between steps: keys and values are computed at each
            predict = self.model_fn(None, guided, scales, at_call=stepped.at, composition=composition)
            cached = None
        start, end = request.window
        with cached(context) if cached is not None else contextlib.nullcontext():
            if request.init_latents is not None:
                return sampling.resume(request.sampler, predict, request.init_latents, request.steps,
                                       start, self.schedule_config, generators=generators)
            if request.init_images is None:
                noise = self._to_device(self.initial_noise(generators, shape))
                return sampling.txt2img(
                    request.sampler, predict, noise, request.steps, self.schedule_config,
                    generators=generators, end=end,
                )
            mean, logvar = self.encode_images(request.init_images, request)
            init_latents = torch.cat([
                self.vae.sample(mean[i : i + 1], logvar[i : i + 1], generators[i])
                for i in range(len(generators))
            ]).float() * self.vae.scaling_factor
            noise = self._to_device(self.initial_noise(generators, shape))
            return sampling.img2img(
                request.sampler, predict, init_latents, noise, request.steps, request.strength,
                self.schedule_config, generators=generators,
            )

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        images = self.decode_to_array(latents)
        return [Image.fromarray(a) for a in images]

    def decode_to_array(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 images (B, H, W, 3), decoded ``decode_chunk_size`` images at a time."""
        chunk = self.decode_chunk_size or latents.shape[0]
        parts = [self._decode_chunk(latents[i : i + chunk]) for i in range(0, latents.shape[0], chunk)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _decode_chunk(self, latents: torch.Tensor) -> np.ndarray:
        """Decoded again in float32 if half precision gave NaN; quantised to uint8 on the
        device, so a quarter of the bytes cross back to the host."""
        z = self._layout(latents.to(self.device, torch.float32) / self.vae.scaling_factor)
        pixels = self.vae.decode(z.to(self.vae_dtype)).float()
        if not torch.isfinite(pixels).all() and self.vae_dtype != torch.float32:
            pixels = self.vae.float().decode(z).float()
            self.vae.to(self.vae_dtype)
        if not torch.isfinite(pixels).all():
            raise FloatingPointError("the VAE decoded non-finite pixels (NaN or infinity)")
        pixels = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return np.ascontiguousarray(pixels.permute(0, 2, 3, 1).cpu().numpy())  # (B, H, W, 3)


def vae_dtype(vae: torch.nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype under the pipeline's: float16 overflows inside the decoder of SD
    models (black/NaN images), so a VAE with ``force_upcast`` (diffusers' default, SDXL's
    own) stays in float32 there; the fp16-fix VAEs say ``force_upcast: false``. bfloat16
    has float32's range, so it may stay as it is."""
    upcast = bool(getattr(getattr(vae, "config", None), "force_upcast", True))
    return torch.float32 if dtype == torch.float16 and upcast else dtype


def load_pipeline(
    source: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", *,
    config: str | None = None, storage=None,
) -> Pipeline:
    """Load ``builtin:NAME``, a diffusers folder or a single-file checkpoint (local or s3://).

    ``storage``: a job spec's storage settings (endpoint, region) for ``s3://`` sources;
    without it the standard AWS environment variables apply.
    """
    from . import loading

    return loading.load(source, device=device, dtype=dtype, config=config, storage=storage)
