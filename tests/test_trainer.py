"""The Trainer on a toy model: sharded steps equal single-device steps, bit-exact resume, NaN stop,
SIGTERM save, validation / sample hooks, metrics file, and clear errors for a corrupt checkpoint."""

import dataclasses
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _fixtures_training import DIM, RULES, VOCAB, VOKEN_ROWS, ToyIterator, ToyModel, make_batch, voken_row_mask
from _multiprocess import run_two_processes
from mg5jax.convert.sources import CheckpointError
from mg5jax.training.checkpoint import Checkpointer, read_params, trained_params_dir
from mg5jax.training.optimizer import OptimizerConfig
from mg5jax.training.trainer import (MeshConfig, NonFiniteLossError, Trainer, TrainerConfig, deterministic_ops_enabled,
                                     request_deterministic_ops)

OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=20, trainable=RULES)


def flat(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def initial_state():
    return nnx.state(ToyModel(rngs=nnx.Rngs(0)))


def toy_model(initial_state) -> ToyModel:
    """A fresh toy model with the shared initial weights (the trainer mutates and donates its model)."""
    model = nnx.eval_shape(lambda: ToyModel(rngs=nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(lambda x: np.asarray(x).copy(), initial_state))
    return model


def make_trainer(initial_state, workdir, mesh=MeshConfig(data=2, fsdp=4), devices=None, **overrides):
    cfg = TrainerConfig(workdir=str(workdir), optimizer=OPT, mesh=mesh, log_every=2, **overrides)
    return Trainer(toy_model(initial_state), cfg, devices=devices, update_masks={"embed": voken_row_mask()})


def test_sharded_step_matches_single_device(tmp_path, initial_state):
    meshes = {
        "1 device": (MeshConfig(data=1), jax.devices()[:1]),
        "2 data x 4 fsdp": (MeshConfig(data=2, fsdp=4), None),
        "4 fsdp x 2 tensor": (MeshConfig(data=1, fsdp=4, tensor=2), None),
    }
    results = {}
    for name, (mesh, devices) in meshes.items():
        trainer = make_trainer(initial_state, tmp_path / name.replace(" ", "_"), mesh, devices)
        losses = [trainer.train_step(make_batch(i))["loss"] for i in range(2)]  # the 1st update has lr 0
        results[name] = losses, flat(trainer.params), trainer.model
        trainer.close()
    base_losses, base_params, base_model = results["1 device"]
    initial = flat(initial_state)
    for name, (losses, params, model) in results.items():
        np.testing.assert_allclose(losses, base_losses, rtol=0, atol=1e-5, err_msg=name)
        err = max(float(np.max(np.abs(params[k] - base_params[k]))) for k in base_params)
        print(f"{name}: loss err {np.max(np.abs(np.subtract(losses, base_losses))):.1e}, params max-abs err {err:.1e}")
        assert err <= 1e-5, name
        assert set(params) == {"embed", "head.kernel", "head.bias", "norm.scale", "norm.bias"}
        full = flat(nnx.state(model))
        for k in ("backbone.kernel", "backbone.bias"):
            np.testing.assert_array_equal(full[k], initial[k], err_msg=f"{name}: frozen {k} moved")
        rows = np.r_[VOKEN_ROWS]
        np.testing.assert_array_equal(np.delete(full["embed"], rows, 0), np.delete(initial["embed"], rows, 0))
        assert not np.allclose(full["head.kernel"], initial["head.kernel"])
    kernel = results["4 fsdp x 2 tensor"][2].head.kernel.get_value()
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_resume_after_kill_is_bit_exact(tmp_path, initial_state):
    straight = make_trainer(initial_state, tmp_path / "straight", save_every=0)
    result = straight.fit(ToyIterator(), num_steps=6)
    assert result.step == 6 and not result.preempted
    straight.close()
    first = make_trainer(initial_state, tmp_path / "resumed", save_every=3)
    first.fit(ToyIterator(), num_steps=5)
    first.close()  # the "killed" process: nothing but its checkpoint of step 3 survives,
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "5")
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:  # and what it logged after it
        f.write(json.dumps({"step": 4, "split": "train", "loss": 1.0}) + '\n{"step": 5, "spl')
    data = ToyIterator()
    second = make_trainer(initial_state, tmp_path / "resumed", save_every=3)
    result = second.fit(data, num_steps=6)
    assert result.step == 6 and data.index == 6
    for name, got, want in (("params", second.params, straight.params), ("opt", second.opt_state, straight.opt_state)):
        got, want = flat(got), flat(want)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name} {k}")
    assert second.checkpointer.all_steps() == [3, 6]
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]
    assert {"loss", "text_loss", "image_loss", "caption_loss", "lr", "step_time_s", "samples_per_s"} <= lines[-1].keys()
    # the line of step 4 averages steps 3 and 4 as the straight run's does: the checkpoint carries step 3's terms
    want = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    timing = ("step_time_s", "samples_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in lines] == \
        [{k: v for k, v in r.items() if k not in timing} for r in want]
    second.close()
    # the same numbers as TensorBoard scalars; the resumed run's events hide what a crash left after step 3
    scalars, purges = read_events(tmp_path / "resumed" / "tensorboard")
    steps = [r["step"] for r in lines]
    assert purges == [4] and set(scalars["train/loss"]) - set(steps) == {5}  # the killed run's last line: hidden
    assert {t: scalars["train/loss"][t] for t in steps} == pytest.approx({r["step"]: r["loss"] for r in lines}, rel=1e-6)
    assert {t: scalars["train/lr"][t] for t in steps} == pytest.approx({r["step"]: r["lr"] for r in lines}, rel=1e-6)



def test_a_resumed_metrics_window_is_averaged_over_the_terms_this_run_has(tmp_path, initial_state):
    """A checkpoint between two metrics lines carries the steps since the last; a run resumed with other
    loss terms (a changed weight, another model version) averages the ones every step has."""
    first = make_trainer(initial_state, tmp_path, save_every=3)
    first.fit(ToyIterator(), num_steps=5)
    first.close()
    shutil.rmtree(tmp_path / "checkpoints" / "5")
    meta_file = tmp_path / "checkpoints" / "3" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert [w["loss"] for w in meta["metrics_window"]] and len(meta["metrics_window"]) == 1  # step 3's
    meta["metrics_window"][0]["old_term"] = 9.0
    meta_file.write_text(json.dumps(meta))
    second = make_trainer(initial_state, tmp_path, save_every=3)
    assert second.fit(ToyIterator(), num_steps=4).step == 4
    second.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["step"] == 4 and "old_term" not in line and "loss" in line

def test_metrics_lines_count_the_samples_the_pipeline_dropped(tmp_path, initial_state):
    """`skipped_samples()` (train.py passes the pipeline's `ExampleBuilder.dropped`): each metrics line
    has the number dropped over its steps, summed; the result has this call's total."""
    data = ToyIterator()
    dropped = {1: 3, 3: 4}  # the pipeline's running count once the batch of step i + 1 is drawn

    def skipped():
        return max((n for i, n in dropped.items() if data.index > i), default=0)

    trainer = make_trainer(initial_state, tmp_path, save_every=0)
    result = trainer.fit(data, num_steps=6, skipped_samples=skipped)
    trainer.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_samples"]) for r in lines] == [(2, 3), (4, 1), (6, 0)]
    assert result.skipped_samples == 4 and "skipped_samples" not in result.train_metrics


def test_image_terms_average_over_the_steps_with_images(tmp_path, initial_state):
    """A model's `weighted_terms` (MiniGPT-5: the image terms, means over a batch's groups with an image):
    over steps or validation batches each step counts by its `image_groups`, a step without images not at
    all (it used to halve a validation's image_loss when one of two batches had no target image)."""
    trainer = make_trainer(initial_state, tmp_path)
    trainer._weighted = {"image_loss": "image_groups"}
    steps = [{"loss": 1.0, "image_loss": 0.8, "image_groups": 3.0, "skipped_samples": 2},
             {"loss": 3.0, "image_loss": 0.0, "image_groups": 0.0, "skipped_samples": 1},
             {"loss": 2.0, "image_loss": 0.4, "image_groups": 1.0, "skipped_samples": 0}]
    assert trainer._means(steps) == pytest.approx({"loss": 2.0, "image_loss": (0.8 * 3 + 0.4) / 4,
                                                   "image_groups": 4 / 3, "skipped_samples": 3})
    assert trainer._means(steps[1:2])["image_loss"] == 0.0  # no image anywhere: nothing to average
    trainer.close()


def read_events(folder: pathlib.Path) -> tuple[dict[str, dict[int, float]], list[int]]:
    """`{tag: {step: value}}` of the TensorBoard event files in `folder` (later files win) and the steps
    from which a restarted writer hides older events, read with tensorboardX's protos and CRC (the
    reference: our writer encodes both by hand). TFRecord framing: length, crc, data, crc."""
    import struct

    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto import event_pb2

    def masked(data):
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    scalars, purges = {}, []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            record = data[i + 12:i + 12 + n]
            assert struct.unpack("<II", data[i + 8:i + 12] + data[i + 12 + n:i + 16 + n]) == (
                masked(data[i:i + 8]), masked(record)), path
            event = event_pb2.Event.FromString(record)
            i += 16 + n
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                purges.append(event.step)
    return scalars, purges


def test_resume_with_another_batch_schedule_is_refused(tmp_path, initial_state):
    """Say a run saved at step 2 on 8 devices resumes on 4 with twice the accumulation: its step 2 would
    mean other batches and learning rates, so it stops, naming both schedules."""
    def trainer(schedule):
        opt = dataclasses.replace(OPT, grad_accum_steps=schedule["grad_accum_steps"])
        cfg = TrainerConfig(workdir=str(tmp_path), optimizer=opt, mesh=MeshConfig(data=2, fsdp=4), save_every=2)
        return Trainer(toy_model(initial_state), cfg, update_masks={"embed": voken_row_mask()},
                       run_config={"schedule": schedule})

    first = trainer({"global_batch": 8, "grad_accum_steps": 1, "total_steps": 4})
    first.fit(ToyIterator(), num_steps=2)
    first.close()
    # accumulation also gives the optimizer state another structure: the schedule is checked before restoring
    second = trainer({"global_batch": 4, "grad_accum_steps": 2, "total_steps": 4})
    with pytest.raises(ValueError, match=r"step 2 was trained with another schedule \(global_batch 8 → 4, "
                                         r"grad_accum_steps 1 → 2\): its steps would mean other batches"):
        second.fit(ToyIterator(), num_steps=4)
    second.close()
    # another num_steps (train.py derives total_steps from it): the hint keeps the schedule, or says how to go on
    third = trainer({"global_batch": 8, "grad_accum_steps": 1, "total_steps": 6})
    with pytest.raises(ValueError, match=r"another schedule \(total_steps 4 → 6\): .* add "
                                         r"--config.trainer.optimizer.total_steps=4; to train longer, start a new "
                                         r"trainer.workdir \(with model.init_from"):
        third.fit(ToyIterator(), num_steps=6)
    third.close()


def test_nan_stops_keeps_last_good_checkpoint_and_corrupt_resume_names_path(tmp_path, initial_state):
    trainer = make_trainer(initial_state, tmp_path, save_every=2)
    with pytest.raises(NonFiniteLossError, match=r"non-finite .*loss.* at step 5 .*last good checkpoint is step 4"):
        trainer.fit(ToyIterator(nan_at=4), num_steps=10)
    assert trainer.checkpointer.all_steps() == [2, 4]
    restored = trainer.checkpointer.restore(trainer.params, trainer.opt_state)
    assert restored.step == 4 and restored.data_state == {"index": 4}
    assert set(flat(restored.params)) == {"embed", "head.kernel", "head.bias", "norm.scale", "norm.bias"}  # no frozen
    assert all(np.isfinite(v).all() for v in flat(restored.params).values())
    trainer.close()
    # a malformed data-iterator position: an error naming the file, with the way back to step 2
    state_file = tmp_path / "checkpoints" / "4" / "data_state" / "metadata"
    good = state_file.read_text()
    for stored, message in (({"per_process": {"0": {"json": {"foo": 1}}}},
                             "data_state: the data iterator refuses the saved position (KeyError"),
                            ({"per_process": []}, "data_state: per_process must map process indices to states"),
                            ({"per_process": {"0": {"bytes": "!!!notbase64"}}}, "data_state: process 0's state does "
                                                                                  "not decode"),
                            (None, "data_state: no data-iterator state (found NoneType)"),
                            ({"per_process": {"0": {"json": None}}}, ": has no data-iterator state")):
        state_file.write_text(json.dumps(stored))
        resumed = make_trainer(initial_state, tmp_path)
        with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'checkpoints' / '4'}"
                                                            f"{'' if message.startswith(':') else '/'}{message}") + ".*; to "
                           f"resume from the older checkpoint 2, move {re.escape(str(tmp_path / 'checkpoints' / '4'))} away"):
            resumed.fit(ToyIterator(), num_steps=10)
        resumed.close()
    state_file.write_text(good)
    (tmp_path / "checkpoints" / "4" / "opt_state" / "_METADATA").write_text("{truncated")
    resumed = make_trainer(initial_state, tmp_path)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'checkpoints' / '4'}: cannot restore .*; to resume from "
                                              f"the older checkpoint 2, move {tmp_path / 'checkpoints' / '4'} away"):
        resumed.fit(ToyIterator(), num_steps=10)
    resumed.close()


def test_a_truncated_array_file_is_named(tmp_path):
    """TensorStore's own message gives only the index read; the error names the array and the file's fault."""
    params = nnx.State({"embed": nnx.Param(jnp.arange(4096, dtype=jnp.float32))})
    checkpointer = Checkpointer(tmp_path, async_save=False)
    checkpointer.save(1, params=params, opt_state=params, data_state={"index": 1})
    data = max((tmp_path / "1" / "params").rglob("ocdbt.process_*/d/*"), key=lambda f: f.stat().st_size)
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / '1'}: cannot restore training checkpoint (") +
                       r'.*; caused by .*Error reading "embed\.value/0".*not valid for value of size'):
        checkpointer.restore(params, params)


def test_an_array_saved_with_another_shape_is_named(tmp_path, initial_state):
    """A checkpoint whose optimizer kept full-size moments for the embedding (an elementwise mask), resumed
    by a run whose row mask keeps its 4 voken rows only: the error names the array and both shapes."""
    cfg = TrainerConfig(workdir=str(tmp_path), optimizer=OPT, mesh=MeshConfig(data=1), async_checkpointing=False)
    elementwise = np.broadcast_to(voken_row_mask(), (VOCAB, DIM)).copy()
    first = Trainer(toy_model(initial_state), cfg, devices=jax.devices()[:1], update_masks={"embed": elementwise})
    first.train_step(make_batch(0))
    first.save()
    first.close()
    second = Trainer(toy_model(initial_state), cfg, devices=jax.devices()[:1],
                     update_masks={"embed": voken_row_mask()})
    with pytest.raises(CheckpointError, match=re.escape(
            f"opt_state.2.mu.embed.value was saved with shape ({VOCAB}, {DIM}), and this run's is (4, {DIM})") + ".*"
            + re.escape("; the older checkpoints have the same layout: use a new trainer.workdir")):
        second.restore_latest()
    second.close()
    # with the settings that differ recorded, they are named (not an older checkpoint: it has the same layout)
    cfg = dataclasses.replace(cfg, workdir=str(tmp_path / "recorded"))
    first = Trainer(toy_model(initial_state), cfg, devices=jax.devices()[:1], update_masks={"embed": elementwise},
                    run_config={"mask": "elementwise"})
    first.train_step(make_batch(0))
    first.save()
    first.close()
    second = Trainer(toy_model(initial_state), cfg, devices=jax.devices()[:1],
                     update_masks={"embed": voken_row_mask()}, run_config={"mask": "rows"})
    with pytest.raises(CheckpointError, match=r"saved with shape .*; this run's settings differ from the "
                                              r"checkpoint's \(mask: 'elementwise' -> 'rows'\)"):
        second.restore_latest()
    second.close()


def test_ctrl_c_saves_and_stops_and_a_changed_setting_is_named_on_resume(tmp_path, initial_state, caplog):
    def trainer(weight):
        cfg = TrainerConfig(workdir=str(tmp_path), optimizer=OPT, mesh=MeshConfig(data=2, fsdp=4), save_every=100,
                            sample_every=1)
        return Trainer(toy_model(initial_state), cfg, update_masks={"embed": voken_row_mask()},
                       run_config={"loss": {"weight": weight}, "workdir": str(tmp_path)})

    first = trainer(1.0)
    handler_before = signal.getsignal(signal.SIGINT)

    def on_sample(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    result = first.fit(ToyIterator(), on_sample=on_sample, num_steps=10)
    first.close()
    assert result.preempted and result.stop_signal == signal.SIGINT and result.step == 3
    assert first.checkpointer.latest_step() == 3
    assert signal.getsignal(signal.SIGINT) == handler_before
    again = trainer(0.5)
    with caplog.at_level(logging.WARNING, logger="mg5jax.training.trainer"):
        assert again.restore_latest() == 3
    assert "differ from the checkpoint's: loss.weight: 1.0 -> 0.5" in caplog.text
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a process started to ignore SIGINT (`cmd &` in a script)
    try:
        assert set(again._install_stop_handlers()) == {signal.SIGTERM}
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, handler_before)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    again.close()
    # another trainable set gives the state another structure: the error names the changed settings
    # instead of pointing at an older checkpoint (which has the same structure)
    cfg = TrainerConfig(workdir=str(tmp_path), optimizer=dataclasses.replace(OPT, trainable=RULES[1:]),
                        mesh=MeshConfig(data=2, fsdp=4))
    other = Trainer(toy_model(initial_state), cfg, run_config={"loss": {"weight": 1.0}, "workdir": str(tmp_path),
                                                               "rules": "without embed"})
    with pytest.raises(CheckpointError, match=r"cannot restore .*; this run's settings differ from the "
                                              r"checkpoint's \(rules: None -> 'without embed'\)"):
        other.restore_latest()
    other.close()


def test_sigterm_saves_and_returns_with_eval_and_sample_hooks(tmp_path, initial_state):
    trainer = make_trainer(initial_state, tmp_path, save_every=100, eval_every=2, sample_every=2)
    samples = []

    def on_sample(step):
        samples.append(step)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    handler_before = signal.getsignal(signal.SIGTERM)
    result = trainer.fit(ToyIterator(), eval_data=lambda: [make_batch(100), make_batch(101)],
                         on_sample=on_sample, num_steps=10)
    assert result.preempted and result.step == 4 and samples == [2, 4]
    assert trainer.checkpointer.latest_step() == 4
    assert set(result.eval_metrics) == {"loss", "text_loss", "image_loss", "caption_loss"}
    again = trainer.evaluate([make_batch(100), make_batch(101)])
    assert again == result.eval_metrics  # deterministic validation rng
    assert signal.getsignal(signal.SIGTERM) == handler_before
    with pytest.raises(ValueError, match=r"batch leaf \['\w+'\]: batch size 6 is not divisible by data × fsdp = 8"):
        trainer.train_step(make_batch(0, batch_size=6))
    trainer.close()
    # a step's validation and samples come before its checkpoint: a run killed between them redoes the step
    trainer = make_trainer(initial_state, tmp_path / "order", save_every=2, eval_every=2, sample_every=2,
                           async_checkpointing=False)
    seen = []

    def validation_data():
        seen.append(("eval", trainer.step, trainer.checkpointer.latest_step()))
        return [make_batch(100)]

    trainer.fit(ToyIterator(), eval_data=validation_data, num_steps=4,
                on_sample=lambda step: seen.append(("sample", step, trainer.checkpointer.latest_step())))
    assert seen == [("eval", 2, None), ("sample", 2, None), ("eval", 4, 2), ("sample", 4, 2)]
    trainer.close()
    # so are the final weights', a stop signal in the last step included (a resume at the end does nothing)
    trainer = make_trainer(initial_state, tmp_path / "last", save_every=0, eval_every=2, sample_every=1,
                           async_checkpointing=False)
    seen = []

    def stop_in_the_last_step(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    result = trainer.fit(ToyIterator(), eval_data=validation_data, num_steps=5, on_sample=stop_in_the_last_step)
    assert result.preempted and seen == [("eval", 2, None), ("eval", 4, None), ("eval", 5, None)]
    assert trainer.checkpointer.latest_step() == 5
    trainer.close()
    # a stop signal during a validation cuts it short (a whole-set one may outlast a preemption's grace
    # period); the checkpoint says it is still to do, and the resumed run does it before training on
    def interrupted_validation():
        seen.append(("eval", trainer.step))
        yield make_batch(100)
        if trainer.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        yield from (make_batch(101), make_batch(102))

    seen = []
    trainer = make_trainer(initial_state, tmp_path / "cut", save_every=0, eval_every=2, async_checkpointing=False)
    result = trainer.fit(ToyIterator(), eval_data=interrupted_validation, num_steps=8)
    assert result.preempted and result.step == 4 and seen == [("eval", 2), ("eval", 4)]
    loss_at_4 = trainer.evaluate([make_batch(100)])["loss"]
    trainer.close()
    lines = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "eval"] == [2]
    seen = []
    trainer = make_trainer(initial_state, tmp_path / "cut", save_every=0, eval_every=2, async_checkpointing=False)
    trainer.fit(ToyIterator(), eval_data=lambda: seen.append(("eval", trainer.step)) or [make_batch(100)],
                num_steps=6)
    assert seen == [("eval", 4), ("eval", 6)]
    lines = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    step4 = [r for r in lines if r["split"] == "eval" and r["step"] == 4]
    assert len(step4) == 1 and step4[0]["loss"] == loss_at_4  # the step-4 weights, as restored
    trainer.close()
    for field, value, expected in (("log_every", 0, "at least 1"), ("keep_checkpoints", 0, "at least 1"),
                                   ("eval_every", -1, "0 \\(off\\) or more")):
        with pytest.raises(ValueError, match=rf"trainer.{field}={value}: expected {expected}"):
            TrainerConfig(workdir=str(tmp_path), **{field: value})


def test_a_stop_signal_on_one_host_stops_every_host_after_the_same_step(tmp_path):
    """SIGTERM reaching process 0 alone: both processes stop after the same step and save it together
    (each stopping on its own, one waited in the checkpoint for the other, which waited in the next step).
    The samples both hosts' pipelines drop are counted together."""
    script = (
        "import os, signal\n"
        "from flax import nnx\n"
        "from _fixtures_training import RULES, ToyIterator, ToyModel, voken_row_mask\n"
        "from mg5jax.training.optimizer import OptimizerConfig\n"
        "from mg5jax.training.trainer import MeshConfig, Trainer, TrainerConfig\n"
        "opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=20, trainable=RULES)\n"
        f"cfg = TrainerConfig(workdir={str(tmp_path)!r}, optimizer=opt, mesh=MeshConfig(data=2), save_every=0, "
        "sample_every=1, log_every=1, async_checkpointing=False)\n"
        "t = Trainer(ToyModel(rngs=nnx.Rngs(0)), cfg, update_masks={'embed': voken_row_mask()})\n"
        "def hook(step):\n"
        "    if step in (3, 5) and jax.process_index() == 0:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "calls = [0]\n"
        "def skipped():\n"  # process 0's pipeline drops 1 sample a step, process 1's 2
        "    calls[0] += 1\n"
        "    return calls[0] * (jax.process_index() + 1)\n"
        "r = t.fit(ToyIterator(batch_size=4), num_steps=8, on_sample=hook, skipped_samples=skipped)\n"
        "print('stopped', r.step, r.preempted, t.checkpointer.latest_step(), 'skipped', r.skipped_samples)\n"
        "r = t.fit(ToyIterator(batch_size=4), num_steps=5, on_sample=hook)\n"  # a signal in the last step
        "t.close()\n"
        "print('stopped', r.step, r.preempted, t.checkpointer.latest_step())\n")
    outs = run_two_processes("import sys; sys.path.insert(0, 'tests')\n" + script, timeout=240)
    assert [out.strip().splitlines()[-2:] for out in outs] == [["stopped 3 True 3 skipped 9", "stopped 5 True 5"]] * 2
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_samples"] for r in lines if r["step"] <= 3] == [3, 3, 3]  # both hosts' drops, each step


def test_best_validation_step_is_kept_and_chosen_for_the_next_stage(tmp_path, initial_state):
    opt = OptimizerConfig(learning_rate=0.3, warmup_steps=1, total_steps=8, trainable=RULES)  # a bumpy val loss
    cfg = TrainerConfig(workdir=str(tmp_path), optimizer=opt, mesh=MeshConfig(data=2, fsdp=4), save_every=0,
                        eval_every=1, sample_every=1)
    trainer = Trainer(toy_model(initial_state), cfg, update_masks={"embed": voken_row_mask()})
    params_at = {}
    trainer.fit(ToyIterator(), eval_data=lambda: [make_batch(100)], num_steps=8,
                on_sample=lambda step: params_at.setdefault(step, flat(trainer.params)))
    trainer.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["loss"] for r in lines if r["split"] == "eval"}
    best_step = min(val, key=val.get)
    print("val loss by step", {k: round(v, 4) for k, v in val.items()}, "best", best_step)
    assert best_step != max(val), "the test needs a run whose last validation is not its best"
    params_dir, chosen = trained_params_dir(tmp_path, "model.init_from")
    assert params_dir == tmp_path / "best" / str(best_step) / "params" and f"step {best_step}" in chosen
    stored = flat_stored(read_params(params_dir))
    assert stored.keys() == params_at[best_step].keys()
    for k, v in params_at[best_step].items():
        np.testing.assert_array_equal(stored[k], v, err_msg=k)
    final = make_trainer(initial_state, tmp_path / "final", save_every=0, eval_every=3)
    final.fit(ToyIterator(), eval_data=lambda: [make_batch(100)], num_steps=8)
    final.close()
    lines = [json.loads(line) for line in (tmp_path / "final" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "eval"] == [3, 6, 8]  # the final weights are a candidate
    # a fresh run in a workdir with an earlier run's records (its checkpoints gone) moves them aside
    earlier = (tmp_path / "final" / "metrics.jsonl").read_text()
    shutil.rmtree(tmp_path / "final" / "checkpoints")
    again = make_trainer(initial_state, tmp_path / "final", save_every=0)
    again.fit(ToyIterator(), num_steps=2)
    again.close()
    assert (tmp_path / "final" / "metrics.earlier_1.jsonl").read_text() == earlier
    assert any((tmp_path / "final" / "tensorboard.earlier_1").iterdir())  # its events too
    assert [json.loads(line)["step"] for line in (tmp_path / "final" / "metrics.jsonl").read_text().splitlines()] == [2]
    again = Trainer(toy_model(initial_state), cfg, update_masks={"embed": voken_row_mask()})
    assert again.best.val_loss == pytest.approx(val[best_step], rel=1e-6)  # a resumed run keeps the bar
    assert not again.best.offer(9, val[best_step], again.params)
    again.close()
    shutil.copytree(tmp_path / "best", tmp_path / "fresh" / "best")  # an earlier run's best/, no checkpoints/
    fresh = make_trainer(initial_state, tmp_path / "fresh", save_every=0)
    assert fresh.best.val_loss == pytest.approx(val[best_step], rel=1e-6)
    assert fresh.restore_latest() is None and fresh.best.val_loss is None  # a fresh run sets its own bar
    fresh.close()
    # and never hands on the earlier best (say it does not validate): moved aside, not lost
    assert not (tmp_path / "fresh" / "best").exists() and (tmp_path / "fresh" / "best.earlier_1" / str(best_step)).is_dir()
    shutil.rmtree(tmp_path / "best")  # a run without validation: its newest checkpoint, and no best/
    make_trainer(initial_state, tmp_path, save_every=0).close()
    assert not (tmp_path / "best").exists()
    params_dir, chosen = trained_params_dir(tmp_path, "model.init_from")
    assert params_dir == tmp_path / "checkpoints" / "8" / "params" and "newest" in chosen
    with pytest.raises(FileNotFoundError, match=r"model.init_from: no such directory: .*nowhere"):
        trained_params_dir(tmp_path / "nowhere", "model.init_from")
    with pytest.raises(FileNotFoundError, match=r"no checkpoints/ directory in .*params \(give a run's directory"):
        trained_params_dir(tmp_path / "checkpoints" / "8" / "params", "--checkpoint")  # a step's folder


def test_params_saved_on_another_device_count_load(tmp_path):
    """A run trained on 16 devices (fsdp-sharded) is read by a process with 8: read_params gives host arrays."""
    script = (
        "import jax, jax.numpy as jnp; from jax.sharding import NamedSharding, PartitionSpec as P; from flax import nnx\n"
        "from mg5jax.training.checkpoint import BestCheckpoint\n"
        "mesh = jax.make_mesh((16,), ('fsdp',))\n"
        "x = jax.device_put(jnp.arange(32.0).reshape(16, 2), NamedSharding(mesh, P('fsdp')))\n"
        f"b = BestCheckpoint({str(tmp_path / 'best')!r}, async_save=False)\n"
        "b.offer(5, 1.0, nnx.State({'mapper': {'w': nnx.Param(x)}})); b.close()\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=16", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                       cwd=pathlib.Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    params_dir, _ = trained_params_dir(tmp_path, "model.init_from")
    stored = flat_stored(read_params(params_dir))
    np.testing.assert_array_equal(stored["mapper.w"], np.arange(32.0).reshape(16, 2))
    assert isinstance(stored["mapper.w"], np.ndarray) and jax.device_count() == 8


def test_every_host_keeps_its_own_data_position(tmp_path):
    """Two real JAX processes (gloo collectives on CPU) at different iterator positions: the checkpoint
    holds both, and each process gets its own back (orbax writes the JSON from the primary only)."""
    script = (
        "import json, pathlib\n"
        "from mg5jax.training import checkpoint as ck\n"
        "i = jax.process_index()\n"
        "stored = {'per_process': ck._every_process({'next_index': 4 + 2 * i, 'host': 'h' * (i + 1)})}\n"
        "print(json.dumps([stored, ck._this_process(stored, pathlib.Path('ck'))]))\n")
    results = [json.loads(out.strip().splitlines()[-1]) for out in run_two_processes(script)]
    both = {"0": {"json": {"next_index": 4, "host": "h"}}, "1": {"json": {"next_index": 6, "host": "hh"}}}
    assert all(stored == {"per_process": both} for stored, _ in results)
    assert [mine for _, mine in results] == [{"next_index": 4, "host": "h"}, {"next_index": 6, "host": "hh"}]
    from mg5jax.training import checkpoint

    assert checkpoint._this_process({"json": {"next_index": 3}}, tmp_path) == {"next_index": 3}  # older checkpoints
    with pytest.raises(CheckpointError, match=r"no data-iterator state for process 0 \(it was saved by 1 processes\)"):
        checkpoint._this_process({"per_process": {"1": {"json": {}}}}, tmp_path)


def flat_stored(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """An orbax-restored nnx.State dict as {dotted path: array}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and set(v) != {"value"}:
            out.update(flat_stored(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = np.asarray(v["value"] if isinstance(v, dict) else v)
    return out


def test_config_from_nested_dict():
    cfg = TrainerConfig.from_dict({"workdir": "/tmp/x", "mesh": {"data": 2, "fsdp": 4},
                                   "optimizer": {"learning_rate": 1e-4, "trainable": [[r"mapper\..*", 10.0]]}})
    assert cfg.mesh == MeshConfig(data=2, fsdp=4) and cfg.optimizer.trainable == ((r"mapper\..*", 10.0),)
    with pytest.raises(ValueError, match="TrainerConfig.mesh: unknown key 'model'"):
        TrainerConfig.from_dict({"workdir": "/tmp/x", "mesh": {"model": 2}})



def test_deterministic_gpu_ops_are_asked_for_before_jax_starts(monkeypatch):
    """A bit-exact resume on GPU needs XLA's deterministic ops (on an H200 the real-pipeline resume test
    differs in the 7th digit without them). XLA reads its flags once: the request works only before JAX
    starts, and a user's own setting of the flag wins."""
    code = ("import os\nfrom mg5jax.training.trainer import request_deterministic_ops\n"
            "print(request_deterministic_ops(), os.environ['XLA_FLAGS'])\n"
            "import jax, jax.numpy as jnp\nprint(float(jnp.ones(3).sum()))")
    for flags, want in (("", "True"), ("--xla_gpu_deterministic_ops=false", "False")):
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           cwd=pathlib.Path(__file__).resolve().parents[1])
        assert r.returncode == 0, r.stderr[-2000:]
        requested, *given = r.stdout.split("\n")[0].split()
        assert requested == want and given.count("--xla_gpu_deterministic_ops=true") == (want == "True")
        assert r.stdout.split("\n")[1] == "3.0"  # XLA takes the flag
    jax.devices()  # started here: the flag would come too late
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert request_deterministic_ops() is False and os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops")
    assert request_deterministic_ops() is True and deterministic_ops_enabled()
    assert TrainerConfig(workdir="w").deterministic

class DropoutModel(nnx.Module):
    """loss = mean(dropout(w * x)): exactly mean(w * x) when dropout is off."""

    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(np.ones((64,), np.float32), out_sharding=("embed",))
        self.drop = nnx.Dropout(0.5, deterministic=True, rngs=rngs)

    def loss(self, batch, rng):
        return {"loss": jax.numpy.mean(self.drop(self.w[...] * batch["x"]))}


def test_train_steps_run_dropout_and_evaluation_does_not(tmp_path):
    opt = OptimizerConfig(learning_rate=0.0, warmup_steps=0, total_steps=5, trainable=((r"w", 1.0),))
    cfg = TrainerConfig(workdir=str(tmp_path), optimizer=opt, mesh=MeshConfig(data=1), save_every=0, eval_every=0)
    trainer = Trainer(DropoutModel(nnx.Rngs(0, dropout=1)), cfg, devices=jax.devices()[:1])
    batch = {"x": np.ones((4, 64), np.float32)}
    losses = [trainer.train_step(batch)["loss"] for _ in range(3)]
    assert all(loss != 1.0 for loss in losses) and len(set(losses)) == 3  # a fresh mask every step
    assert trainer.evaluate([batch])["loss"] == 1.0
    trainer.close()

    again = Trainer(DropoutModel(nnx.Rngs(0, dropout=1)), cfg, devices=jax.devices()[:1])
    assert again.train_step(batch)["loss"] == losses[0]  # masks follow the step, not the process
    again.close()


def test_logged_grad_norm_leaves_out_what_the_masks_zero(tmp_path, initial_state):
    """The update masks apply to the gradients first: entries they zero (old vocab rows) count toward no
    clipping norm, nor toward the logged grad_norm (a micro-step's)."""
    opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=20, trainable=((r"embed", 1.0),
                                                                                           (r".*", None)))
    cfg = TrainerConfig(workdir=str(tmp_path), optimizer=opt, mesh=MeshConfig(data=1), log_every=2)
    norms = {}
    for name, mask in (("no mask", None), ("all rows masked", np.zeros((16, 1), np.float32))):
        trainer = Trainer(toy_model(initial_state), cfg, devices=jax.devices()[:1],
                          update_masks=None if mask is None else {"embed": mask})
        norms[name] = trainer.train_step(make_batch(0))["grad_norm"]
        trainer.close()
    assert norms["no mask"] > 0 and norms["all rows masked"] == 0.0
