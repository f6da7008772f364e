"""Checkpoint reading: safetensors without torch, sharded folders, and strict errors."""

import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from customjax.models.unet import UNET
from customjax.weights import safetensors_io
from customjax.weights.convert import WeightMismatchError, convert, flax_path, to_torch_state
from customjax.weights.folder import WeightsNotFoundError, load_state_dict, weight_files
from customjax.weights.loaders import load_pretrained, param_shapes

TINY = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
            cross_attention_dim=8, attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("unet")
    TorchUNet(**TINY).save_pretrained(folder)
    return folder


def test_reader_matches_safetensors_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": np.arange(5, dtype=np.int64),
               "c": rng.standard_normal((2, 2)).astype(np.float16), "empty": np.zeros((0, 3), np.float32)}
    safetensors.numpy.save_file(tensors, tmp_path / "x.safetensors")
    got = safetensors_io.load_file(tmp_path / "x.safetensors")
    assert got.keys() == tensors.keys()
    for k in tensors:
        assert got[k].dtype == tensors[k].dtype and np.array_equal(got[k], tensors[k])
    # bf16 through torch's writer, and our writer read back by the library
    t = torch.randn(4, 3).to(torch.bfloat16)
    from safetensors.torch import save_file
    save_file({"w": t}, tmp_path / "bf16.safetensors")
    w = safetensors_io.load_file(tmp_path / "bf16.safetensors")["w"]
    assert w.dtype == ml_dtypes.bfloat16
    assert np.array_equal(w.astype(np.float32), t.float().numpy())
    safetensors_io.save_file(tensors, tmp_path / "ours.safetensors")
    back = safetensors.numpy.load_file(tmp_path / "ours.safetensors")
    assert all(np.array_equal(back[k], tensors[k]) for k in tensors)


def test_corrupt_file_is_named(tmp_path):
    bad = tmp_path / "diffusion_pytorch_model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(safetensors_io.SafetensorsError, match=str(bad)):
        safetensors_io.load_file(bad)


def test_sharded_folder_loads_like_single(tiny_folder, tmp_path):
    state = load_state_dict(tiny_folder)
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        safetensors_io.save_file({k: np.asarray(state[k]) for k in ks}, tmp_path / name)
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    (tmp_path / "config.json").write_text((tiny_folder / "config.json").read_text())
    assert len(weight_files(tmp_path)) == 2
    _, params_a, _ = load_pretrained(tiny_folder, UNET)
    _, params_b, _ = load_pretrained(tmp_path, UNET)
    import jax
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params_a),
                                                    jax.tree_util.tree_leaves(params_b)))


def test_missing_extra_and_wrong_shape_are_all_reported(tiny_folder, tmp_path):
    state = {k: np.asarray(v) for k, v in load_state_dict(tiny_folder).items()}
    del state["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    state["up_blocks.1.resnets.0.extra_scale"] = np.ones(3, np.float32)
    state["conv_in.weight"] = np.zeros((8, 4, 5, 5), np.float32)
    safetensors_io.save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((tiny_folder / "config.json").read_text())
    with pytest.raises(WeightMismatchError) as err:
        load_pretrained(tmp_path, UNET)
    e = err.value
    msg = str(e)
    print("\n" + msg)
    assert e.missing == ["down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel"]
    assert e.unexpected == ["up_blocks.1.resnets.0.extra_scale"]
    assert e.mismatched == [("conv_in.weight", "conv_in/kernel", (8, 4, 3, 3), (8, 4, 5, 5))]
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in msg  # the hint
    assert "expected (8, 4, 3, 3), found (8, 4, 5, 5)" in msg
    assert str(tmp_path) in msg


def test_folder_errors(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="not a directory"):
        weight_files(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsNotFoundError, match="no weights found"):
        weight_files(tmp_path)
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors"}}, f)
    with pytest.raises(WeightsNotFoundError, match="shard files missing"):
        weight_files(tmp_path)


def test_variant_only_folder_and_bin_with_weights_only(tiny_folder, tmp_path):
    state = load_state_dict(tiny_folder)
    safetensors_io.save_file({k: np.asarray(v, np.float16) for k, v in state.items()},
                             tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    (tmp_path / "config.json").write_text((tiny_folder / "config.json").read_text())
    _, params, _ = load_pretrained(tmp_path, UNET)
    assert params["conv_in"]["kernel"].dtype == np.float32
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
               bin_dir / "diffusion_pytorch_model.bin")
    (bin_dir / "config.json").write_text((tiny_folder / "config.json").read_text())
    load_pretrained(bin_dir, UNET)


def test_export_roundtrip(tiny_folder):
    state = load_state_dict(tiny_folder)
    params = convert(state, param_shapes(UNET, UNET.config_from_dict(json.loads(
        (tiny_folder / "config.json").read_text()))))
    back = to_torch_state(params)
    assert sorted(back) == sorted(state)
    assert all(np.array_equal(back[k], state[k]) for k in state)
    assert flax_path("time_embedding.linear_1.weight") == ("time_embedding", "linear_1", "weight")
