"""LoRA per row: rows of one batch may each use their own adapters and weights.

Each row's image equals the one diffusers draws for that row alone with its adapters
loaded and set (unfused): ``W x + sum_a weight_a * scale_a * up_a(down_a(x))``.

- Low-rank adapters in a mixed batch: the base layer runs once for the whole batch, and a
  forward hook adds each row's own low-rank term. A row's adapters are stacked along the
  rank (weights and scales folded into ``up``, rows without one padded with zeros), so
  one batched product pair serves every row whatever the mix (Punica's idea, in plain
  bmm / grouped convolution). CFG's ``[uncond; cond]`` halves both get the row's term.
- A batch whose rows all share one adapter set: the deltas are added to the weights for
  the call and the weights restored bit for bit (a saved copy, not a subtraction).
- Full-rank adapters (LoHa, LoKr): rows are grouped by their full-rank set, the weights
  patched for the group and restored; groups never share a UNet call.
- Text encoders: texts are encoded in groups of one adapter set each (patched), so a
  row's prompt and negative prompt both see the row's text-encoder adapters; the text
  cache keys include that set.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .lora import Adapter, Delta, LoraError, LowRank, targets
from .lora_cache import cache_of

AdapterSet = tuple[tuple[Adapter, float], ...]  # sorted by sha256; weights non-zero


def resolve(pipeline, loras: Sequence[Mapping[str, float]] | None, n: int) -> list[AdapterSet] | None:
    """``generate``'s ``loras`` (one ``{source: weight}`` per prompt) -> adapter sets."""
    if loras is None:
        return None
    if isinstance(loras, Mapping) or not isinstance(loras, Sequence):
        raise TypeError("loras must be a list with one {source: weight} mapping per prompt")
    if len(loras) != n:
        raise ValueError(f"loras has {len(loras)} entries for {n} prompts")
    cache = cache_of(pipeline)
    sets = []
    for i, row in enumerate(loras):
        if row is None:
            row = {}
        if not isinstance(row, Mapping):
            raise TypeError(f"loras[{i}] is {type(row).__name__}, not a {{source: weight}} mapping")
        weights: dict[str, tuple[Adapter, float]] = {}
        for source, weight in row.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                    or not math.isfinite(float(weight)):
                raise ValueError(f"loras[{i}][{source!r}]: weight {weight!r} is not a finite number")
            adapter = cache.get(source)
            # the same bytes named twice act as one adapter at the summed weight
            previous = weights.get(adapter.sha256, (adapter, 0.0))[1]
            weights[adapter.sha256] = (adapter, previous + float(weight))
        sets.append(tuple(sorted(((a, w) for a, w in weights.values() if w != 0.0),
                                 key=lambda item: item[0].sha256)))
    return sets


def set_key(adapters: AdapterSet, component: str | None = None) -> tuple:
    """Hashable identity of a set (or of its part that touches ``component``'s prefix)."""
    return tuple((a.sha256, w) for a, w in adapters
                 if component is None or any(c.startswith(component) for c in a.components()))


# ---------------------------------------------------------------- weight patching
@contextlib.contextmanager
def patched(modules: dict[str, dict[str, nn.Module]], adapters: AdapterSet,
            components: Sequence[str]) -> Iterator[None]:
    """``components``' weights with the set's deltas added, restored exactly on exit."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            sums: dict[tuple[str, str], torch.Tensor] = {}
            for adapter, weight in adapters:
                for key, delta in adapter.deltas.items():
                    if key[0] in components:
                        term = delta.delta().to(modules[key[0]][key[1]].weight.device) * weight
                        sums[key] = sums[key] + term if key in sums else term
            for (component, name), delta in sums.items():
                param = modules[component][name].weight
                saved.append((param, param.detach().clone()))
                param.copy_((param.float() + delta).to(param.dtype))
        yield
    finally:
        with torch.no_grad():
            for param, original in saved:
                param.copy_(original)


# ------------------------------------------------------------------ per-row terms
class _RowTerms:
    """One module's per-row low-rank terms, stacked: ``down`` (B, R, in[, kh, kw]) and
    ``up`` (B, out, R) with each row's weight * scale folded in."""

    def __init__(self, module: nn.Module, rows: list[list[tuple[LowRank, float]]],
                 batch: dict[str, int]):
        self.batch = batch  # the UNet call's batch size (B, or 2B with guidance)
        rank = max(sum(d.rank for d, _ in row) for row in rows)
        weight = module.weight
        B, out = len(rows), weight.shape[0]
        down = weight.new_zeros((B, rank, *weight.shape[1:]))
        up = weight.new_zeros((B, out, rank))
        for i, row in enumerate(rows):
            offset = 0
            for delta, w in row:
                down[i, offset : offset + delta.rank] = delta.down
                up[i, :, offset : offset + delta.rank] = delta.up * (w * delta.scale)
                offset += delta.rank
        self.rows = B
        self._stacks = {B: (down, up)}

    def stacks(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n not in self._stacks:
            if n % self.rows:
                raise RuntimeError(f"a LoRA layer got a batch of {n} for {self.rows} rows")
            down, up = self._stacks[self.rows]
            self._stacks[n] = (down.repeat(n // self.rows, *(1,) * (down.ndim - 1)),
                               up.repeat(n // self.rows, 1, 1))  # CFG: [uncond; cond]
        return self._stacks[n]

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        n = x.shape[0]
        if n == 1 and self.batch["n"] > 1:  # one input shared by the batch (a single
            n = self.batch["n"]  # timestep's embedding): each row gets its own term
            x, out = x.expand(n, *x.shape[1:]), out.expand(n, *out.shape[1:])
        down, up = self.stacks(n)
        if isinstance(module, nn.Conv2d):
            rank = down.shape[1]
            h = F.conv2d(x.reshape(1, -1, *x.shape[2:]), down.reshape(n * rank, *down.shape[2:]),
                         None, module.stride, module.padding, module.dilation, groups=n)
            h = torch.bmm(up, h.reshape(n, rank, -1))  # (n, out, H'W')
            return out + h.reshape(out.shape)
        h = torch.bmm(x.reshape(n, -1, x.shape[-1]), down.transpose(1, 2))  # (n, L, R)
        return out + torch.bmm(h, up.transpose(1, 2)).reshape(out.shape)


class _GatheredTerms:
    """The PEFT-style alternative to ``_RowTerms``: per adapter, gather the rows using it,
    run its two small layers on them, scatter-add the result. Kept to measure against
    (benchmarks/lora.py); ``STRATEGY`` picks the one ``per_row`` installs."""

    def __init__(self, module: nn.Module, rows: list[list[tuple[LowRank, float]]],
                 batch: dict[str, int]):
        self.batch, self.rows = batch, len(rows)
        users: dict[int, tuple[LowRank, list[int], list[float]]] = {}
        for i, row in enumerate(rows):
            for delta, w in row:
                entry = users.setdefault(id(delta), (delta, [], []))
                entry[1].append(i)
                entry[2].append(w * delta.scale)
        device = module.weight.device
        self.terms = [(d.down, d.up, torch.tensor(r, device=device),
                       torch.tensor(s, device=device, dtype=module.weight.dtype))
                      for d, r, s in users.values()]

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        n = x.shape[0]
        if n == 1 and self.batch["n"] > 1:
            n = self.batch["n"]
            x, out = x.expand(n, *x.shape[1:]), out.expand(n, *out.shape[1:])
        copies = n // self.rows  # CFG: [uncond; cond]
        for down, up, rows, scales in self.terms:
            index = torch.cat([rows + k * self.rows for k in range(copies)])
            picked = x.index_select(0, index)
            if isinstance(module, nn.Conv2d):
                h = F.conv2d(picked, down, None, module.stride, module.padding, module.dilation)
                h = F.conv2d(h, up[:, :, None, None])
            else:
                h = F.linear(F.linear(picked, down), up)
            out = out.index_add(0, index, h * scales.repeat(copies).view(-1, *(1,) * (h.ndim - 1)))
        return out


# how per_row adds the rows' terms: measured in benchmarks/lora.py (RESULTS.md)
STRATEGIES = {"stacked": _RowTerms, "gathered": _GatheredTerms}
STRATEGY = "stacked"


@contextlib.contextmanager
def per_row(model: nn.Module, modules: dict[str, nn.Module],
            rows: list[dict[str, list[tuple[Delta, float]]]]) -> Iterator[None]:
    """Forward hooks adding each row's low-rank terms to ``modules`` (path -> module) of
    ``model``; ``rows[i]``: module path -> [(delta, weight)] of row i."""
    names = sorted({name for row in rows for name in row})
    batch = {"n": len(rows)}

    def note_batch(module: nn.Module, args: tuple) -> None:
        batch["n"] = args[0].shape[0]

    handles = [model.register_forward_pre_hook(note_batch)] if names else []
    try:
        for name in names:
            terms = STRATEGIES[STRATEGY](modules[name], [row.get(name, []) for row in rows], batch)
            handles.append(modules[name].register_forward_hook(terms))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _module_terms(adapters: AdapterSet, component: str) -> dict[str, list[tuple[Delta, float]]]:
    terms: dict[str, list[tuple[Delta, float]]] = {}
    for adapter, weight in adapters:
        for (c, name), delta in adapter.deltas.items():
            if c == component:
                terms.setdefault(name, []).append((delta, weight))
    return terms


# ------------------------------------------------------------------ the pipeline side
@contextlib.contextmanager
def _eager(pipeline) -> Iterator[None]:
    """Run the UNet uncompiled: a compiled graph is specialised to the model without
    hooks, and patched weights must not be baked into one."""
    compiled, pipeline._compiled = getattr(pipeline, "_compiled", None), None
    try:
        yield
    finally:
        pipeline._compiled = compiled


def _groups(keys: Sequence) -> dict:
    """key -> the indices holding it, in first-seen order."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def denoise(pipeline, request) -> torch.Tensor:
    """``pipeline.denoise`` for a request whose rows carry adapter sets (``request.loras``)."""
    from .generate_args import with_rows

    sets = request.loras
    modules = targets(pipeline)
    full = [tuple((a, w) for a, w in s if a.full) for s in sets]
    parts: list[tuple[list[int], torch.Tensor]] = []
    for rows in _groups([set_key(s) for s in full]).values():
        group = with_rows(request, lambda values, rows=rows: [values[i] for i in rows])
        low = [tuple((a, w) for a, w in sets[i] if not a.full) for i in rows]
        shared = all(s == low[0] for s in low)
        fused = full[rows[0]] + (low[0] if shared else ())
        row_terms = [] if shared else [_module_terms(s, "unet") for s in low]
        with _eager(pipeline), patched(modules, fused, ("unet",)), \
                per_row(pipeline.unet, modules["unet"], row_terms):
            parts.append((rows, pipeline.denoise(group)))
    return _in_order(parts, len(sets))


def _in_order(parts: list[tuple[list[int], torch.Tensor]], n: int) -> torch.Tensor:
    """Groups' outputs put back in row order."""
    if len(parts) == 1:
        return parts[0][1]
    first = parts[0][1]
    out = first.new_empty((n, *first.shape[1:]))
    for rows, part in parts:
        out[torch.tensor(rows, device=out.device)] = part
    return out


def encode_rows(pipeline, texts: list[str], sets: Sequence[AdapterSet | None],
                encode: Callable[[list[str]], list]) -> list:
    """``encode(texts)`` (one encoding per text) where text i is read with the
    text-encoder part of ``sets[i]``: each distinct set's texts are encoded together, the
    encoders patched, and the cache keyed by that set."""
    if len(sets) != len(texts):
        raise LoraError(f"{len(sets)} adapter sets for {len(texts)} texts")
    modules = targets(pipeline)
    encoders = tuple(c for c in modules if c.startswith("text_encoder"))
    keyed = [set_key(s or (), "text_encoder") for s in sets]
    by_sha = {a.sha256: (a, w) for s in sets if s for a, w in s}
    rows_out: list = [None] * len(texts)
    for key, rows in _groups(keyed).items():
        subset = tuple((by_sha[sha][0], w) for sha, w in key)
        before = pipeline.text_adapter_key
        try:
            pipeline.text_adapter_key = key
            with patched(modules, subset, encoders):
                for i, row in zip(rows, encode([texts[i] for i in rows])):
                    rows_out[i] = row
        finally:
            pipeline.text_adapter_key = before
    return rows_out
