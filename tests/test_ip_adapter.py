"""IP-Adapter as a registered method: the decoupled cross-attention against diffusers' own
IP-Adapter processors (our export loaded by diffusers' loader), the released file formats read
strictly, the released key names at SD-1.5's real size, and training then sampling through the one
trainer and the one sampler."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import cpu_env, max_abs

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from customjax.control.spec import Control, ExtraTokens  # noqa: E402
from customjax.methods import ip_adapter  # noqa: E402
from customjax.methods.build import build, load_adapter, save_adapter, trainable_tree  # noqa: E402
from customjax.weights.convert import WeightMismatchError  # noqa: E402
from customjax.weights.safetensors_io import load_file, read_metadata, save_file  # noqa: E402

import train_probe  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The ``tiny`` IP-Adapter on a tiny SD-1.5 folder, its adapter perturbed so every tensor matters."""
    from customjax.methods.build import with_trainable
    from customjax.zoo import write_tiny_pipeline

    folder = tmp_path_factory.mktemp("sd15")
    write_tiny_pipeline(folder, "sd15")
    c = train_probe.tiny_config("ip_adapter")
    c.model.path = str(folder)
    built = build(c)
    rng = np.random.default_rng(0)
    tree = jax.tree_util.tree_map(lambda a: np.asarray(a) + 0.2 * rng.standard_normal(a.shape).astype(np.float32),
                                  trainable_tree(built))
    return folder, c, with_trainable(built, tree)


def _nested(flat: dict) -> dict:
    """Released .bin layout: {"image_proj": {...}, "ip_adapter": {...}} of torch tensors."""
    out = {"image_proj": {}, "ip_adapter": {}}
    for k, v in flat.items():
        group, rest = k.split(".", 1)
        out[group][rest] = torch.from_numpy(np.array(v))      # a writable copy of the memory map
    return out


def test_decoupled_cross_attention_matches_diffusers(tiny):
    """Our export, loaded by diffusers' IP-Adapter loader into its UNet, gives the same noise
    prediction as our UNet with the ``ip`` tokens (scale 1), within TOL."""
    folder, _, built = tiny
    m = ip_adapter.METHOD
    state = m.state_dict(trainable_tree(built))
    layers = len(ip_adapter.cross_attention_order(built.params["unet"]))
    assert layers == 4 and {k for k in state if k.startswith("ip_adapter.")} == {
        f"ip_adapter.{n}.to_{kv}_ip.weight" for n in range(1, 2 * layers, 2) for kv in "kv"}
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    unet._load_ip_adapter_weights([_nested(state)])
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, 32)).astype(np.float32)
    dim = built.image_side.clip.config.projection_dim
    embeds = rng.standard_normal((2, dim)).astype(np.float32)
    with torch.no_grad():
        want = unet(torch.from_numpy(x).permute(0, 3, 1, 2), 500, torch.from_numpy(ctx),
                    added_cond_kwargs={"image_embeds": [torch.from_numpy(embeds)[:, None]]}).sample
    want = want.permute(0, 2, 3, 1).numpy()
    p = built.params
    tokens = built.image_side.proj.apply({"params": p["image"]["image_proj"]}, jnp.asarray(embeds))
    got = built.unet.apply({"params": p["unet"]}, x, jnp.asarray(500), ctx,
                           control=Control({"ip": ExtraTokens(tokens[:, None])}))
    assert max_abs(got, want) < TOL
    # the image tokens change the output (the K/V set is wired in)
    plain = built.unet.apply({"params": p["unet"]}, x, jnp.asarray(500), ctx,
                             control=Control({"ip": ExtraTokens(tokens[:, None], scale=0.0)}))
    assert max_abs(got, plain) > 1e-2


def test_released_files_read_strictly(tiny, tmp_path):
    _, _, built = tiny
    m = ip_adapter.METHOD
    state = m.state_dict(trainable_tree(built))
    want = jax.tree_util.tree_leaves(trainable_tree(built))
    torch.save(_nested(state), tmp_path / "ip-adapter_sd15.bin")
    save_file(state, tmp_path / "ip-adapter_sd15.safetensors")
    for f in ("ip-adapter_sd15.bin", "ip-adapter_sd15.safetensors"):
        got = jax.tree_util.tree_leaves(trainable_tree(load_adapter(built, tmp_path / f)))
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    # a missing tensor, a wrong shape, an extra key, the Plus variant: each named
    bad = dict(state)
    bad.pop("ip_adapter.3.to_v_ip.weight")
    save_file(bad, tmp_path / "missing.safetensors")
    with pytest.raises(WeightMismatchError, match=r"1 missing.*\n.*to_v_ip"):
        load_adapter(built, tmp_path / "missing.safetensors")
    bad = dict(state, **{"image_proj.proj.weight": np.zeros((8, 8), np.float32), "ip_adapter.33.to_k_ip.weight":
                         np.zeros((4, 4), np.float32)})
    save_file(bad, tmp_path / "shape.safetensors")
    with pytest.raises(WeightMismatchError, match=r"1 unexpected, 1 wrong shape") as e:
        load_adapter(built, tmp_path / "shape.safetensors")
    assert "ip_adapter.33.to_k_ip.weight" in str(e.value) and "image_proj.proj.weight" in str(e.value)
    save_file(dict(state, **{"image_proj.latents": np.zeros((1, 16, 32), np.float32)}), tmp_path / "plus.safetensors")
    with pytest.raises(ValueError, match="Plus"):
        load_adapter(built, tmp_path / "plus.safetensors")


def test_adapter_of_another_method_is_named(tiny, tmp_path):
    _, _, built = tiny
    pp = build(train_probe.tiny_config("realcustompp"))
    save_adapter(pp, tmp_path / "pp")
    with pytest.raises(ValueError, match="an adapter of method 'realcustompp'.*configs/realcustompp.py"):
        load_adapter(built, tmp_path / "pp")


def test_released_names_at_sd15_real_size():
    """SD-1.5's 16 cross-attention layers numbered as diffusers' attn_processors (n = 1, 3, .., 31:
    down, up, then mid), with the released shapes (hidden, 768)."""
    from real_sizes import config_folder

    c = train_probe.tiny_config("ip_adapter")
    c.model.update(dict(path=str(config_folder("sd15")), abstract=True))
    c.encoders.update(dict(clip=str(config_folder("ip_adapter_image_encoder")), image_size=224))
    built = build(c)
    names = ip_adapter.public_names(built.params["unet"])
    assert sorted(int(k.split(".")[1]) for k in names if "to_k_ip" in k) == list(range(1, 32, 2))
    tree = trainable_tree(built)
    widths = {1: ("down_blocks_0", 320), 5: ("down_blocks_1", 640), 9: ("down_blocks_2", 1280),
              13: ("up_blocks_1", 1280), 19: ("up_blocks_2", 640), 25: ("up_blocks_3", 320), 31: ("mid_block", 1280)}
    for n, (block, w) in widths.items():
        path = names[f"ip_adapter.{n}.to_k_ip.weight"]
        assert path[1] == block and _at(tree, path).shape == (768, w)     # our kernel; torch (w, 768)
    assert _at(tree, ("image_proj", "proj", "kernel")).shape == (1024, 4 * 768)   # torch (3072, 1024)


def _at(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def test_trains_and_samples_through_the_one_trainer_and_sampler(tmp_path):
    """``customjax.train`` then ``customjax.sample`` on ``configs/ip_adapter.py:tiny``: the export has
    the released names and the method in its metadata; sampling takes cases without target words."""
    from customjax import train

    c = train_probe.run_config(steps=3, method="ip_adapter")
    out = train.train(c, str(tmp_path / "run"))
    assert out["step"] == 3 and np.isfinite(out["loss"]) and "loss/diffusion" in out
    export = tmp_path / "run" / "export" / "adapter.safetensors"
    assert read_metadata(export)["method"] == "ip_adapter"
    assert all(k.startswith(("image_proj.", "ip_adapter.")) for k in load_file(export))
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps({"prompt": "a toy on the beach", "references": [str(train_probe.ROOT / "examples/toy.png")],
                                 "seeds": [0, 1]}) + "\n")
    r = subprocess.run([sys.executable, "-m", "customjax.sample", "--config", "configs/ip_adapter.py:tiny",
                        "--checkpoint", str(export.parent), "--prompts", str(cases), "--config.sample.steps=3",
                        "--out", str(tmp_path / "out")], cwd=train_probe.ROOT, env=cpu_env(1),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "out" / "record.json").read_text())
    assert [i["seed"] for i in rec["images"]] == [0, 1]
    assert rec["unet_evaluations_per_image"] == 2 * 3          # [u; g] at every step, no guidance branch
    assert (tmp_path / "out" / "0000_seed0.png").is_file()
