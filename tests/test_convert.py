"""The conversion core: key maps, strict loading, export round trip, safetensors I/O."""

import collections
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mg5jax import parallel
from mg5jax.convert import keymap as km
from mg5jax.convert.sources import (CheckpointError, DictSource, SafetensorsSource, TorchSource, open_weights,
                                   write_sharded_safetensors)
from mg5jax.models import layers


class Tiny(nnx.Module):
    def __init__(self, *, rngs):
        self.blocks = nnx.List([layers.linear(4, 6, ("embed", "mlp"), rngs=rngs) for _ in range(2)])
        self.qkv = nnx.List([layers.linear(4, 4, ("embed", "heads"), rngs=rngs) for _ in range(3)])
        self.norm = layers.LayerNorm(6)


KEYMAP = km.KeyMap([
    km.Rule("blocks.{i}.weight", "blocks.{i}.kernel", km.LINEAR),
    km.Rule("blocks.{i}.bias", "blocks.{i}.bias"),
    km.Rule("in_proj_weight", ("qkv.0.kernel", "qkv.1.kernel", "qkv.2.kernel"), km.LINEAR),
    km.Rule("in_proj_bias", ("qkv.0.bias", "qkv.1.bias", "qkv.2.bias")),
    km.Rule("norm.weight", "norm.scale"),
    km.Rule("norm.bias", "norm.bias"),
], ignore=[r"\.inv_freq$"])


def torch_like_state(rng):
    sd = {f"blocks.{i}.weight": rng.normal(size=(6, 4)).astype(np.float32) for i in range(2)}
    sd.update({f"blocks.{i}.bias": rng.normal(size=(6,)).astype(np.float32) for i in range(2)})
    sd["in_proj_weight"] = rng.normal(size=(12, 4)).astype(np.float32)
    sd["in_proj_bias"] = rng.normal(size=(12,)).astype(np.float32)
    sd["norm.weight"] = rng.normal(size=(6,)).astype(np.float32)
    sd["norm.bias"] = rng.normal(size=(6,)).astype(np.float32)
    return sd


def test_load_export_round_trip():
    sd = torch_like_state(np.random.default_rng(0))
    gd, abstract = km.abstract_model(lambda: Tiny(rngs=nnx.Rngs(0)))
    model = km.materialize(gd, km.load_params(abstract, DictSource(sd, "tiny.bin"), KEYMAP))
    np.testing.assert_array_equal(model.blocks[1].kernel[...], sd["blocks.1.weight"].T)
    np.testing.assert_array_equal(model.qkv[2].kernel[...], sd["in_proj_weight"][8:].T)
    out = dict(km.export_params(nnx.state(model), KEYMAP))
    assert out.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(out[k], sd[k])


def test_strict_errors_name_the_key_and_file():
    gd, abstract = km.abstract_model(lambda: Tiny(rngs=nnx.Rngs(0)))
    sd = torch_like_state(np.random.default_rng(0))
    missing = {k: v for k, v in sd.items() if k != "norm.bias"}
    with pytest.raises(CheckpointError, match=r"missing key 'norm.bias' in tiny.bin"):
        km.load_params(abstract, DictSource(missing, "tiny.bin"), KEYMAP)
    extra = dict(sd, **{"blocks.9.weight": sd["blocks.0.weight"], "rot.inv_freq": np.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected key 'blocks.9.weight' in tiny.bin"):
        km.load_params(abstract, DictSource(extra, "tiny.bin"), KEYMAP)
    bad = dict(sd, **{"blocks.0.weight": np.zeros((5, 4), np.float32)})
    with pytest.raises(CheckpointError, match=r"'blocks.0.weight' in tiny.bin: expected shape \(4, 6\)"):
        km.load_params(abstract, DictSource(bad, "tiny.bin"), KEYMAP)
    with pytest.raises(CheckpointError, match=r"no conversion rule for our parameter 'norm\.(scale|bias)'"):
        km.KeyMap(KEYMAP.rules[:4]).bind(km.flat_params(abstract))
    uneven = dict(sd, in_proj_weight=np.zeros((13, 4), np.float32))  # a fused qkv that does not split in three
    with pytest.raises(CheckpointError, match=r"'in_proj_weight' in tiny.bin: cannot convert it to qkv\.0\.kernel"):
        km.load_params(abstract, DictSource(uneven, "tiny.bin"), KEYMAP)


def test_transforms_that_drop_axes_refuse_axes_that_are_not_singletons():
    np.testing.assert_array_equal(km.SQUEEZE0.to_ours(np.ones((1, 2, 3))), np.ones((2, 3)))
    np.testing.assert_array_equal(km.CONV1X1_AS_LINEAR.to_ours(np.ones((4, 3, 1, 1))), np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"expected size 1 on axes \(0,\), got shape \(2, 3, 2\)"):
        km.SQUEEZE0.to_ours(np.ones((2, 3, 2)))
    with pytest.raises(ValueError, match=r"axes \(2, 3\), got shape \(4, 3, 3, 3\)"):
        km.CONV1X1_AS_LINEAR.to_ours(np.ones((4, 3, 3, 3)))


def test_torch_tensors_in_a_dict_source_and_zero_dimensional_arrays(tmp_path):
    import ml_dtypes
    import torch

    source = DictSource({"w": torch.ones(2, dtype=torch.bfloat16)})
    assert source["w"].dtype == ml_dtypes.bfloat16
    write_sharded_safetensors(tmp_path, {"scalar": np.float32(3.5), "v": np.arange(3, dtype=np.float32)})
    stored = open_weights(tmp_path)
    assert stored["scalar"].shape == () and float(stored["scalar"]) == 3.5
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: its weight_map lists no tensors"):
        open_weights(tmp_path)


def test_a_torch_file_in_the_old_format_loads(tmp_path):
    import torch

    torch.save({"w": torch.arange(4.0)}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    np.testing.assert_array_equal(TorchSource([tmp_path / "old.bin"])["w"], np.arange(4.0))


LFS_POINTER_TEXT = ("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1234567\n")


def test_files_that_are_not_weights_are_named(tmp_path):
    """What a clone without git-lfs holds (pointer stubs), a file too short for its header, a pickle holding
    objects besides tensors, and a folder with only an fp16 variant: each an error naming the file."""
    import argparse

    import torch

    from mg5jax.data.tokenization import MiniGPT5Tokenizer

    lfs = tmp_path / "lfs"
    lfs.mkdir()
    (lfs / "model.safetensors").write_text(LFS_POINTER_TEXT)
    with pytest.raises(CheckpointError, match=r"lfs/model\.safetensors is a git-lfs pointer, not the file itself"):
        open_weights(lfs)
    (lfs / "tokenizer.model").write_text(LFS_POINTER_TEXT)
    with pytest.raises(CheckpointError, match=r"lfs/tokenizer\.model is a git-lfs pointer"):
        MiniGPT5Tokenizer.from_pretrained(lfs)
    (lfs / "stage1.ckpt").write_text(LFS_POINTER_TEXT)
    with pytest.raises(CheckpointError, match=r"lfs/stage1\.ckpt is a git-lfs pointer"):
        TorchSource([lfs / "stage1.ckpt"], subkey="state_dict")
    short = tmp_path / "short"
    short.mkdir()
    (short / "model.safetensors").write_bytes((10 ** 6).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match=r"not a safetensors file \(its header would take 1000000 bytes of a "
                                              r"10-byte file\)"):
        open_weights(short)
    # a Lightning checkpoint whose hyper-parameters hold an object: what it is and how to keep the tensors
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"args": argparse.Namespace(a=1)}},
               tmp_path / "run.ckpt")
    with pytest.raises(CheckpointError) as info:
        TorchSource([tmp_path / "run.ckpt"], subkey="state_dict")
    message = str(info.value)
    assert "holds an object of type argparse.Namespace besides its tensors" in message and "\x1b" not in message
    assert f"torch.save({{'state_dict': c['state_dict']}}, '{tmp_path / 'run.tensors.ckpt'}')" in message
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"'diffusion_pytorch_model\.bin'.*only variant files "
                                                r"\['diffusion_pytorch_model\.fp16\.safetensors'\]"):
        open_weights(unet)


def test_sharded_safetensors_and_mesh_load(tmp_path):
    import ml_dtypes

    sd = torch_like_state(np.random.default_rng(1))
    sd["norm.weight"] = sd["norm.weight"].astype(ml_dtypes.bfloat16)
    write_sharded_safetensors(tmp_path, sd, max_shard_bytes=100)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    src = open_weights(tmp_path)
    assert isinstance(src, SafetensorsSource) and set(src) == set(sd)
    assert src["norm.weight"].dtype == ml_dtypes.bfloat16
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    gd, abstract = km.abstract_model(lambda: Tiny(rngs=nnx.Rngs(0)))
    model = km.materialize(gd, km.load_params(abstract, src, KEYMAP, mesh=mesh))
    kernel = model.blocks[0].kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(kernel), sd["blocks.0.weight"].T)
    first = sorted(tmp_path.glob("model-00001-of-*.safetensors"))[0]
    first.write_bytes(b"\x00\x01")
    with pytest.raises(CheckpointError, match=first.name):
        open_weights(tmp_path)


def test_saving_again_removes_the_earlier_weight_files(tmp_path):
    """A single file after shards (and shards after a single file) leaves no stale weights to load."""
    sd = torch_like_state(np.random.default_rng(2))
    write_sharded_safetensors(tmp_path, sd)
    newer = {k: v + 1 for k, v in sd.items()}
    names = write_sharded_safetensors(tmp_path, newer, max_shard_bytes=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "model.safetensors.index.json"])
    np.testing.assert_array_equal(open_weights(tmp_path)["norm.weight"], newer["norm.weight"])
    (tmp_path / "notes.txt").write_text("kept")
    write_sharded_safetensors(tmp_path, sd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "notes.txt"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain file, not 0600
    np.testing.assert_array_equal(open_weights(tmp_path)["norm.weight"], sd["norm.weight"])


def test_tensors_are_written_one_at_a_time(tmp_path):
    """(key, array) pairs stream into the files: an exported model never sits in host memory whole."""
    import weakref

    sd = torch_like_state(np.random.default_rng(3))
    alive = []

    def pairs():
        for k, v in sd.items():
            if len(alive) >= 2:
                assert alive[-2]() is None, "an array written two tensors ago is still held"
            a = v.copy()
            alive.append(weakref.ref(a))
            yield k, a
            del a

    names = write_sharded_safetensors(tmp_path, pairs(), max_shard_bytes=100)
    assert len(names) > 1 and not list(tmp_path.glob(".*"))  # no temporary files left
    src = open_weights(tmp_path)
    for k, v in sd.items():
        np.testing.assert_array_equal(src[k], v)


def test_logical_rules_unknown_name_is_an_error(caplog):
    with pytest.raises(KeyError, match="'bogus'"):
        parallel.logical_to_mesh(("embed", "bogus"))
    assert parallel.logical_to_mesh(("batch", None)) == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    mesh = parallel.make_mesh(data=1, fsdp=2, tensor=4)
    typo = nnx.State({"ffn": {"kernel": nnx.Param(jnp.zeros((8, 8)), out_sharding=("embed", "mpl"))}})
    with pytest.raises(KeyError, match=r"ffn.kernel: logical axis name\(s\) \['mpl'\] have no rule"):
        parallel.state_shardings(typo, mesh)  # not silently replicated
    vocab = nnx.State({"lm_head": nnx.Param(jnp.zeros((64, 32009)), out_sharding=("embed", "vocab"))})
    with caplog.at_level(logging.WARNING, logger="mg5jax.parallel"):
        spec = parallel.state_shardings(vocab, mesh)["lm_head"].get_value().spec
    assert spec == jax.sharding.PartitionSpec("fsdp", None)
    assert "lm_head (64, 32009): vocab=32009 not split over the mesh" in caplog.text


def test_a_weight_index_that_misplaces_a_key_is_named(tmp_path, caplog):
    sd = torch_like_state(np.random.default_rng(4))
    write_sharded_safetensors(tmp_path, sd, max_shard_bytes=100)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    counts = collections.Counter(index["weight_map"].values())
    full = next(name for name, n in counts.items() if n > 1)  # still listed after one key moves away
    other = next(name for name in counts if name != full)
    shards = [full, other]
    key = next(k for k, v in index["weight_map"].items() if v == full)
    index["weight_map"][key] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"places key '{key}' in {shards[1]}, but it is in .*{shards[0]}"):
        open_weights(tmp_path)
    index["weight_map"]["not.there"] = shards[0]
    index["weight_map"][key] = shards[0]
    index_path.write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING, logger="mg5jax.convert.sources"):
        open_weights(tmp_path)  # the loader fails on a missing key only if it needs it
    assert "lists key 'not.there' in" in caplog.text and "but no shard holds it" in caplog.text


def test_a_failed_save_leaves_the_earlier_one_whole(tmp_path):
    sd = torch_like_state(np.random.default_rng(5))
    names = write_sharded_safetensors(tmp_path, sd, max_shard_bytes=100)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def failing():
        for i, item in enumerate(sd.items()):
            if i == 5:
                raise RuntimeError("export failed")
            yield item[0], item[1] + 1

    with pytest.raises(RuntimeError, match="export failed"):
        write_sharded_safetensors(tmp_path, failing(), max_shard_bytes=100)
    with pytest.raises(CheckpointError, match=r"key 'norm.bias' given twice"):
        write_sharded_safetensors(tmp_path, [*sd.items(), ("norm.bias", sd["norm.bias"])], max_shard_bytes=100)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary files either
    assert len(names) > 1


def test_loading_into_a_sharded_model_keeps_its_shardings():
    """Official / peft imports load into a built model: its arrays stay where the mesh put them."""
    sd = torch_like_state(np.random.default_rng(6))
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    model = parallel.shard_model(Tiny(rngs=nnx.Rngs(0)), mesh)
    before = {p: v.get_value().sharding for p, v in km.flat_params(nnx.state(model)).items()}
    nnx.update(model, km.load_params(nnx.state(model), DictSource(sd, "tiny.bin"), KEYMAP))
    after = km.flat_params(nnx.state(model))
    assert {p: v.get_value().sharding for p, v in after.items()} == before
    assert before["blocks.0.kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(model.blocks[0].kernel[...]), sd["blocks.0.weight"].T)


def test_a_resave_interrupted_while_renaming_leaves_no_index_over_a_mix(tmp_path, monkeypatch):
    sd = torch_like_state(np.random.default_rng(7))
    write_sharded_safetensors(tmp_path, sd, max_shard_bytes=100)
    renames = []
    real_replace = os.replace

    def interrupted(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_sharded_safetensors(tmp_path, {k: v + 1 for k, v in sd.items()}, max_shard_bytes=100)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="no weights in"):  # loud, not old and new shards mixed
        open_weights(tmp_path)
    assert not list(tmp_path.glob(".*"))
