"""The per-concept files other tools read (customjax.concepts.files), read by those tools: a token
file by diffusers' ``load_textual_inversion``, Custom Diffusion weights by ``load_attn_procs``, a
written pipeline folder by ``StableDiffusionPipeline.from_pretrained`` and by our loader."""

import json
import shutil

import numpy as np
import pytest
from flax import traverse_util

from customjax.concepts.files import (CUSTOM_DIFFUSION_FILE, TOKEN_EMBEDDING, custom_diffusion_state,
                                      load_custom_diffusion, load_token_file, save_token_file, write_pipeline)
from customjax.pipeline import load_stable_diffusion
from customjax.weights.convert import flax_path
from customjax.weights.safetensors_io import load_file, read_metadata, save_file
from customjax.zoo import write_tiny_pipeline

TOKEN = "<cat-toy>"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random SD-1.x diffusers folder and our (pipeline, params) loaded from it."""
    folder = write_tiny_pipeline(tmp_path_factory.mktemp("base"), "sd15", seed=4)
    return folder, *load_stable_diffusion(folder)


def _diffusers(folder):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)


def _flat(params):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _map(params, fn):
    return traverse_util.unflatten_dict({tuple(k.split("/")): fn(k, v) for k, v in _flat(params).items()})


def test_token_file_round_trip_and_diffusers_loads_it(tiny, tmp_path):
    import torch

    folder, pipe, _ = tiny
    d = pipe.text_encoders[0].config.hidden_size
    vec = np.random.default_rng(0).standard_normal(d).astype(np.float32)
    path = tmp_path / "learned_embeds.safetensors"
    save_token_file(path, {TOKEN: vec}, {"concept": "cat toy"})
    got = load_token_file(path)
    assert list(got) == [TOKEN] and got[TOKEN].shape == (1, d) and got[TOKEN].dtype == np.float32
    assert np.array_equal(got[TOKEN][0], vec)
    assert read_metadata(path) == {"format": "pt", "concept": "cat toy"}

    ref = _diffusers(folder)
    n = len(ref.tokenizer)
    ref.load_textual_inversion(str(path))
    token_id = ref.tokenizer.convert_tokens_to_ids(TOKEN)
    assert token_id == n and len(ref.tokenizer) == n + 1
    with torch.no_grad():
        row = ref.text_encoder.get_input_embeddings().weight[token_id].numpy()
    np.testing.assert_array_equal(row, vec)

    # several vectors, and SDXL's layout, returned as is
    save_token_file(tmp_path / "multi.safetensors", {TOKEN: np.ones((3, d), np.float16)})
    assert load_token_file(tmp_path / "multi.safetensors")[TOKEN].shape == (3, d)
    sdxl = {"clip_l": np.ones((2, 768), np.float32), "clip_g": np.zeros((2, 1280), np.float32)}
    save_token_file(tmp_path / "sdxl.safetensors", sdxl)
    assert {k: v.shape for k, v in load_token_file(tmp_path / "sdxl.safetensors").items()} == \
        {"clip_l": (2, 768), "clip_g": (2, 1280)}
    with pytest.raises(ValueError, match="one token per file"):
        save_token_file(tmp_path / "two.safetensors", {"<a>": vec, "<b>": vec})


@pytest.mark.parametrize("content, match", [
    (b"not a safetensors file at all", "not a safetensors file"),
    ({}, "no tensors"),
    ({TOKEN: np.zeros((1, 2, 4), np.float32)}, r"shape \(1, 2, 4\)"),
    ({TOKEN: np.zeros((1, 4), np.int32)}, "dtype int32"),
    ({TOKEN: np.array([[0.0, np.nan]], np.float32)}, "non-finite"),
    ({"clip_l": np.zeros((1, 4), np.float32)}, "SDXL"),
])
def test_token_file_errors_name_the_file(tmp_path, content, match):
    path = tmp_path / "bad.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        save_file(content, path)
    with pytest.raises(ValueError, match=match) as e:
        load_token_file(path)
    assert str(path) in str(e.value)


def test_custom_diffusion_weights_load_in_diffusers_and_back(tiny, tmp_path):
    import torch
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    folder, _, params = tiny
    unet = params["unet"]
    flat = _flat(unet)
    state = custom_diffusion_state(unet)
    ref = _diffusers(folder)
    cross = [k for k in ref.unet.attn_processors if ".attn2." in k]
    self_ = [k for k in ref.unet.attn_processors if ".attn1." in k]
    assert set(state) == ({f"{p}.to_{w}_custom_diffusion.weight" for p in cross for w in "kv"} | set(self_))
    assert all(state[k].shape == (0,) for k in self_)
    save_file(state, tmp_path / CUSTOM_DIFFUSION_FILE)

    # diffusers 0.42 sets the processors only when given the pipeline (without, load_attn_procs parses
    # the file and sets nothing), and only when the file gives one per attention layer: the attn1 markers
    ref.unet.load_attn_procs(tmp_path, weight_name=CUSTOM_DIFFUSION_FILE, _pipeline=ref)
    procs = ref.unet.attn_processors
    assert all(isinstance(procs[k], CustomDiffusionAttnProcessor) for k in cross + self_)
    for p in cross:
        assert procs[p].train_kv and not procs[p].train_q_out
        layer = "/".join(flax_path(p.removesuffix(".processor")))
        for w in "kv":
            got = getattr(procs[p], f"to_{w}_custom_diffusion").weight.detach().numpy()
            np.testing.assert_array_equal(got, flat[f"{layer}/to_{w}/kernel"].T)
    assert not procs[self_[0]].train_kv

    # the strict inverse: round trip, and changed kernels land where they came from
    back = _flat(load_custom_diffusion(load_file(tmp_path / CUSTOM_DIFFUSION_FILE), unet, "cd.safetensors"))
    assert back.keys() == flat.keys() and all(np.array_equal(back[k], flat[k]) for k in flat)
    plus = _flat(load_custom_diffusion({k: v + 1 for k, v in state.items()}, unet, "cd"))
    for k in flat:
        changed = "/attn2/to_k/" in k or "/attn2/to_v/" in k
        assert np.array_equal(plus[k], flat[k] + 1 if changed else flat[k]), k
    kv_only = {k: v for k, v in state.items() if ".attn1." not in k}   # as diffusers' own safetensors file
    back = _flat(load_custom_diffusion(kv_only, unet, "cd"))
    assert all(np.array_equal(back[k], flat[k]) for k in flat)

    key = f"{cross[0]}.to_k_custom_diffusion.weight"
    with pytest.raises(ValueError, match=rf"cd\.safetensors(.|\n)*missing: '{key}'"):
        load_custom_diffusion({k: v for k, v in state.items() if k != key}, unet, "cd.safetensors")
    with pytest.raises(ValueError, match=rf"cd\.safetensors(.|\n)*wrong shape: '{key}'"):
        load_custom_diffusion({**state, key: state[key][:, :-1]}, unet, "cd.safetensors")
    with pytest.raises(ValueError, match="unexpected: 'extra.weight'"):
        load_custom_diffusion({**state, "extra.weight": state[key]}, unet, "cd.safetensors")

    # train_q_out: to_q and to_out.0 too, read by diffusers as a train_q_out processor
    q_state = custom_diffusion_state(unet, train_q_out=True)
    (tmp_path / "q").mkdir()
    save_file(q_state, tmp_path / "q" / CUSTOM_DIFFUSION_FILE)
    ref.unet.load_attn_procs(tmp_path / "q", weight_name=CUSTOM_DIFFUSION_FILE, _pipeline=ref)
    proc = ref.unet.attn_processors[cross[0]]
    assert proc.train_q_out
    with torch.no_grad():
        np.testing.assert_array_equal(proc.to_out_custom_diffusion[0].bias.numpy(),
                                      q_state[f"{cross[0]}.to_out_custom_diffusion.0.bias"])
    back = _flat(load_custom_diffusion(q_state, unet, "q"))
    assert all(np.array_equal(back[k], flat[k]) for k in flat)
    half = {k: v for k, v in q_state.items() if not k.endswith("to_out_custom_diffusion.0.bias")}
    with pytest.raises(ValueError, match="missing: .*to_out_custom_diffusion.0.bias"):
        load_custom_diffusion(half, unet, "q")


def test_write_pipeline_loads_in_ours_and_diffusers(tiny, tmp_path):
    import torch

    folder, pipe, params = tiny
    d = pipe.text_encoders[0].config.hidden_size
    vec = np.random.default_rng(1).standard_normal((1, d)).astype(np.float32)
    changed = _map(params["unet"], lambda k, v: v + 1 if k.endswith("/to_k/kernel") else v)
    n = len(pipe.tokenizers[0])
    out = write_pipeline(folder, tmp_path / "out", unet_params=changed, added_tokens={TOKEN: vec})
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in folder.iterdir())

    ours, ours_p = load_stable_diffusion(out)
    want = _flat(changed)
    got = _flat(ours_p["unet"])
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert ours.tokenizers[0].convert_tokens_to_ids(TOKEN) == n
    assert ours.tokenizers[0](f"a {TOKEN} toy").input_ids[2] == n
    table = _flat(ours_p["text_encoders"][0])["text_model/embeddings/token_embedding/embedding"]
    assert table.shape == (n + 1, d)
    np.testing.assert_array_equal(table[n], vec[0])
    np.testing.assert_array_equal(table[:n], _flat(params["text_encoders"][0])[
        "text_model/embeddings/token_embedding/embedding"])
    assert json.loads((out / "tokenizer" / "added_tokens.json").read_text()) == {TOKEN: n}

    ref = _diffusers(out)
    assert ref.tokenizer.convert_tokens_to_ids(TOKEN) == n
    assert ref.text_encoder.config.vocab_size == n + 1
    with torch.no_grad():
        np.testing.assert_array_equal(ref.text_encoder.get_input_embeddings().weight[n].numpy(), vec[0])
        k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        np.testing.assert_array_equal(ref.unet.state_dict()[k].numpy(),
                                      want["down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel"].T)
    # untouched components are copied byte for byte
    for sub in ("vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json", "tokenizer/vocab.json"):
        assert (out / sub).read_bytes() == (folder / sub).read_bytes()
    assert load_file(out / "text_encoder" / "model.safetensors")[TOKEN_EMBEDDING].shape == (n + 1, d)


def test_write_pipeline_errors(tiny, tmp_path):
    folder, pipe, params = tiny
    d = pipe.text_encoders[0].config.hidden_size
    with pytest.raises(ValueError, match="single-vector tokens only"):
        write_pipeline(folder, tmp_path / "a", added_tokens={TOKEN: np.zeros((2, d), np.float32)})
    with pytest.raises(ValueError, match=r"\(32,\)"):
        write_pipeline(folder, tmp_path / "a", added_tokens={TOKEN: np.zeros(d + 1, np.float32)})
    with pytest.raises(ValueError, match="already in the vocabulary"):
        write_pipeline(folder, tmp_path / "a", added_tokens={"a</w>": np.zeros(d, np.float32)})
    flat = _flat(params["unet"])
    dropped = next(k for k in flat if k.endswith("/attn2/to_k/kernel"))
    fewer = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items() if k != dropped})
    with pytest.raises(ValueError, match=r"missing \['down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"):
        write_pipeline(folder, tmp_path / "a", unet_params=fewer)
    assert not (tmp_path / "a").exists()                     # nothing written before the checks pass

    sdxl = shutil.copytree(folder, tmp_path / "sdxl")
    index = json.loads((sdxl / "model_index.json").read_text())
    (sdxl / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": ["transformers", "CLIPTextModel"]}))
    with pytest.raises(ValueError, match="SDXL"):
        write_pipeline(sdxl, tmp_path / "a", added_tokens={TOKEN: np.zeros(d, np.float32)})
    pickled = shutil.copytree(folder, tmp_path / "pickled")
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").rename(pickled / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="pickles"):
        write_pipeline(pickled, tmp_path / "a", unet_params=params["unet"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError):
        write_pipeline(folder, tmp_path / "full")
