"""CLIP's text transformer, the text encoder of Stable Diffusion 1.x / 2.x.

Module names follow transformers' ``CLIPTextModel`` so its state dict (and diffusers'
``text_encoder/``) loads key for key: ``text_model.embeddings.token_embedding.weight``,
``text_model.encoder.layers.{i}.self_attn.q_proj.weight``, ... Position ids are made at
run time rather than kept as a buffer, so the state dict holds only the weights;
``load_state_dict`` also takes transformers 5's in-memory keys (no ``text_model.``) and
ignores a ``position_ids`` buffer.

The output is the last hidden state after the final layer norm, the tensor diffusers
feeds to the UNet's cross-attention. SD 2.x uses the penultimate layer of OpenCLIP's
tower, followed by the final layer norm: a config with one layer fewer gives exactly that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import TextConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU (transformers' ``quick_gelu``)."""
    return x * torch.sigmoid(1.702 * x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The exact (erf) GELU, as transformers' ``gelu``."""
    return F.gelu(x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        dim = config.hidden_size
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (
            proj(x).view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )  # (B, heads, T, head_dim)
        # Each token sees itself and the tokens before it, never the padding after EOS;
        # so the hidden states up to EOS do not depend on the pad token.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class CLIPMLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last layer's output, and the output of layer ``keep`` (0-based) if asked."""
        kept = None
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == keep:
                kept = x
        return x, kept


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, D)


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids))[0])


def _accept_transformers5_keys(module, state_dict, prefix, *args) -> None:
    """Let ``load_state_dict`` take a transformers model's state dict as it is.

    transformers 5 keeps ``embeddings``/``encoder``/``final_layer_norm`` at the top of
    its CLIPTextModel (its checkpoints still use ``text_model.``), and transformers 4
    carries a ``position_ids`` buffer, which we derive instead.
    """
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest in ("position_ids", "embeddings.position_ids", "text_model.embeddings.position_ids"):
            del state_dict[key]
        elif rest.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            state_dict[f"{prefix}text_model.{rest}"] = state_dict.pop(key)


class CLIPTextModel(nn.Module):
    """Token ids ``LongTensor[B, T]`` -> last hidden state ``FloatTensor[B, T, hidden_size]``."""

    def __init__(self, config: TextConfig):
        super().__init__()
        config.check()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.register_load_state_dict_pre_hook(_accept_transformers5_keys)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.final_layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.final_layer_norm.weight.device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._check(input_ids)
        return self.text_model(input_ids)

    def _check(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        T, max_t = input_ids.shape[1], self.config.max_position_embeddings
        if T > max_t:
            raise ValueError(f"input_ids has {T} tokens; the text encoder takes at most {max_t}")

    def penultimate(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states of the second-to-last layer, with no final norm: what SDXL reads;
        the last hidden state after the final norm), in one pass."""
        self._check(input_ids)
        model = self.text_model
        last, kept = model.encoder(model.embeddings(input_ids), keep=self.config.num_hidden_layers - 2)
        return kept, model.final_layer_norm(last)

    def pooled_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where each row's pooled embedding is read, as transformers does: the first
        ``eos_token_id``, or the highest id for configs with the legacy ``eos_token_id: 2``
        (SDXL's text_encoder_2 among them)."""
        if self.config.eos_token_id == 2:
            return input_ids.argmax(dim=-1)
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)


class CLIPTextModelWithProjection(CLIPTextModel):
    """CLIPTextModel plus ``text_projection`` (no bias): SDXL's second text encoder, whose
    pooled, projected embedding conditions the UNet's added embedding."""

    def __init__(self, config: TextConfig):
        super().__init__(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def penultimate_and_pooled(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate hidden states (B, T, D), projected pooled embedding (B, P))."""
        hidden, last = self.penultimate(input_ids)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        pooled = last[rows, self.pooled_index(input_ids).to(last.device)]
        return hidden, self.text_projection(pooled)
