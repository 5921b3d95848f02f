"""Orbax training checkpoints: sharded round trip, keep-N, atomicity, clear errors for bad directories."""

import time

import jax
import numpy as np
import pytest
from flax import nnx

from _fixtures_training import RULES, ToyModel
from mg5jax import parallel
from mg5jax.convert.sources import CheckpointError
from mg5jax.training.checkpoint import Checkpointer
from mg5jax.training.optimizer import OptimizerConfig, build_optimizer


@pytest.fixture(scope="module")
def sharded_states():
    """Trainable params and AdamW state of the toy model on a 2×2×2 mesh."""
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    model = parallel.shard_model(ToyModel(rngs=nnx.Rngs(0)), mesh)
    tx, wrt = build_optimizer(model, OptimizerConfig(trainable=RULES))
    optimizer = parallel.shard_model(nnx.Optimizer(model, tx, wrt=wrt), mesh)
    return nnx.state(model, wrt), nnx.state(optimizer)


def test_round_trip_keep_n_and_sharding(tmp_path, sharded_states):
    params, opt_state = sharded_states
    ckpt = Checkpointer(tmp_path, max_to_keep=2)
    for step in (1, 2, 3):
        bumped = jax.tree.map(lambda x, s=step: x + s, params)
        ckpt.save(step, params=bumped, opt_state=opt_state, data_state={"index": step}, config={"lr": 1e-4})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    restored = ckpt.restore(params, opt_state)
    assert restored.step == 3 and restored.data_state == {"index": 3} and restored.config == {"lr": 1e-4}
    for (path, want), (_, got) in zip(nnx.to_flat_state(params), nnx.to_flat_state(restored.params)):
        np.testing.assert_array_equal(np.asarray(got.get_value()), np.asarray(want.get_value()) + 3)
        assert got.get_value().sharding == want.get_value().sharding, path
    kernel = restored.params["head"]["kernel"].get_value()
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert int(restored.opt_state["step"].get_value()) == 0
    # restore into abstract targets (eval_shape + logical shardings) on another mesh: reshards on load
    mesh = parallel.make_mesh(data=1, fsdp=8)
    abstract_model = nnx.eval_shape(lambda: ToyModel(rngs=nnx.Rngs(0)))
    _, wrt = build_optimizer(abstract_model, OptimizerConfig(trainable=RULES))
    abstract = nnx.state(abstract_model, wrt)
    targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                           parallel.state_shardings(abstract, mesh))
    resharded = ckpt.restore(targets, opt_state, step=2)
    embed = resharded.params["embed"].get_value()
    assert embed.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    np.testing.assert_array_equal(np.asarray(embed), np.asarray(params["embed"].get_value()) + 2)
    window = [{"loss": 1.0}]  # the steps since the last metrics line: the loop goes on appending to its list
    ckpt.save(4, params=params, opt_state=opt_state, data_state=b'{"grain": 1}', metrics_window=window)
    window += [{"loss": 2.0}, {"loss": 3.0}]
    restored = ckpt.restore(params, opt_state, step=4)
    assert restored.data_state == b'{"grain": 1}' and restored.metrics_window == [{"loss": 1.0}]
    ckpt.close()


# tensorstore reads still in flight when the damaged one fails complete after orbax's event loop
# has closed; asyncio reports those as unraisable exceptions
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_interrupted_save_keeps_latest_and_bad_dirs_name_the_path(tmp_path, sharded_states):
    params, opt_state = sharded_states
    empty = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=f"no training checkpoint in {tmp_path}"):
        empty.restore(params, opt_state)
    empty.close()
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(5, params=params, opt_state=opt_state)
    ckpt.close()
    # a process killed mid-save leaves only orbax's temporary directory behind
    tmp = tmp_path / "6.orbax-checkpoint-tmp-1234567"
    (tmp / "params").mkdir(parents=True)
    (tmp / "params" / "manifest.ocdbt").write_bytes(b"partial")
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 5
    assert ckpt.restore(params, opt_state).step == 5
    with pytest.raises(CheckpointError, match="no training checkpoint for step 7"):
        ckpt.restore(params, opt_state, step=7)
    ckpt.close()
    # a checkpoint whose array data is damaged: the error names the step directory
    for f in (tmp_path / "5" / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # OCDBT data files
            data = f.read_bytes()
            f.write_bytes(data[: len(data) // 2] + b"\xff" * (len(data) - len(data) // 2))
    damaged = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=f"{tmp_path / '5'}: cannot restore training checkpoint"):
        damaged.restore(params, opt_state)
    damaged.close()
    time.sleep(0.5)  # let the stragglers finish inside this test
    # a target with another trainable set (e.g. changed rules) does not fit
    other = jax.tree.map(lambda x: x, params)
    del other["norm"]
    ckpt = Checkpointer(tmp_path / "fresh", async_save=False)
    ckpt.save(1, params=params, opt_state=opt_state)
    with pytest.raises(CheckpointError, match="cannot restore training checkpoint"):
        ckpt.restore(other, opt_state)
    ckpt.close()
