"""CLIPTextModel against transformers' CLIPTextModel on tiny random weights.

transformers' eager attention (explicit causal mask and softmax) is the oracle, so the
comparison also checks our scaled_dot_product_attention(is_causal=True) path.
"""

from __future__ import annotations

import pytest
import torch

from ldm_jobs.model.configs import ConfigError, TextConfig
from ldm_jobs.model.text_encoder import CLIPTextModel
from ldm_jobs.model.tokenizer import DATA_DIR, CLIPTokenizer

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "A castle on a hill, highly detailed, 8k, trending on artstation, (masterpiece:1.2)",
    "word " * 100,  # truncated: EOS at position 76
    "东京タワー at night \U0001f680, café",
]
TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4)


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint keys (``text_model.``...); transformers 5 drops that level in memory."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in model.state_dict().items()}


def make_pair(hidden_act: str, seed: int = 0, **overrides) -> tuple[torch.nn.Module, CLIPTextModel]:
    fields = {**TINY, "hidden_act": hidden_act, **overrides}
    config = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **fields)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    reference = transformers.CLIPTextModel(config).eval()
    # Larger-than-default weights, so attention is far from uniform and errors show.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            scale = 0.5 if "layer_norm" in name else 0.2
            base = 1.0 if "layer_norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=generator))
    ours = CLIPTextModel(TextConfig(**fields)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)  # as transformers gives it
    return reference, ours


def compare(reference, ours, input_ids: torch.Tensor, label: str) -> tuple[float, float]:
    with torch.no_grad():
        expected = reference(input_ids).last_hidden_state
        got = ours(input_ids)
    assert got.shape == expected.shape == (*input_ids.shape, reference.config.hidden_size)
    assert got.dtype == torch.float32
    max_abs = (got - expected).abs().max().item()
    rel = max_abs / expected.abs().max().item()
    print(f"\n{label}: max abs err {max_abs:.3e}, max rel err {rel:.3e}")
    assert rel <= 1e-4, f"{label}: relative error {rel:.3e} > 1e-4"
    return max_abs, rel


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_matches_transformers_on_tokenized_prompts(hidden_act):
    reference, ours = make_pair(hidden_act)
    input_ids = CLIPTokenizer.default()(PROMPTS)  # (5, 77), padded with EOS
    compare(reference, ours, input_ids, f"CLIPTextModel {hidden_act}")


def test_state_dict_keys_are_transformers_keys():
    reference, ours = make_pair("quick_gelu")
    keys = set(ours.state_dict())
    assert keys == set(hf_state_dict(reference))
    assert not any("position_ids" in k for k in keys)
    expected = {
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.encoder.layers.2.self_attn.out_proj.bias",
        "text_model.encoder.layers.0.mlp.fc1.weight",
        "text_model.encoder.layers.1.layer_norm2.weight",
        "text_model.final_layer_norm.bias",
    }
    assert expected <= keys


def test_loads_transformers_state_dicts_as_they_are():
    """transformers 5's in-memory keys lack ``text_model.``; transformers 4's carry a
    ``position_ids`` buffer. Both load strictly; anything else is still refused."""
    reference, ours = make_pair("quick_gelu")
    ids = CLIPTokenizer.default()(PROMPTS[:2])
    with torch.no_grad():
        expected = ours(ids)
    plain = {k.removeprefix("text_model."): v for k, v in ours.state_dict().items()}
    fresh = CLIPTextModel(TextConfig(**{**TINY, "hidden_act": "quick_gelu"})).eval()
    fresh.load_state_dict({**plain, "embeddings.position_ids": torch.arange(77)[None]}, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), expected, rtol=0, atol=0)
    fresh.load_state_dict({**ours.state_dict(), "text_model.embeddings.position_ids": torch.arange(77)[None]})
    assert not any("position_ids" in k for k in fresh.state_dict())
    # as a submodule, under a prefix
    wrapper = torch.nn.ModuleDict({"te": CLIPTextModel(TextConfig(**TINY))})
    wrapper.load_state_dict({f"te.{k}": v for k, v in plain.items()}, strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict({**ours.state_dict(), "text_model.extra.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in plain.items() if "final_layer_norm" not in k})


def test_eos_padding_and_zero_padding(tmp_path):
    """SD 1.x pads with EOS (49407), SD 2.x with "!" (0): both are just ids; the causal
    mask keeps every position up to EOS independent of the padding."""
    reference, ours = make_pair("gelu", seed=1)
    eos_padded = CLIPTokenizer.default()(PROMPTS)
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((DATA_DIR / name).read_bytes())
    (folder / "tokenizer_config.json").write_text('{"pad_token": "!", "model_max_length": 77}')
    zero_padded = CLIPTokenizer.from_folder(folder)(PROMPTS)
    assert (zero_padded == 0).any() and (eos_padded == 49407).sum() > len(PROMPTS)
    for ids, label in ((eos_padded, "EOS padding"), (zero_padded, "0 padding")):
        compare(reference, ours, ids, label)
    with torch.no_grad():
        a, b = ours(eos_padded), ours(zero_padded)
    for i, row in enumerate(eos_padded):
        eos_at = int((row == 49407).nonzero()[0])
        torch.testing.assert_close(a[i, : eos_at + 1], b[i, : eos_at + 1], rtol=0, atol=0)


def test_shorter_sequences_and_int32_ids():
    reference, ours = make_pair("quick_gelu", seed=2)
    ids = torch.randint(0, 49408, (3, 12), generator=torch.Generator().manual_seed(0))
    compare(reference, ours, ids, "T=12")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids.int()), ours(ids), rtol=0, atol=0)


def test_bad_input_is_refused():
    ours = CLIPTextModel(TextConfig(**TINY))
    with pytest.raises(ValueError, match="at most 77"):
        ours(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        ours(torch.zeros(77, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        ours(torch.zeros(1, 77))
    with pytest.raises(ConfigError, match="hidden_act"):
        CLIPTextModel(TextConfig(**{**TINY, "hidden_act": "relu"}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_close(dtype):
    _, ours = make_pair("quick_gelu", seed=3)
    ids = CLIPTokenizer.default()(PROMPTS)
    with torch.no_grad():
        expected = ours(ids)
        got = ours.to(dtype)(ids)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert (got.float() - expected).abs().max() < 0.1 * expected.abs().max()
