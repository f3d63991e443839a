"""Weighted token chunks -> text embeddings, as the AUTOMATIC1111 web UI makes them.

Each chunk (``prompts.Chunk``, at most ``model_max_length - 2`` tokens) becomes one row of
ids, BOS + tokens + EOS + the tokenizer's pad id (SD 1.x pads with EOS, SD 2.x with "!"),
and goes through the text encoder on its own. Its hidden states are multiplied by the
token weights (1.0 on BOS, EOS and padding) and then scaled so that their mean equals the
unweighted chunk's mean: the web UI's "Original" emphasis at batch size 1 (the web UI
takes that mean over its whole batch, which would make an image depend on its
batch-mates). A prompt's chunks are joined along the sequence: (chunks x 77, D).

Everything here works per encoder: a family with two text encoders (SDXL) chunks with
each tokenizer, encodes and rescales each encoder's hidden states on their own and joins
them afterwards (``conditioning.TextEncoders.encode``).

Texts of different lengths share a UNet batch by padding the shorter contexts and
masking the padded keys out of cross-attention (``pad_contexts``), so each text attends
to exactly its own chunks and an image does not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .prompts import Chunk, chunk_fragments, parse_prompt


def text_chunks(text: str, tokenizer) -> tuple[Chunk, ...]:
    """The prompt in the web UI's syntax, chunked for this tokenizer (LoRA tags dropped:
    they pick adapters, see ``prompts.split_lora_tags``)."""
    return chunk_fragments(parse_prompt(text).fragments, tokenizer.token_ids, tokenizer.comma_id,
                           size=tokenizer.model_max_length - 2)


def chunk_ids(chunks: Sequence[Chunk], tokenizer) -> torch.Tensor:
    """LongTensor (chunks, model_max_length): BOS, the chunk's tokens, EOS, then pad ids."""
    length = tokenizer.model_max_length
    ids = torch.full((len(chunks), length), tokenizer.pad_token_id, dtype=torch.long)
    for i, chunk in enumerate(chunks):
        row = [tokenizer.bos_token_id, *chunk.tokens, tokenizer.eos_token_id]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids


def chunk_weights(chunks: Sequence[Chunk], length: int) -> torch.Tensor:
    """Float (chunks, length): each token's weight, 1.0 on BOS, EOS and padding."""
    weights = torch.ones((len(chunks), length), dtype=torch.float32)
    for i, chunk in enumerate(chunks):
        weights[i, 1 : 1 + len(chunk.weights)] = torch.tensor(chunk.weights, dtype=torch.float32)
    return weights


def emphasize(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Hidden states (chunks, T, D) times the weights (chunks, T), each chunk rescaled to
    its unweighted mean; computed in float32, returned in the input's dtype. A chunk
    whose weights are all 1.0 is returned untouched, bit for bit."""
    out = hidden.clone()
    emphasized = (weights != 1.0).any(dim=1)
    if bool(emphasized.any()):
        z = hidden[emphasized].float()
        weighted = z * weights[emphasized].to(z.device)[..., None]
        scale = z.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True)
        # a weighted mean of exactly zero (weights that cancel out) has no mean to restore:
        # such a chunk keeps its weighted states rather than turning into NaN
        scale = torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))
        out[emphasized] = (weighted * scale).to(hidden.dtype)
    return out


def first_chunks(chunked: Sequence[Sequence[Chunk]]) -> list[int]:
    """Where each text's first chunk is among all the texts' chunks, in order."""
    starts, start = [], 0
    for chunks in chunked:
        starts.append(start)
        start += len(chunks)
    return starts


def per_text(hidden: torch.Tensor, chunked: Sequence[Sequence[Chunk]]) -> list[torch.Tensor]:
    """All the texts' chunk states (N, T, D) -> one (chunks x T, D) per text."""
    return [hidden[start : start + len(chunks)].reshape(-1, hidden.shape[-1])
            for start, chunks in zip(first_chunks(chunked), chunked)]


def pad_contexts(contexts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Contexts (S_i, D) stacked to (B, max S_i, D), zeros after each one's end, and the
    key mask (B, max S_i), True where a key is real; None when all have one length."""
    longest = max(c.shape[0] for c in contexts)
    if all(c.shape[0] == longest for c in contexts):
        return torch.stack(list(contexts)), None
    first = contexts[0]
    stacked = first.new_zeros((len(contexts), longest, first.shape[-1]))
    mask = torch.zeros((len(contexts), longest), dtype=torch.bool, device=first.device)
    for i, c in enumerate(contexts):
        stacked[i, : c.shape[0]] = c
        mask[i, : c.shape[0]] = True
    return stacked, mask
