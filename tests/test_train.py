"""The training system on the real MiniGPT-5 objective (tiny demo-shaped weights built offline):
the same step on 1 device and on 8-device meshes, frozen parameters and old vocab rows untouched,
and train.py's one-line errors for bad overrides, missing weights and missing images."""

import json
import logging
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mg5jax import build, parallel
from mg5jax.convert import keymap as km
from mg5jax.convert.sources import CheckpointError
from mg5jax.data import pipeline
from mg5jax.training.checkpoint import BestCheckpoint
from mg5jax.training.trainer import Trainer, TrainerConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("train")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from mg5jax.tiny import build_demo

    root = tmp_path_factory.mktemp("demo")
    build_demo(root)
    return root


def demo_config(root, workdir, **trainer):
    from configs import demo

    cfg = demo.get_config()
    cfg.unlock()
    cfg.model.llm_path = str(root / "weights" / "llm")
    cfg.model.sd_path = str(root / "weights" / "sd")
    cfg.model.vision.blip2_dir = str(root / "weights" / "blip2")
    cfg.model.lora.enabled = True
    cfg.model.train_new_rows_only = True
    cfg.data.train_path = str(root / "data" / "VIST" / "train_cleaned.json")
    cfg.data.val_path = ""
    cfg.trainer.workdir = str(workdir)
    cfg.trainer.optimizer.trainable = ((r"llm\..*\.lora_[ab]", 1.0), (r"llm\.model\.embed_tokens\..*", 1.0),
                                       (r"llm\.lm_head\..*", 1.0), (r"mapper\..*", 10.0))
    # with eps 1e-8 Adam's first step is lr·sign(g) per entry, and a near-zero gradient flips it on
    # float-reduction noise alone; a large eps makes the step proportional to g, so meshes compare closely
    cfg.trainer.optimizer.learning_rate = 1e-3
    cfg.trainer.optimizer.eps = 1e-4
    cfg.trainer.optimizer.warmup_steps = 0
    cfg.trainer.optimizer.total_steps = 10
    cfg.trainer.optimizer.grad_accum_steps = 1
    cfg.trainer.save_every = 0
    cfg.trainer.eval_every = 0
    for k, v in trainer.items():
        cfg.trainer[k] = v
    return cfg


@pytest.fixture(scope="module")
def demo_built(demo_root, tmp_path_factory):
    cfg = demo_config(demo_root, tmp_path_factory.mktemp("data"))
    return cfg, build.build_model(cfg)


@pytest.fixture(scope="module")
def first_batches(demo_built):
    cfg, built = demo_built
    samples = build.read_samples("vist", cfg.data.train_path, test=False, seed=0, strict=True)
    ds = pipeline.make_dataset(samples, build.make_builder(cfg, built, 8, train=True), seed=0)
    it = iter(ds)
    return [next(it) for _ in range(3)]


def test_validation_reads_its_own_precomputed_folders(demo_built, tmp_path):
    """data.val_* folders when set, else the training ones."""
    cfg, built = demo_built
    cfg = cfg.copy_and_resolve_references()
    folders = {name: tmp_path / name for name in ("feats_train", "moments_train", "feats_val", "moments_val")}
    for folder in folders.values():
        folder.mkdir()
    train_dirs, val_dirs = (str(folders["feats_train"]), str(folders["moments_train"])), (
        str(folders["feats_val"]), str(folders["moments_val"]))
    cfg.data.input_features_dir, cfg.data.output_moments_dir = train_dirs
    val = build.make_builder(cfg, built, 8, train=False)
    assert (str(val.input_features_dir), str(val.output_moments_dir)) == train_dirs
    cfg.data.val_input_features_dir, cfg.data.val_output_moments_dir = val_dirs
    val, train = (build.make_builder(cfg, built, 8, train=t) for t in (False, True))
    assert (str(val.input_features_dir), str(val.output_moments_dir)) == val_dirs
    assert (str(train.input_features_dir), str(train.output_moments_dir)) == train_dirs


def test_precomputed_folders_hold_what_their_fields_name(demo_root, tmp_path, caplog):
    """A folder's encoding.json (written by encode_images) says what it holds and from which weights: input
    features in a moments field is refused; moments of another VAE are warned about; the config's own pass."""
    from mg5jax.data.datasets import DataError

    cfg = demo_config(demo_root, tmp_path / "run")
    vae = demo_root / "weights" / "sd" / "vae"
    records = {"moments": {"what": "VAE moments", "encoder": f"{vae.resolve()} (bfloat16)"},
               "other_moments": {"what": "VAE moments", "encoder": f"{tmp_path / 'other_sd' / 'vae'} (bfloat16)"},
               "features": {"what": "input features", "encoder": f"{demo_root / 'weights' / 'blip2'} (bfloat16)"}}
    for name, record in records.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "encoding.json").write_text(json.dumps(record))
    cfg.data.output_moments_dir = str(tmp_path / "moments")
    cfg.data.input_features_dir = str(tmp_path / "features")
    with caplog.at_level(logging.WARNING, logger="mg5jax.build"):
        build.check_precomputed_encoders(cfg)
    assert not caplog.records
    cfg.data.val_output_moments_dir = str(tmp_path / "other_moments")
    with caplog.at_level(logging.WARNING, logger="mg5jax.build"):
        build.check_precomputed_encoders(cfg)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"data.val_output_moments_dir {tmp_path / 'other_moments'} holds VAE moments of "
                              f"{tmp_path / 'other_sd' / 'vae'} (bfloat16), and model.sd_path's VAE is {vae}"), warning
    cfg.data.val_output_moments_dir = str(tmp_path / "features")
    with pytest.raises(DataError, match=r"data.val_output_moments_dir .*features: holds input features "
                                        r"\(.*encoding.json\), not VAE moments"):
        build.check_precomputed_encoders(cfg)


def run_steps(demo_root, workdir, batches, mesh):
    cfg = demo_config(demo_root, workdir, mesh=mesh)
    devices = jax.devices()[: mesh["data"] * mesh["fsdp"] * mesh["tensor"]]
    built = build.build_model(cfg, mesh=parallel.make_mesh(**mesh, devices=devices))  # as train.py loads
    # the pretrained weights were read straight into their shardings: e.g. the LLM's kernels split on `embed`
    kernel = built.model.llm.model.layers[0].mlp.up_proj.kernel.get_value()
    assert len(kernel.sharding.device_set) == len(devices)
    assert kernel.addressable_shards[0].data.shape[0] == kernel.shape[0] // (mesh["fsdp"] if mesh["fsdp"] > 1 else 1)
    before = {p: np.asarray(v.get_value()) for p, v in km.flat_params(nnx.state(built.model, nnx.Param)).items()}
    trainer = Trainer(built.model, TrainerConfig.from_dict(cfg.trainer.to_dict()), devices=devices,
                      update_masks=build.voken_row_masks(built.model, built.num_new_rows))
    losses, snapshots = [], []
    for b in batches:
        losses.append(trainer.train_step(b)["loss"])
        snapshots.append({p: np.asarray(jax.device_get(v.get_value()))
                          for p, v in km.flat_params(nnx.state(trainer.model, nnx.Param)).items()})
    trainer.close()
    return losses, before, snapshots, built.num_new_rows


def test_one_device_equals_meshes_and_frozen_stays_frozen(demo_root, first_batches, tmp_path):
    losses, before, snapshots, num_new = run_steps(demo_root, tmp_path / "one", first_batches,
                                                   dict(data=1, fsdp=1, tensor=1))
    after = snapshots[-1]
    assert all(np.isfinite(losses))
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    for p in before:
        trainable = ".lora_" in p or p.startswith("mapper.") or "embed_tokens" in p or "lm_head" in p
        if not trainable:
            assert p not in changed, f"frozen {p} changed"
    for p in ("llm.model.embed_tokens.embedding", "llm.lm_head.kernel"):
        axis = 0 if "embed" in p else 1
        old = np.take(after[p], np.arange(after[p].shape[axis] - num_new), axis=axis)
        np.testing.assert_array_equal(old, np.take(before[p], np.arange(before[p].shape[axis] - num_new), axis=axis))
        assert p in changed
    assert any(".lora_b" in p for p in changed) and any(p.startswith("mapper.") for p in changed)

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    # the real objective, with the U-Net, VAE and mapper work split like the batch
    for mesh in (dict(data=2, fsdp=4, tensor=1), dict(data=1, fsdp=4, tensor=2)):
        name = "x".join(str(v) for v in mesh.values())
        m_losses, _, m_snapshots, _ = run_steps(demo_root, tmp_path / name, first_batches[:1], mesh)
        np.testing.assert_allclose(m_losses[0], losses[0], rtol=1e-5, err_msg=name)
        for p in changed:
            np.testing.assert_allclose(m_snapshots[0][p], snapshots[0][p], rtol=1e-5, atol=1e-6, err_msg=f"{name}: {p}")


def test_three_axis_mesh_is_refused(demo_root, tmp_path):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    cfg = demo_config(demo_root, tmp_path, mesh=dict(data=2, fsdp=2, tensor=2))
    built = build.build_model(cfg)
    with pytest.raises(ValueError, match="data, fsdp and tensor all > 1 is not supported"):
        Trainer(built.model, TrainerConfig.from_dict(cfg.trainer.to_dict()))


def _train(*args, cwd=REPO):
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def stage2_run(workdir: pathlib.Path, params, init_from: pathlib.Path) -> pathlib.Path:
    """A stage-2 run's records as a model needs them: `params` as its best step 4, started from `init_from`.
    Returns its checkpoint's meta folder."""
    best = BestCheckpoint(workdir / "best", async_save=False)
    assert best.offer(4, 1.0, params)
    best.close()
    meta = workdir / "checkpoints" / "4" / "meta"
    meta.mkdir(parents=True)
    (meta / "metadata").write_text(json.dumps({"step": 4, "config": {"model": {"init_from": str(init_from)}}}))
    return meta


def test_init_from_loads_the_best_validation_step(demo_root, tmp_path):
    cfg = demo_config(demo_root, tmp_path / "stage1")
    stage1 = build.build_model(cfg).model
    mapper = nnx.All(nnx.Param, nnx.PathContains("mapper"))
    _, state, _ = nnx.split(stage1, mapper, ...)
    best = BestCheckpoint(tmp_path / "stage1" / "best", async_save=False)
    assert best.offer(5, 1.5, jax.tree.map(lambda x: x + 1.0, state))
    assert not best.offer(7, 2.5, jax.tree.map(lambda x: x - 1.0, state))  # worse: not kept
    best.close()
    built = build.build_model(cfg)
    with pytest.raises(TypeError, match=r"takes the model: build_model\(...\).model"):
        build.load_trainable(built, str(tmp_path / "stage1"))
    stage2 = built.model
    loaded = build.load_trainable(stage2, str(tmp_path / "stage1"))
    want = km.flat_params(state)
    got = km.flat_params(nnx.state(stage2, nnx.Param))
    assert sorted(loaded) == sorted(want) and all(p.startswith("mapper.") for p in loaded)
    for p in loaded:
        np.testing.assert_array_equal(np.asarray(got[p].get_value()), np.asarray(want[p].get_value()) + 1.0, err_msg=p)
    # inference loads a run into the model it trained (strict): a trained param the model lacks is an error
    _, with_lora, _ = nnx.split(stage1, nnx.Any(mapper, nnx.All(nnx.Param, nnx.PathContains("lora_a"))), ...)
    best = BestCheckpoint(tmp_path / "lora_run" / "best", async_save=False)
    assert best.offer(3, 1.0, with_lora)
    best.close()
    cfg.model.lora.enabled = False
    without_lora = build.build_model(cfg).model
    with pytest.raises(CheckpointError, match=r"trained params have no place in this model, e.g. llm\..*lora_a"):
        build.load_trainable(without_lora, str(tmp_path / "lora_run"), strict=True)
    assert sorted(build.load_trainable(without_lora, str(tmp_path / "lora_run"))) == sorted(want)
    # the vocab rows' update masks cover the vocab params the run trains (a frozen lm_head needs none)
    assert sorted(build.voken_row_masks(stage1, 9)) == ["llm.lm_head.kernel", "llm.model.embed_tokens.embedding"]
    only_embed = ((r"llm\.model\.embed_tokens\..*", 1.0), (r"mapper\..*", 1.0))
    assert list(build.voken_row_masks(stage1, 9, only_embed)) == ["llm.model.embed_tokens.embedding"]
    # a stage-2 run keeps only what it trains: starting from one, the mapper params it froze come from the run
    # it started from (its recorded model.init_from), and are an error where that chain ends without them
    frozen = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("fc_in"), nnx.PathContains("decoder_queries")))
    _, kept, _ = nnx.split(stage1, nnx.All(mapper, nnx.Not(frozen)), ...)
    meta = stage2_run(tmp_path / "stage2_run", jax.tree.map(lambda x: x - 2.0, kept), tmp_path / "stage1")
    cfg.model.init_from = str(tmp_path / "stage2_run")
    chained = km.flat_params(nnx.state(build.build_model(cfg).model, nnx.Param))
    assert any("fc_in" in p for p in want) and any("decoder_queries" in p for p in want)
    for p in want:
        offset = 1.0 if "fc_in" in p or "decoder_queries" in p else -2.0  # from stage 1, else from the stage-2 run
        np.testing.assert_array_equal(np.asarray(chained[p].get_value()), np.asarray(want[p].get_value()) + offset,
                                      err_msg=p)
    (meta / "metadata").write_text(json.dumps({"step": 4, "config": {"model": {"init_from": ""}}}))
    with pytest.raises(CheckpointError, match=r"holds no mapper\..*\(\d+ mapper params; a stage-2 run keeps only what "
                                              r"it trains.*stage2_run records no model.init_from"):
        build.build_model(cfg)


def test_a_stage2_run_keeps_the_frozen_params_it_started_from(demo_root, tmp_path):
    """A stage-2 run keeps what its model.init_from gave and it does not train (the mapper's fc and decoder
    queries; here also LLM norms the stage-1 run trained) in <workdir>/inherited/: it resumes, generates
    and seeds a later run with those, though the stage-1 run has trained on since."""
    from mg5jax.training.checkpoint import read_inherited

    stage1 = build.build_model(demo_config(demo_root, tmp_path / "stage1")).model
    _, state, _ = nnx.split(stage1, nnx.All(nnx.Param, nnx.Any(nnx.PathContains("mapper"),
                                                               nnx.PathContains("input_layernorm"))), ...)
    want = {p: np.asarray(v.get_value()) for p, v in km.flat_params(state).items()}
    best = BestCheckpoint(tmp_path / "stage1" / "best", async_save=False)
    assert best.offer(5, 1.5, jax.tree.map(lambda x: x + 1.0, state))
    cfg = demo_config(demo_root, tmp_path / "stage2")
    cfg.model.init_from = str(tmp_path / "stage1")
    cfg.trainer.optimizer.trainable = ((r"llm\..*\.lora_[ab]", 1.0), (r"mapper\.(encoder|decoder)\..*", 1.0),
                                       (r"mapper\..*", None))
    built = build.build_model(cfg)
    frozen = sorted(p for p in want if not p.startswith(("mapper.encoder.", "mapper.decoder.")))
    assert build.keep_inherited(cfg, built, cfg.trainer.workdir, resumed=False) == len(frozen)
    assert any("input_layernorm" in p for p in frozen) and any(p.startswith("mapper.") for p in frozen)
    assert sorted(build._flatten(read_inherited(tmp_path / "stage2"))) == frozen
    _, trained, _ = nnx.split(built.model, nnx.All(nnx.Param, nnx.Any(nnx.PathContains("encoder"),
                                                                      nnx.PathContains("decoder")),
                                                   nnx.PathContains("mapper")), ...)
    meta = stage2_run(tmp_path / "stage2", jax.tree.map(lambda x: x - 2.0, trained), tmp_path / "stage1")
    assert best.offer(8, 1.0, jax.tree.map(lambda x: x + 5.0, state))  # stage 1 trains on: a better step
    best.close()

    def check(model, what):
        got = km.flat_params(nnx.state(model, nnx.Param))
        for p in frozen:  # as the stage-2 run started, not stage 1's newer best step (+5)
            np.testing.assert_array_equal(np.asarray(got[p].get_value()), want[p] + 1.0, err_msg=f"{what}: {p}")

    resumed = build.build_model(cfg)
    assert build.keep_inherited(cfg, resumed, cfg.trainer.workdir, resumed=True) == len(frozen)
    check(resumed.model, "resumed")
    # a run made before runs kept a copy resumes on what model.init_from gives now, and records no copy
    assert build.keep_inherited(cfg, build.build_model(cfg), str(tmp_path / "older"), resumed=True) == 0
    check(build.inference_model(cfg, run_dir=str(tmp_path / "stage2"))[0].model, "inference")
    later = demo_config(demo_root, tmp_path / "mmdialog")
    later.model.init_from = str(tmp_path / "stage2")  # e.g. MMDialog after VIST
    check(build.build_model(later).model, "a run from the stage-2 run")
    # what a run trained is never replaced by a copy (here a run that trains the whole mapper beside one)
    shutil.copytree(tmp_path / "stage2" / "inherited", tmp_path / "whole" / "inherited")
    _, mapper, _ = nnx.split(built.model, nnx.All(nnx.Param, nnx.PathContains("mapper")), ...)
    stage2_run(tmp_path / "whole", jax.tree.map(lambda x: x + 3.0, mapper), tmp_path / "stage1")
    got = km.flat_params(nnx.state(build.inference_model(cfg, run_dir=str(tmp_path / "whole"))[0].model, nnx.Param))
    for p in [p for p in frozen if p.startswith("mapper.")]:
        np.testing.assert_array_equal(np.asarray(got[p].get_value()), want[p] + 1.0 + 3.0, err_msg=p)
    # a run that kept its copy does not load without it
    (meta / "metadata").write_text(json.dumps({"step": 4, "config": {"model": {"init_from": str(tmp_path / "stage1")},
                                                                     "inherited": len(frozen)}}))
    shutil.move(tmp_path / "stage2" / "inherited", tmp_path / "kept_aside")
    with pytest.raises(CheckpointError, match=rf"--checkpoint .*stage2: its inherited/ is gone, where the run kept the "
                                              rf"{len(frozen)} params its model.init_from gave it"):
        build.inference_model(cfg, run_dir=str(tmp_path / "stage2"))
    shutil.move(tmp_path / "kept_aside", tmp_path / "stage2" / "inherited")
    # a fresh run in a workdir sets an earlier run's copy aside (as its best/), and keeps its own; the copy
    # of a run that stopped before its first checkpoint (no best/ either) goes
    build.keep_inherited(cfg, built, cfg.trainer.workdir, resumed=False)
    assert (tmp_path / "stage2" / "inherited.earlier_1" / "params").is_dir()
    assert sorted(build._flatten(read_inherited(tmp_path / "stage2"))) == frozen
    shutil.copytree(tmp_path / "stage2" / "inherited", tmp_path / "crashed" / "inherited")
    build.keep_inherited(cfg, built, str(tmp_path / "crashed"), resumed=False)
    assert sorted(p.name for p in (tmp_path / "crashed").iterdir()) == ["inherited"]


def test_init_from_the_official_stage1_file(demo_root, tmp_path):
    """Stage 2 from the released stage1_cc3m.ckpt: its fc, queries, voken rows and mapper seed the model."""
    from mg5jax.convert.minigpt5 import export_official, import_official

    cfg = demo_config(demo_root, tmp_path / "stage2")
    stage1 = build.build_model(cfg).model
    _, state, _ = nnx.split(stage1, nnx.All(nnx.Param, nnx.PathContains("mapper")), ...)
    nnx.update(stage1, jax.tree.map(lambda x: x + 0.5, state))
    ckpt = tmp_path / "stage1_cc3m.ckpt"
    exported = export_official(stage1, ckpt, stage=1)
    assert {"fc.0.weight", "t2i_decoder_prompt", "model.llama_model.lm_head.weight"} <= set(exported)
    cfg.model.init_from = str(ckpt)
    stage2 = build.build_model(cfg).model
    want = km.flat_params(nnx.state(stage1, nnx.Param))
    got = km.flat_params(nnx.state(stage2, nnx.Param))
    for p in [p for p in want if p.startswith("mapper.") or "embed_tokens" in p or "lm_head" in p]:
        np.testing.assert_array_equal(np.asarray(got[p].get_value()), np.asarray(want[p].get_value()), err_msg=p)
    cfg.model.init_from = str(tmp_path / "gone.ckpt")
    with pytest.raises(FileNotFoundError, match="model.init_from: file not found: .*gone.ckpt"):
        build.build_model(cfg)
    # a stage-2 run that started from the official file: what it froze comes from that file, what it trained
    # stays as it trained it
    frozen = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("fc_in"), nnx.PathContains("decoder_queries")))
    _, kept, _ = nnx.split(stage1, nnx.All(nnx.Param, nnx.PathContains("mapper"), nnx.Not(frozen)), ...)
    stage2_run(tmp_path / "stage2_run", jax.tree.map(lambda x: x - 2.0, kept), ckpt)
    cfg.model.init_from = str(tmp_path / "stage2_run")
    chained = km.flat_params(nnx.state(build.build_model(cfg).model, nnx.Param))
    for p in [p for p in want if p.startswith("mapper.")]:
        offset = 0.0 if "fc_in" in p or "decoder_queries" in p else -2.0  # stage 1's (already +0.5), or the run's
        np.testing.assert_array_equal(np.asarray(chained[p].get_value()), np.asarray(want[p].get_value()) + offset,
                                      err_msg=p)
    # python -m mg5jax.export_official writes a run back as the original's files: stage 2 with what it trained,
    # stage 1 with what it froze from its chain, the LLM's own rows in their file's precision; what the file
    # has no place for is refused (that run trained fc_out, which the original's stage 2 freezes)
    import torch

    from mg5jax import export_official as export_cli
    from mg5jax.convert.sources import CheckpointError

    transformer = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("encoder"), nnx.PathContains("decoder")),
                          nnx.PathContains("mapper"), nnx.Not(frozen))
    _, trained, _ = nnx.split(stage1, transformer, ...)
    stage2_run(tmp_path / "stage2_vist", jax.tree.map(lambda x: x - 3.0, trained), ckpt)
    config_file = tmp_path / "exported_run.py"
    config_file.write_text(
        "from configs import demo\n\n\ndef get_config():\n    c = demo.get_config()\n"
        f"    c.model.llm_path = {cfg.model.llm_path!r}\n    c.model.sd_path = {cfg.model.sd_path!r}\n"
        f"    c.model.vision.blip2_dir = {cfg.model.vision.blip2_dir!r}\n    c.model.lora.enabled = True\n"
        f"    c.model.init_from = {str(ckpt)!r}\n    c.model.frozen_dtype = 'bfloat16'\n    return c\n")
    argv = ["export_official", f"--config={config_file}"]
    with pytest.raises(CheckpointError, match=r"stage-2 file has no place for 2 of .* e.g. mapper\.fc_out\.bias"):
        export_cli.cli([*argv, f"--checkpoint={tmp_path / 'stage2_run'}", "--stage=2", f"--out={tmp_path / 'x'}"])
    assert not (tmp_path / "x").exists()
    for stage in (1, 2):
        out = tmp_path / f"exported_stage{stage}.ckpt"
        run = f"--checkpoint={tmp_path / 'stage2_vist'}"
        keys = export_cli.cli([*argv, run, f"--stage={stage}", f"--out={out}"])
        assert keys == sorted(torch.load(out)["state_dict"])
        with pytest.raises(ValueError, match=r"exists: give --overwrite"):
            export_cli.cli([*argv, run, f"--stage={stage}", f"--out={out}"])
    # a stage-1 run that moved only the new vocab rows stored the whole matrices, the old rows as it held them
    # (here bf16-rounded): the file's old rows are the LLM's own
    vocab = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("embed_tokens"), nnx.PathContains("lm_head")))
    _, held, _ = nnx.split(stage1, vocab, ...)
    held = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), held)
    masks = build.voken_row_masks(stage1, 9)
    for path, var in km.flat_params(held).items():
        var.set_value(var.get_value() + masks[path])
    meta = stage2_run(tmp_path / "stage1_run", held, "")
    (meta / "metadata").write_text(json.dumps(
        {"step": 4, "config": {"model": {"init_from": "", "train_new_rows_only": True}}}))
    out = tmp_path / "from_stage1_run.ckpt"
    export_cli.cli([*argv, f"--checkpoint={tmp_path / 'stage1_run'}", "--stage=1", f"--out={out}",
                    "--config.model.init_from="])
    exported = torch.load(out)["state_dict"]
    for key, path, rows in (("model.llama_model.model.embed_tokens.weight", "llm.model.embed_tokens.embedding",
                             lambda a: a), ("model.llama_model.lm_head.weight", "llm.lm_head.kernel", lambda a: a.T)):
        file, llm = exported[key].numpy(), rows(np.asarray(want[path].get_value()))
        np.testing.assert_array_equal(file[:-9], llm[:-9])
        np.testing.assert_array_equal(file[-9:], rows(np.asarray(km.flat_params(held)[path].get_value()))[-9:])
        assert np.abs(llm[:-9] - rows(np.asarray(km.flat_params(held)[path].get_value()))[:-9]).max() > 0
    # the config must be the run's in what its weights depend on (here the stage-1 weights it started from)
    with pytest.raises(ValueError, match=r"stage1_run was trained with model.init_from='' \(this config: '.*"):
        export_cli.cli([*argv, f"--checkpoint={tmp_path / 'stage1_run'}", "--stage=1", f"--out={out}.2"])
    official = build.build_model(cfg).model
    import_official(official, tmp_path / "exported_stage1.ckpt", tmp_path / "exported_stage2.ckpt")
    got = km.flat_params(nnx.state(official, nnx.Param))
    moved = km.flat_params(trained)
    for p in [p for p in want if p.startswith("mapper.") or "embed_tokens" in p or "lm_head" in p]:
        offset = -3.0 if p in moved else 0.0
        np.testing.assert_array_equal(np.asarray(got[p].get_value()), np.asarray(want[p].get_value()) + offset,
                                      err_msg=p)


def test_a_run_loads_with_the_config_it_recorded(demo_root, tmp_path, monkeypatch):
    """`InterleavedGenerator.from_pretrained(run)` (and infer.py / export_official without --config) builds the
    model the run's recorded config describes, with its best step's params, and generates; a given config is
    checked against that one, and a record that cannot describe the model is refused, saying why."""
    from mg5jax.generation import GenerationSettings, InterleavedGenerator, Prompt

    cfg = demo_config(demo_root, tmp_path / "run")
    model = build.build_model(cfg).model
    _, mapper, _ = nnx.split(model, nnx.All(nnx.Param, nnx.PathContains("mapper")), ...)
    meta = stage2_run(tmp_path / "run", jax.tree.map(lambda x: x + 0.25, mapper), "")
    (meta / "metadata").write_text(json.dumps({"step": 4, "config": {**cfg.to_dict(), "schedule": {}}}))
    assert build.run_config(str(tmp_path / "run")).to_dict() == cfg.to_dict()  # sequences as tuples again
    settings = GenerationSettings(max_new_tokens=4, num_inference_steps=2, max_images=1, length_buckets=(64,))
    gen = InterleavedGenerator.from_pretrained(tmp_path / "run", settings=settings)
    assert (gen.settings.image_size, gen.input_image_size) == (cfg.data.output_image_size, cfg.data.input_image_size)
    got = km.flat_params(nnx.state(gen.model, nnx.Param))
    for p, v in km.flat_params(mapper).items():
        np.testing.assert_array_equal(np.asarray(got[p].get_value()), np.asarray(v.get_value()) + 0.25, err_msg=p)
    # re-laid for decoding, LoRA folded in
    assert any(".qkv_proj." in p for p in got) and not any("lora" in p for p in got)
    (r,) = gen([Prompt("###Human: a red square ###Assistant:", seed=1)])
    assert r.token_ids and all(image.shape == (64, 64, 3) for image in r.images)
    other = demo_config(demo_root, tmp_path / "run")
    other.model.lora.enabled = False
    with pytest.raises(ValueError, match=r"run was trained with model.lora.enabled=True \(this config: False\)"):
        InterleavedGenerator.from_pretrained(tmp_path / "run", config=other)
    # a relative path is taken from where train.py ran, which it records
    relative = {**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "llm_path": "weights/llm"}}
    (meta / "metadata").write_text(json.dumps({"step": 4, "config": {**relative, "cwd": str(demo_root)}}))
    assert build.run_config(str(tmp_path / "run")).model.llm_path == str(demo_root / "weights" / "llm")
    build.check_run_config(cfg, str(tmp_path / "run"))  # the config's absolute path is that one
    (meta / "metadata").write_text(json.dumps({"step": 4, "config": {**relative, "cwd": str(tmp_path)}}))
    with pytest.raises(FileNotFoundError, match=rf"model.llm_path: directory not found: {tmp_path}/weights/llm \(as "
                                                rf".*run recorded it, a relative path taken from {tmp_path}, where its "
                                                r"train.py ran: give the config with the paths as they are now\)"):
        build.run_config(str(tmp_path / "run"))
    with pytest.raises(ValueError, match=rf"run was trained with model.llm_path='{tmp_path}/weights/llm'"):
        build.check_run_config(cfg, str(tmp_path / "run"))
    (meta / "metadata").write_text(json.dumps({"step": 4, "config": relative}))  # a record without the folder
    monkeypatch.chdir(demo_root)
    assert build.run_config(str(tmp_path / "run")).model.llm_path == "weights/llm"
    (meta / "metadata").write_text(json.dumps({"step": 4, "config": {"model": {"init_from": ""}}}))
    with pytest.raises(CheckpointError, match=r"run_dir .*run: its recorded config lacks \d+ fields of "
                                              r"configs/base.py, e.g. data\..* give the config it was trained with"):
        InterleavedGenerator.from_pretrained(tmp_path / "run")
    (meta / "metadata").write_text(json.dumps({"step": 4}))
    with pytest.raises(CheckpointError, match=r"--checkpoint .*run: records no config"):
        build.run_config(str(tmp_path / "run"))


def test_sample_hook_writes_stories_from_the_current_weights(demo_root, tmp_path, monkeypatch, caplog):
    """trainer.sample_every: the first validation prompts generated with the trainer's weights (on its
    2 data × 4 fsdp mesh), written as <workdir>/samples/step_<N>/index.html."""
    cfg = demo_config(demo_root, tmp_path / "run", sample_every=1, mesh={"data": 2, "fsdp": 4, "tensor": 1})
    cfg.data.val_path = str(demo_root / "data" / "VIST" / "val_cleaned.json")
    cfg.sample_prompts = 2
    built = build.build_model(cfg)
    trainer = Trainer(built.model, TrainerConfig.from_dict(cfg.trainer.to_dict()),
                      update_masks=build.voken_row_masks(built.model, built.num_new_rows))
    on_sample = build.sample_hook(cfg, built, trainer)
    on_sample(7)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(build, "write_outputs", disk_full)
    on_sample(8)  # a failed sample is a warning; the run goes on
    assert "step 8: sample generation failed, training goes on (OSError: No space left" in caplog.text
    trainer.close()
    index = tmp_path / "run" / "samples" / "step_000007" / "index.html"
    html = index.read_text()
    assert html.count("<article") == 2 and "MiniGPT-5 at step 7" in html
    records = [json.loads((index.parent / f"{i:03d}" / "record.json").read_text()) for i in range(2)]
    assert [len(r["input_images"]) for r in records] == [0, 1] and all(r["reference_image"] for r in records)
    cfg.data.val_path = ""
    assert build.sample_hook(cfg, built, trainer) is None  # nothing to generate from: a warning, no hook


def test_stage1_samples_show_the_sd_baseline_of_the_caption(demo_root, tmp_path, monkeypatch):
    """With the caption loss's text encoder (stage 1, CC3M), samples carry SD's image of the caption,
    made by a pipeline on the model's own U-Net, VAE and text encoder."""
    from mg5jax.generation import interleaved

    made = []
    init = interleaved.InterleavedGenerator.__init__
    monkeypatch.setattr(interleaved.InterleavedGenerator, "__init__",
                        lambda self, *a, **kw: (made.append(kw), init(self, *a, **kw))[1])
    cfg = demo_config(demo_root, tmp_path / "run", sample_every=1)
    cfg.data.kind = "cc3m"
    cfg.data.train_path = str(demo_root / "data" / "CC3M" / "cc3m_train.tsv")
    cfg.data.val_path = str(demo_root / "data" / "CC3M" / "cc3m_val.tsv")
    cfg.loss.caption_weight = 0.1
    cfg.sample_prompts = 2
    built = build.build_model(cfg)
    trainer = Trainer(built.model, TrainerConfig.from_dict(cfg.trainer.to_dict()), devices=jax.devices()[:1])
    build.sample_hook(cfg, built, trainer)(3)
    trainer.close()
    folder = tmp_path / "run" / "samples" / "step_000003"
    records = [json.loads((folder / f"{i:03d}" / "record.json").read_text()) for i in range(2)]
    assert all(r["caption"] for r in records)
    for i, r in enumerate(records):  # a baseline exactly where the response has an image
        assert (r["sd_baseline"] is not None) == bool(r["images"])
        assert (folder / f"{i:03d}" / "sd_baseline.png").is_file() == bool(r["images"])
    (kw,) = made
    assert kw["settings"].sd_baseline and kw["sd_pipeline"].text_encoder is built.model.text_encoder
    assert kw["sd_pipeline"].unet is built.model.unet


def test_stage1_trains_on_captions_without_a_vision_encoder(demo_root, tmp_path):
    """configs/stage1_cc3m.py's model has no vision encoder and its batches no image slots (CC3M has no
    input images): they trace through the train step."""
    from configs import stage1_cc3m

    cfg = demo_config(demo_root, tmp_path / "run")
    real = stage1_cc3m.get_config()
    cfg.model.vision.kind = real.model.vision.kind
    cfg.data.kind, cfg.loss.caption_weight = real.data.kind, real.loss.caption_weight
    cfg.data.max_input_images = real.data.max_input_images
    cfg.data.train_path = str(demo_root / "data" / "CC3M" / "cc3m_train.tsv")
    built = build.build_model(cfg)
    samples = build.read_samples("cc3m", cfg.data.train_path, test=False, seed=0, strict=True)
    builder = build.make_builder(cfg, built, 2, train=True)
    batch = next(iter(pipeline.make_dataset(samples, builder, seed=0)))
    assert "input_images" not in batch and builder.skipped == 0
    assert batch["input_image_features"].shape[:2] == batch["input_image_mask"].shape == (2, 0)  # no image slots
    trainer = Trainer(built.model, TrainerConfig.from_dict(cfg.trainer.to_dict()), devices=jax.devices()[:1])
    placed = trainer._place_batch(batch)
    with jax.set_mesh(trainer.mesh):
        terms = trainer._train_step.eval_shape(trainer._params, trainer._opt_state, trainer._frozen, placed,
                                               np.int32(0))[2]
    trainer.close()
    assert {"text_loss", "image_loss", "caption_loss"} <= set(terms)


def test_training_refuses_a_v_prediction_stable_diffusion(demo_root, tmp_path):
    """The loss's target is the noise (as the original's); a v-prediction scheduler config is refused
    by name before any weights load."""
    import shutil

    sd = tmp_path / "sd"
    shutil.copytree(demo_root / "weights" / "sd", sd)
    config_file = sd / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    cfg = demo_config(demo_root, tmp_path / "run")
    cfg.model.sd_path = str(sd)
    with pytest.raises(ValueError, match=r"scheduler_config.json \(model.sd_path\): unsupported "
                                         r"prediction_type='v_prediction'; supported: \['epsilon'\]"):
        build.build_model(cfg, train=True)


def test_stage2_without_stage1_weights_is_refused():
    """Stage 2 freezes the mapper's fc and queries: without model.init_from they would stay random."""
    from configs import stage1_cc3m, stage2_vist

    cfg = stage2_vist.get_config()
    build.check_frozen_mapper_is_loaded(cfg)  # runs/stage1_cc3m gives them
    cfg.unlock()
    cfg.model.init_from = ""
    with pytest.raises(ValueError, match=r"model.init_from is empty, but trainer.optimizer.trainable freezes 5 "
                                         r"mapper params \(e.g. mapper.decoder_queries\)"):
        build.check_frozen_mapper_is_loaded(cfg)
    build.check_frozen_mapper_is_loaded(stage1_cc3m.get_config())  # stage 1 trains the whole mapper


def test_a_training_file_without_samples_says_why(tmp_path):
    from mg5jax.data.datasets import DataError

    tsv = tmp_path / "cc3m_train.tsv"
    tsv.write_text("caption\timage_path\n")
    assert build.read_samples("cc3m", str(tsv), test=False, seed=0, strict=False) == []
    with pytest.raises(DataError, match=r"data.train_path .*cc3m_train.tsv: no samples \(records read: 0, "
                                        r"skipped: 0; an empty file\?\)"):
        build.read_samples("cc3m", str(tsv), test=False, seed=0, strict=False, field="data.train_path", required=True)


def test_without_a_vision_encoder_the_features_folder_sets_the_query_count(demo_root, tmp_path, caplog):
    """model.vision.kind='none': input images are precomputed features, whose query count the model takes
    (the demo's BLIP-2 has 4 queries, not the real Q-Former's 32); validation prompts with input images
    are left out of generation, before --limit / sample_prompts is applied."""
    features = tmp_path / "features"
    features.mkdir()
    cfg = demo_config(demo_root, tmp_path / "run")
    cfg.model.vision.kind = "none"
    cfg.data.input_features_dir = str(features)
    cfg.data.val_path = str(demo_root / "data" / "VIST" / "val_cleaned.json")
    width = json.loads((demo_root / "weights" / "llm" / "config.json").read_text())["hidden_size"]
    np.save(features / "1.npy", np.zeros((3, width), np.float32))
    built = build.build_model(cfg)
    assert built.model.config.num_query_tokens == 3
    assert build.make_builder(cfg, built, 2, train=True).spec.num_query_tokens == 3
    prompts = build.generation_prompts(cfg, built.tokenizer, limit=2, seed=10)
    assert [p.images for p in prompts] == [(), ()] and [p.seed for p in prompts] == [10, 11]
    assert "have more input images than this model reads (model.vision.kind='none')" in caplog.text
    # with a vision encoder, the tasks with more input images than data.max_input_images are left out
    cfg.model.vision.kind, cfg.data.max_input_images = "blip2", 1
    prompts = build.generation_prompts(cfg, built.tokenizer, limit=10, seed=0)
    assert prompts and max(len(p.images) for p in prompts) == 1
    # a VIST task's turn is its image alone: its name is kept, and it has no text of its own
    assert all(p.task.endswith("-gen") and p.reference_text is None for p in prompts)
    assert "have more input images than this model reads (data.max_input_images=1)" in caplog.text
    # and so are the tasks with an image that cannot be read (a dataset's may not): the next ones take their place
    shutil.copytree(demo_root / "data" / "VIST", tmp_path / "VIST")
    cfg.data.val_path = str(tmp_path / "VIST" / "val_cleaned.json")
    first = build.generation_prompts(cfg, built.tokenizer, limit=3, seed=0)
    pathlib.Path(first[0].reference_image).write_bytes(b"<html>not found</html>")
    prompts = build.generation_prompts(cfg, built.tokenizer, limit=2, seed=0)
    bad = first[0].reference_image
    assert len(prompts) == 2 and [p.seed for p in prompts] == [0, 1] and prompts[0].text != first[0].text
    assert not [p for p in prompts if bad in (*p.images, p.reference_image)]
    assert "generation task " in caplog.text
    assert "left out: cannot read image " + first[0].reference_image in caplog.text


def test_mmdialog_prompts_keep_the_task_and_the_dataset_reply(demo_root, samples_dir, tmp_path):
    """What scoring against MMDialog needs (REFERENCE §9.3): each prompt's task name and the dataset's reply."""
    cfg = demo_config(demo_root, tmp_path / "run")
    cfg.data.kind = "mmdialog"
    cfg.data.val_path = str(samples_dir / "MMDialog" / "test" / "test_conversations.txt")
    prompts = build.generation_prompts(cfg, build.load_tokenizer(cfg), limit=8, seed=0)
    assert prompts[0].task == "0_1-mm" and prompts[0].reference_text.startswith("Stunning photo Pola. One day")
    replies = [p.reference_text for p in prompts if p.reference_text]
    assert len(replies) > 1 and not [r for r in replies if "[IMG" in r or "###" in r or r != r.strip()]


def test_resume_on_the_real_pipeline_and_objective_is_bit_exact(demo_root, tmp_path):
    """4 steps straight against 2, a new process's model, trainer and data iterator, then 2 more: the
    grain iterator's position, the rng per step and the optimizer state make the two bit-identical."""
    def run(workdir, steps):
        cfg = demo_config(demo_root, workdir, save_every=2, mesh=dict(data=1, fsdp=1, tensor=1))
        built = build.build_model(cfg)
        samples = build.read_samples("vist", cfg.data.train_path, test=False, seed=0, strict=True)
        data = pipeline.make_dataset(samples, build.make_builder(cfg, built, 2, train=True), seed=0, num_epochs=None)
        trainer = Trainer(built.model, TrainerConfig.from_dict(cfg.trainer.to_dict()), devices=jax.devices()[:1],
                          update_masks=build.voken_row_masks(built.model, built.num_new_rows))
        result = trainer.fit(pipeline.host_batches(data, built.tokenizer.ids.pad_id), num_steps=steps)
        params = {p: np.asarray(jax.device_get(v)) for p, v in jax.tree_util.tree_leaves_with_path(trainer.params)}
        trainer.close()
        return result, params

    straight, want = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    resumed, got = run(tmp_path / "resumed", 4)
    assert straight.step == resumed.step == 4 and straight.train_metrics == resumed.train_metrics
    assert got.keys() == want.keys() and want
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=jax.tree_util.keystr(path))


def test_the_llm_remat_policy_comes_from_the_config():
    from configs import stage2_vist

    cfg = stage2_vist.get_config()
    assert build.llm_remat(cfg) is True  # recompute everything
    cfg.unlock()
    cfg.model.remat_llm_policy = "dots_with_no_batch_dims_saveable"
    assert build.llm_remat(cfg) == "dots_with_no_batch_dims_saveable"
    cfg.model.remat_llm_policy = "dots_saveable_everywhere"
    with pytest.raises(ValueError, match="model.remat_llm_policy='dots_saveable_everywhere': not a "
                                         "jax.checkpoint_policies name"):
        build.llm_remat(cfg)
    cfg.model.remat_llm = False
    assert build.llm_remat(cfg) is False


def test_accumulation_comes_from_the_effective_batch(caplog):
    from configs import stage2_vist

    cfg = stage2_vist.get_config()  # 48 per update, 2 per device
    with caplog.at_level(logging.WARNING, logger="mg5jax.build"):
        assert build.grad_accum_steps(cfg, 2 * 8) == 3
        assert not caplog.records
        assert build.grad_accum_steps(cfg, 2 * 5) == 4
    assert ("data.effective_batch_size=48 is not a multiple of the global batch 10 (data.per_device_batch_size 2 × 5 "
            "devices): updates average 40 examples instead") in caplog.text
    cfg.trainer.optimizer.grad_accum_steps = 7  # given: taken as it is
    assert build.grad_accum_steps(cfg, 10) == 7


def test_stage_configs_validate_as_often_per_epoch_as_the_original():
    from configs import demo, stage1_cc3m, stage2_vist

    assert build.eval_every(stage1_cc3m.get_config(), 48 * 100 + 7, 48) == 25  # val_check_interval 0.25
    assert build.eval_every(stage2_vist.get_config(), 48 * 100, 48) == 50  # 0.5
    assert build.eval_every(demo.get_config(), 48 * 100, 48) == 150  # its own trainer.eval_every
    assert stage1_cc3m.get_config().val_batches is None  # the whole validation set


def test_train_py_errors_name_the_culprit(demo_root, tmp_path):
    r = _train("--config", "configs/demo.py", "--config.trainer.no_such_field=3")
    assert r.returncode != 0 and "no_such_field" in r.stderr
    r = _train("--config", "configs/demo.py", "--config.loss.group_rows=3")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("train.py: loss.group_rows=3 must divide the batch")
    for override, message in (("--config.trainer.optimizer.trainable=bad",
                               "train.py: trainer.optimizer.trainable[0] must be (regex, multiplier >= 0 | None), "
                               "got 'bad'"),
                              ("--config.trainer..x=3", "train.py: Could not parse 'trainer..x'"),
                              ("--config.data.length_buckets=(128,96)",
                               "train.py: data.length_buckets=(128, 96): expected increasing positive lengths, "
                               "e.g. (96, 128)")):
        r = _train("--config", "configs/demo.py", override)
        assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(message), r.stderr[-300:]
    r = _train("--config", "configs/demo.py", "--config.data.length_buckets=(64,)", "--config.data.length_buckets=(96,)")
    assert r.stderr.strip().splitlines()[-1] == ("train.py: --config.data.length_buckets is given more than once: give "
                                                 "it once (a tuple would join the values, other fields keep the last)")
    typo = tmp_path / "typo.py"  # a config file's own misspelt fields, not only the overrides'
    typo.write_text("from configs import demo\n\n\ndef get_config():\n    c = demo.get_config()\n"
                    "    c.data.trian_path = 'x'\n    c.loss.text_wieght = 5.0\n    return c\n")
    r = _train("--config", str(typo))
    assert r.stderr.strip().splitlines()[-1] == (
        f"train.py: {typo}: sets fields configs/base.py does not have: 'data.trian_path' (did you mean "
        "'data.train_path'?), 'loss.text_wieght' (did you mean 'loss.text_weight'?)"), r.stderr[-300:]
    r = _train("--config", "configs/demo.py", "--config.model.llm_path=/nowhere/llm")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == "train.py: model.llm_path: directory not found: /nowhere/llm"
    bad = tmp_path / "VIST"
    bad.mkdir()
    (bad / "train_cleaned.json").write_text(
        '{"1": [{"caption": "a red square .", "image_id": "7", "sequence_index": 0}]}')
    (bad / "train_image_mapping.json").write_text('{"7": "images/missing.png"}')
    r = _train("--config", "configs/demo.py", f"--config.model.llm_path={demo_root}/weights/llm",
               f"--config.model.sd_path={demo_root}/weights/sd", f"--config.model.vision.blip2_dir={demo_root}/weights/blip2",
               f"--config.data.train_path={bad}/train_cleaned.json", "--config.data.val_path=",
               "--config.data.strict=True", f"--config.trainer.workdir={tmp_path / 'strict_run'}")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: ") and "missing.png" in last, last
    assert "loading" not in r.stderr  # found before any weights load
    assert not (tmp_path / "strict_run").exists()  # and no empty workdir left behind
    # a workdir whose newest checkpoint ran another batch schedule: refused before any weights load
    run = tmp_path / "run"
    (run / "checkpoints" / "4" / "meta").mkdir(parents=True)
    (run / "checkpoints" / "4" / "meta" / "metadata").write_text(
        json.dumps({"step": 4, "config": {"schedule": {"global_batch": 96, "grad_accum_steps": 1, "total_steps": 9}}}))
    r = _train("--config", "configs/demo.py", f"--config.model.llm_path={demo_root}/weights/llm",
               f"--config.model.sd_path={demo_root}/weights/sd", f"--config.model.vision.blip2_dir={demo_root}/weights/blip2",
               f"--config.data.train_path={demo_root}/data/VIST/train_cleaned.json", "--config.data.val_path=",
               f"--config.trainer.workdir={run}")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith(f"train.py: {run} (its newest checkpoint) was trained with another "
                                                 "schedule (global_batch 96 → "), last
    assert "Keep the global batch at 96" in last and "loading" not in r.stderr
    # under data.strict, a bad validation sample stops the run before it trains (and names the file)
    shutil.copytree(demo_root / "data" / "VIST", tmp_path / "bad_val")
    for image in (tmp_path / "bad_val" / "val_images").iterdir():
        image.write_bytes(b"")
    r = _train("--config", "configs/demo.py", f"--config.model.llm_path={demo_root}/weights/llm",
               f"--config.model.sd_path={demo_root}/weights/sd", f"--config.model.vision.blip2_dir={demo_root}/weights/blip2",
               f"--config.data.train_path={demo_root}/data/VIST/train_cleaned.json", "--config.data.strict=True",
               f"--config.data.val_path={tmp_path}/bad_val/val_cleaned.json",
               f"--config.trainer.workdir={tmp_path / 'sv'}", "--config.data.per_device_batch_size=1",  # 8 on 8 devices
               "--config.trainer.num_steps=2", "--config.trainer.optimizer.total_steps=2")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith(f"train.py: data.val_path {tmp_path}/bad_val/val_cleaned.json: "), last
    assert "cannot read image" in last and not (tmp_path / "sv" / "metrics.jsonl").exists()
    # step counts that would train for nothing are refused before the weights load
    r = _train("--config", "configs/demo.py", f"--config.model.llm_path={demo_root}/weights/llm",
               f"--config.model.sd_path={demo_root}/weights/sd", f"--config.model.vision.blip2_dir={demo_root}/weights/blip2",
               f"--config.data.train_path={demo_root}/data/VIST/train_cleaned.json", "--config.data.val_path=",
               f"--config.trainer.workdir={tmp_path / 'long'}", "--config.trainer.num_steps=600")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("train.py: trainer.num_steps=600 runs past the learning-rate "
                                                 "schedule, which ends after trainer.optimizer.total_steps=300"), last
    assert "loading" not in r.stderr
    import train

    cfg = ml_collections.ConfigDict({"val_batches": 2})
    with pytest.raises(ValueError, match=r"num_steps=5 is not a whole number of updates of 3 micro-batches: the last "
                                         r"2 would be computed and never applied \(use 3 or 6\)"):
        train.check_step_counts(cfg, 5, {"grad_accum_steps": 3, "total_steps": None})
    train.check_step_counts(cfg, 6, {"grad_accum_steps": 3, "total_steps": 2})
    cfg.val_batches = 0
    with pytest.raises(ValueError, match=r"val_batches=0: expected at least 1 .*trainer.eval_every=0 turns"):
        train.check_step_counts(cfg, None, {"grad_accum_steps": 1, "total_steps": None})
    (tmp_path / "a_file").write_text("")
    r = _train("--config", "configs/demo.py", f"--config.trainer.workdir={tmp_path / 'a_file'}")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"train.py: trainer.workdir {tmp_path / 'a_file'}: exists and is not a directory"
