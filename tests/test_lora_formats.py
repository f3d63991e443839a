"""LoRA formats without an oracle pipeline: LyCORIS LoHa / LoKr against their published
formulas, alpha rules, bad files, and the per-actor adapter cache."""

from __future__ import annotations

import copy
import hashlib
import warnings

import lora_files as lf
import numpy as np
import pytest
import torch
from tiny_sd import diffusers_pipeline, make_reference, ours_from_reference

from ldm_jobs.model import lora
from ldm_jobs.model.lora_cache import AdapterCache

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"
FF = "mid_block.attentions.0.transformer_blocks.0.ff.net.2"


@pytest.fixture(scope="module")
def sd1():
    warnings.filterwarnings("ignore")
    ref = make_reference("sd1")
    return ref, ours_from_reference(ref)


def _randn(g, *shape, scale=0.3):
    return torch.randn(shape, generator=g) * scale


def loha_and_lokr(ref) -> tuple[dict, dict, dict]:
    """A LoHa file, a LoKr file (kohya names) and the deltas their formulas give."""
    g = torch.Generator().manual_seed(5)
    unet = dict(ref.unet.named_modules())
    loha, lokr, expected = {}, {}, {}
    for path, r, alpha in ((TO_Q, 4, 2.0), (CONV, 2, None)):
        w = unet[path].weight
        out, flat = w.shape[0], w[0].numel()
        t = {n: _randn(g, *s) for n, s in (("hada_w1_a", (out, r)), ("hada_w1_b", (r, flat)),
                                            ("hada_w2_a", (out, r)), ("hada_w2_b", (r, flat)))}
        loha.update({f"{lf.kohya_name(path)}.{n}": v for n, v in t.items()})
        scale = 1.0 if alpha is None else alpha / r
        if alpha is not None:
            loha[f"{lf.kohya_name(path)}.alpha"] = torch.tensor(alpha)
        # LoHa (FedPara): dW = (w1_a w1_b) * (w2_a w2_b) * alpha / r
        expected[("loha", path)] = ((t["hada_w1_a"] @ t["hada_w1_b"]) *
                                    (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(w.shape) * scale
    # LoKr: dW = kron(w1, w2); w2 decomposed (w2_a w2_b) with alpha / r, or both whole: 1
    w = unet[FF].weight  # (64, 256)
    w1, w2a, w2b = _randn(g, 4, 8), _randn(g, 16, 2), _randn(g, 2, 32)
    lokr.update({f"{lf.kohya_name(FF)}.lokr_w1": w1, f"{lf.kohya_name(FF)}.lokr_w2_a": w2a,
                 f"{lf.kohya_name(FF)}.lokr_w2_b": w2b,
                 f"{lf.kohya_name(FF)}.alpha": torch.tensor(1.0)})
    expected[("lokr", FF)] = torch.kron(w1, w2a @ w2b) * (1.0 / 2)
    assert expected[("lokr", FF)].shape == w.shape
    w = unet[CONV].weight  # (32, 32, 3, 3)
    c1, c2 = _randn(g, 4, 2), _randn(g, 8, 16, 3, 3)
    lokr.update({f"{lf.kohya_name(CONV)}.lokr_w1": c1, f"{lf.kohya_name(CONV)}.lokr_w2": c2,
                 f"{lf.kohya_name(CONV)}.alpha": torch.tensor(3.0)})  # ignored: both whole
    expected[("lokr", CONV)] = torch.stack([torch.stack([c1[i, j] * c2 for j in range(2)], 1)
                                            for i in range(4)]).reshape(w.shape)
    return loha, lokr, expected


def test_loha_lokr_deltas_follow_the_formulas(sd1, tmp_path):
    ref, ours = sd1
    loha, lokr, expected = loha_and_lokr(ref)
    for kind, state in (("loha", loha), ("lokr", lokr)):
        path = lf.save_safetensors(tmp_path / f"{kind}.safetensors", state)
        adapter = AdapterCache(ours).get(str(path))
        assert adapter.full
        for (k, module), delta in expected.items():
            if k == kind:
                got = adapter.deltas[("unet", module)].delta()
                torch.testing.assert_close(got, delta, rtol=1e-5, atol=1e-6)


def test_loha_rows_grouped_patched_and_restored_bit_for_bit(sd1, tmp_path):
    """A batch mixing a LoHa row, a LoKr row, a low-rank row and a plain row: each image is
    the one diffusers draws with the formula's delta added to its weights; the weights
    are the same bits afterwards, and no UNet call mixed a full-delta row with others."""
    ref, ours = sd1
    loha, lokr, expected = loha_and_lokr(ref)
    p_loha = str(lf.save_safetensors(tmp_path / "loha.safetensors", loha))
    p_lokr = str(lf.save_safetensors(tmp_path / "lokr.safetensors", lokr))
    p_low = str(lf.save_safetensors(tmp_path / "low.safetensors", lf.kohya_state(
        lf.random_peft(ref.unet, lf.UNET_ATTENTION, 4, 7))))
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    batches = []
    hook = ours.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        rows = [{p_loha: 0.8}, {}, {p_low: 1.0}, {p_lokr: 1.0}]
        prompts, seeds = ["a", "b", "c", "d"], [1, 2, 3, 4]
        mine = ours.generate(prompts, seeds=seeds, steps=3, guidance_scale=6.0,
                             sampler="euler", width=32, height=32, loras=rows)
    finally:
        hook.remove()
    after = ours.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(set(batches)) == [2, 4]  # LoHa row, LoKr row alone; the other two together
    for i, kind, weight in ((0, "loha", 0.8), (3, "lokr", 1.0)):
        patched = copy.deepcopy(ref)
        modules = dict(patched.unet.named_modules())
        with torch.no_grad():
            for (k, module), delta in expected.items():
                if k == kind:
                    modules[module].weight += weight * delta
        pipe = diffusers_pipeline(patched, "euler")
        theirs = pipe(prompt=[prompts[i]], num_inference_steps=3, guidance_scale=6.0,
                      generator=[torch.Generator().manual_seed(seeds[i])], height=32, width=32,
                      output_type="np").images[0]
        theirs = (theirs * 255).round().astype(np.int16)
        diff = np.abs(np.asarray(mine[i]).astype(np.int16) - theirs)
        assert diff.max() <= 2 and diff.mean() <= 0.5, (kind, diff.max(), diff.mean())
    plain = ours.generate(prompts, seeds=seeds, steps=3, guidance_scale=6.0, sampler="euler",
                          width=32, height=32)
    assert np.array_equal(np.asarray(plain[1]), np.asarray(mine[1]))
    for i in (0, 2, 3):
        assert np.abs(np.asarray(plain[i]).astype(int) - np.asarray(mine[i])).mean() > 2


def test_alpha_rules(sd1, tmp_path):
    """kohya: alpha / rank per module, no alpha means 1; PEFT: the metadata's lora_alpha,
    alpha_pattern and rsLoRA; no metadata means 1."""
    ref, ours = sd1
    state = lf.kohya_state(lf.random_peft(ref.unet, ("to_q", "to_k"), 4, 1),
                           alphas={"to_q": 1.0, "to_k": None})
    adapter = AdapterCache(ours).get(str(lf.save_safetensors(tmp_path / "k.safetensors", state)))
    assert adapter.deltas[("unet", TO_Q)].scale == 0.25
    assert adapter.deltas[("unet", TO_Q.replace("to_q", "to_k"))].scale == 1.0
    peft = {f"unet.{k}": v for k, v in lf.random_peft(ref.unet, ("to_q", "to_k"), 8, 2).items()}
    import json
    meta = {"unet.r": 8, "unet.lora_alpha": 4, "unet.alpha_pattern": {"attn1.to_k": 16},
            "unet.use_rslora": False}
    for name, metadata, q, k in (
        ("plain", None, 1.0, 1.0),
        ("meta", {"lora_adapter_metadata": json.dumps(meta)}, 0.5, 2.0),
        ("rs", {"lora_adapter_metadata": json.dumps({**meta, "unet.use_rslora": True})},
         4 / 8**0.5, 16 / 8**0.5)):
        path = lf.save_safetensors(tmp_path / f"{name}.safetensors", peft, metadata)
        adapter = AdapterCache(ours).get(str(path))
        assert adapter.deltas[("unet", TO_Q)].scale == pytest.approx(q)
        assert adapter.deltas[("unet", TO_Q.replace("to_q", "to_k"))].scale == pytest.approx(k)
        attn2_k = TO_Q.replace("attn1.to_q", "attn2.to_k")
        assert adapter.deltas[("unet", attn2_k)].scale == pytest.approx(q)


def _bad(ref, tmp_path, case: str) -> tuple[str, str]:
    """A bad LoRA file and the key its error must name."""
    good = lf.kohya_state(lf.random_peft(ref.unet, ("to_q",), 4, 1))
    first = next(iter(good))
    path = tmp_path / f"{case}.safetensors"
    if case == "sdxl":
        key = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"
        state = {key: torch.zeros(4, 32), **good}
    elif case == "shapes":
        key = first.replace(".alpha", ".lora_down.weight").replace(".lora_up.", ".lora_down.")
        state = {**good, key: torch.zeros(4, 999)}
    elif case == "unknown_key":
        key = "some_other_thing.weight"
        state = {**good, key: torch.zeros(2)}
    elif case == "unknown_module":
        key = "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"
        state = {key: torch.zeros(4, 32), **good}
    elif case == "nan":
        key = next(k for k in good if k.endswith("lora_up.weight"))
        state = {**good, key: torch.full_like(good[key], float("nan"))}
    elif case == "dora":
        key = first.split(".")[0] + ".dora_scale"
        state = {**good, key: torch.ones(1, 32)}
    elif case == "missing_up":
        key = next(k for k in good if k.endswith("lora_down.weight"))
        state = {k: v for k, v in good.items() if k != key.replace("lora_down", "lora_up")}
    elif case == "pickle":
        path = tmp_path / "pickled.pt"
        torch.save(good, path)
        return str(path), "pickled"
    elif case == "missing":
        return str(tmp_path / "nowhere.safetensors"), "nowhere.safetensors"
    lf.save_safetensors(path, state)
    return str(path), key


BAD = ["sdxl", "shapes", "unknown_key", "unknown_module", "nan", "dora", "missing_up",
       "pickle", "missing"]


@pytest.mark.parametrize("case", BAD)
def test_bad_lora_is_a_value_error_naming_file_and_key(sd1, tmp_path, case):
    ref, ours = sd1
    path, key = _bad(ref, tmp_path, case)
    with pytest.raises(ValueError) as info:
        ours.generate(["x"], seeds=[1], steps=1, width=32, height=32, loras=[{path: 1.0}])
    message = str(info.value)
    assert path in message and key in message, message
    if case == "sdxl":
        assert "text_encoder_2" in message
    with pytest.raises(lora.LoraError):
        AdapterCache(ours).get(path)


def test_cache_lru_by_bytes_hash_and_s3_fetched_once(sd1, tmp_path, s3_server):
    import boto3

    ref, ours = sd1
    paths = []
    for i in range(3):
        state = lf.kohya_state(lf.random_peft(ref.unet, ("to_q", "to_k"), 4, 20 + i))
        paths.append(str(lf.save_safetensors(tmp_path / f"l{i}.safetensors", state)))
    one = AdapterCache(ours).get(paths[0])
    assert one.sha256 == hashlib.sha256(open(paths[0], "rb").read()).hexdigest()
    assert one.name == "l0"
    cache = AdapterCache(ours, max_bytes=int(one.nbytes * 2.5))
    adapters = [cache.get(p) for p in paths]
    assert cache.get(paths[2]) is adapters[2] and cache.get(paths[1]) is adapters[1]
    assert cache.fetches == 3 and cache.nbytes <= cache.max_bytes
    assert cache.get(paths[0]) is not adapters[0]  # evicted (least recently used), re-read
    assert cache.fetches == 4
    bucket = s3_server.make_bucket()
    boto3.client("s3", endpoint_url=s3_server.endpoint_url).put_object(
        Bucket=bucket, Key="loras/l1.safetensors", Body=open(paths[1], "rb").read())
    uri = f"s3://{bucket}/loras/l1.safetensors"
    remote = AdapterCache(ours, max_bytes=1)
    first = remote.get(uri)
    assert first.sha256 == adapters[1].sha256 and remote.fetches == 1
    remote.get(paths[0])  # evicts the S3 one (one adapter over the budget is kept)
    assert remote.get(uri).sha256 == first.sha256 and remote.fetches == 2  # S3 not again
    with pytest.raises(ValueError, match="not found"):
        remote.get(f"s3://{bucket}/loras/none.safetensors")


@pytest.mark.parametrize("strategy", ["stacked", "gathered"])
def test_per_row_terms_equal_each_row_fused_alone(sd1, tmp_path, monkeypatch, strategy):
    """UNet outputs of a mixed [uncond; cond] batch with per-row terms (both ways of adding
    them) equal each row's own call with its set added to the weights; one shared timestep
    (the time projection's input is then one row for the whole batch) and per-row ones."""
    from ldm_jobs.model import lora_rows

    ref, ours = sd1
    a = lf.save_safetensors(tmp_path / "a.safetensors", lf.kohya_state(
        lf.random_peft(ref.unet, lf.UNET_ATTENTION + lf.UNET_LOCON, 4, 31)))
    b = lf.save_safetensors(tmp_path / "b.safetensors", lf.kohya_state(
        lf.random_peft(ref.unet, lf.UNET_LOCON, 8, 32)))
    sets = lora_rows.resolve(ours, [{}, {str(a): 1.0}, {str(b): 0.5},
                                    {str(a): 1.0, str(b): -0.5}], 4)
    modules = lora.targets(ours)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 77, 32, generator=g)
    monkeypatch.setattr(lora_rows, "STRATEGY", strategy)
    for t in (torch.tensor(500.0), torch.tensor([10.0, 200, 300, 400, 10, 200, 300, 400])):
        with torch.no_grad():
            with lora_rows.per_row(ours.unet, modules["unet"],
                                   [lora_rows._module_terms(s, "unet") for s in sets]):
                mixed = ours.unet(x, t, context)
            for i, adapters in enumerate(sets):
                rows = [i, i + 4]
                with lora_rows.patched(modules, adapters, ("unet",)):
                    alone = ours.unet(x[rows], t if t.ndim == 0 else t[rows], context[rows])
                torch.testing.assert_close(mixed[rows], alone, rtol=1e-4, atol=1e-4)
        plain = ours.unet(x, t, context)
        assert (mixed[1] - plain[1]).abs().mean() > 1e-2  # the LoRA did something


# kohya names in the original (SGM / LDM) UNet layout for the tiny SD 1.x model (2 levels,
# 2 resnets each, attention on level 0 down / level 1 up): one of each kind of block part
# that diffusers' own SGM mapping (the SDXL loader's) places right. It maps a block's
# part 1 to attentions even where that part is an upsampler (`output_blocks_2_1_conv`
# here), so samplers are checked against the checkpoint converter's rules instead.
SGM_NAMES = ["input_blocks_1_1_proj_in", "input_blocks_1_1_transformer_blocks_0_attn2_to_k",
             "input_blocks_2_0_in_layers_2", "input_blocks_4_0_skip_connection",
             "input_blocks_5_0_emb_layers_1", "middle_block_1_transformer_blocks_0_attn1_to_v",
             "middle_block_2_out_layers_3", "output_blocks_3_1_transformer_blocks_0_ff_net_2",
             "output_blocks_5_0_skip_connection", "output_blocks_4_1_proj_out"]


def test_kohya_original_layout_names_match_diffusers(sd1, tmp_path):
    """A kohya file naming UNet modules in the original layout (`input_blocks_4_1_...`,
    as SDXL kohya files do): diffusers maps the names with its SDXL loader's rules; same
    image. Samplers: the same modules as the single-file converter's names."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    ref, ours = sd1
    g = torch.Generator().manual_seed(3)
    modules = lora.targets(ours)
    resolve = lora._Resolver(modules)
    state = {}
    for name in SGM_NAMES:
        component, path = resolve(f"lora_unet_{name}.lora_down.weight"[: -len(".lora_down.weight")])
        w = modules[component][path].weight
        state[f"lora_unet_{name}.lora_down.weight"] = _randn(g, 4, *w.shape[1:])
        up = _randn(g, w.shape[0], 4, scale=1.0)
        state[f"lora_unet_{name}.lora_up.weight"] = up[:, :, None, None] if w.ndim == 4 else up
        state[f"lora_unet_{name}.alpha"] = torch.tensor(4.0)
    path = str(lf.save_safetensors(tmp_path / "sgm.safetensors", state))
    pipe = diffusers_pipeline(ref, "euler")
    from safetensors.torch import load_file

    pipe.load_lora_weights(_maybe_map_sgm_blocks_to_diffusers(load_file(path), ref.unet.config),
                           adapter_name="sgm")
    kw = dict(num_inference_steps=3, guidance_scale=6.0, height=32, width=32, output_type="np")
    theirs = pipe(prompt=["a cat"], generator=[torch.Generator().manual_seed(9)], **kw).images[0]
    mine = ours.generate(["a cat"], seeds=[9], steps=3, guidance_scale=6.0, sampler="euler",
                         width=32, height=32, loras=[{path: 1.0}])[0]
    plain = ours.generate(["a cat"], seeds=[9], steps=3, guidance_scale=6.0, sampler="euler",
                          width=32, height=32)[0]
    diff = np.abs(np.asarray(mine).astype(int) - (theirs * 255).round().astype(int))
    assert diff.max() <= 2 and diff.mean() <= 0.5, (diff.max(), diff.mean())
    assert np.abs(np.asarray(mine).astype(int) - np.asarray(plain)).mean() > 2
    for sgm, ours_name in (("input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
                           ("output_blocks_2_1_conv", "up_blocks.0.upsamplers.0.conv")):
        assert resolve(f"lora_unet_{sgm}") == ("unet", ours_name)
