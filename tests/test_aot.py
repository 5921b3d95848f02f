"""mg5jax.aot: compiled programs stored on disk and loaded by a later process without tracing."""

import dataclasses
import functools
import json
import logging
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mg5jax import aot

REPO = pathlib.Path(__file__).resolve().parents[1]

# Run twice in fresh interpreters: a tiny LLaMA decodes greedily and by sampling (the decode loop's two
# programs, one with a donated state and typed PRNG keys), and a toy program counts its traces and runs
# on one device and on a 2x4 mesh whose devices are in reverse order.
SCRIPT = """
import json, logging, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from mg5jax import aot
preloading = aot.preload("script")
from mg5jax.generation import SamplingConfig, generate
from mg5jax.models.llama import LlamaConfig, LlamaForCausalLM

traces = []
def scaled(factor, x, y):
    traces.append(1)
    return {"out": x * factor + y.sum()}
program = aot.Program(scaled, static_argnums=(0,), donate_argnums=(1,), persist=True)
x = jnp.arange(6.0).reshape(2, 3)
out = program(2.0, x, jnp.ones(4))
cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
ids = np.array([[5, 9, 12, 3], [7, 8, 0, 0]], np.int32)
mask = ids > 0
greedy = generate(model, input_ids=ids, prompt_mask=mask, config=SamplingConfig(max_new_tokens=6))
sampled = generate(model, input_ids=ids, prompt_mask=mask, key=jax.random.key(3),
                   config=SamplingConfig(do_sample=True, top_k=5, max_new_tokens=6))
mesh = jax.sharding.Mesh(np.array(jax.devices()[::-1]).reshape(2, 4), ("data", "fsdp"))  # devices reversed
spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "fsdp"))
grid = jax.device_put(np.arange(32.0).reshape(4, 8), spec)
placed = program(3.0, grid, jnp.zeros(2))
if preloading is not None:
    preloading.join()
print(json.dumps({"preloaded": preloading is not None, "left": len(aot._PRELOADED), "traces": len(traces), "donated": x.is_deleted(), "out": np.asarray(out["out"]).tolist(),
                  "greedy": np.asarray(greedy.ids).tolist(), "sampled": np.asarray(sampled.ids).tolist(),
                  "sharded": np.asarray(placed["out"]).tolist(), "sharding_kept": placed["out"].sharding == spec}))
"""


ENV = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def _run(cache: pathlib.Path) -> tuple[dict, str]:
    script = cache / "script.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(cache)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **ENV}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_a_second_process_loads_the_programs_without_tracing(tmp_path):
    first, log1 = _run(tmp_path)
    second, log2 = _run(tmp_path)  # the same script file: the same program keys
    assert first["traces"] == 2 and second["traces"] == 0  # one device, then the mesh
    assert not first["preloaded"] and second["preloaded"] and second["left"] == 0  # all six loaded early, all used
    assert first == {**second, "traces": 2, "preloaded": False}
    assert log2.count("mg5jax.aot:preloaded ") == 6 and "mg5jax.aot:kernel warm-up in" in log2
    assert first["donated"] and second["donated"]  # donation survives serialization
    assert first["out"] == [[4.0, 6.0, 8.0], [10.0, 12.0, 14.0]]
    assert first["sharded"] == (np.arange(32.0).reshape(4, 8) * 3).tolist() and second["sharding_kept"]
    for name in ("scaled", "_start", "_advance"):
        assert f"{name}: traced and compiled" in log1
        assert f"{name}: preloaded from" in log2
    names = sorted(p.name.split("-")[0] for p in (tmp_path / "programs").glob("*.bin"))
    assert names == ["_advance", "_advance", "_start", "_start", "scaled", "scaled"]  # greedy/sampling, 1/8 devices


@pytest.fixture
def cache_dir(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    yield tmp_path / "programs"
    jax.config.update("jax_compilation_cache_dir", before)


@dataclasses.dataclass(frozen=True, slots=True)
class _Slotted:
    a: int
    b: tuple


@dataclasses.dataclass(frozen=True, slots=True)
class _SlottedList(list):  # its items are pickled too
    a: int


def test_the_key_pickler_writes_pickles_bytes():
    """Static arguments are keyed by their pickle, written by a faster pickler: the bytes must be
    `pickle.dumps`'s, for a model's graph as for other values."""
    from flax import nnx

    from mg5jax.generation import SamplingConfig
    from mg5jax.models.llama import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    graphdef, _ = nnx.split(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    items = _SlottedList(1)
    items.append("x")
    for obj in (graphdef, cfg, SamplingConfig(max_new_tokens=3, stop_sequences=((1, 2),)), _Slotted(1, (2, "x")),
                (np.dtype("float32"), jnp.bfloat16, 1.5, None, complex(1, 2)), LlamaForCausalLM, _double_plus,
                items):
        assert aot._pickled(obj) == pickle.dumps(obj, protocol=5), obj


EXITS_EARLY = """
import sys
import jax
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
from mg5jax import aot
print(aot.preload("script") is not None, flush=True)
raise SystemExit("the weights are missing")
"""


def test_a_process_that_exits_while_programs_preload_exits_as_it_meant(tmp_path):
    """The preload thread is inside XLA when the interpreter exits: without joining it, the process
    aborted (SIGABRT) and lost its own exit status and message."""
    _run(tmp_path)  # stores programs and their preload list
    script = tmp_path / "exits_early.py"
    script.write_text(EXITS_EARLY)
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                              cwd=REPO, env={**os.environ, **ENV}, timeout=300)
        assert (proc.stdout, proc.returncode, proc.stderr.strip().splitlines()[-1]) == \
            ("True\n", 1, "the weights are missing")


def _double_plus(k, x):
    return x * 2 + k


def _apply(f, x):
    return f(x)


def test_every_static_value_shape_and_dtype_has_its_own_program(cache_dir):
    program = aot.Program(_double_plus, static_argnums=(0,), persist=True)
    for k, x in [(1, np.ones(3, np.float32)), (2, np.ones(3, np.float32)), (1, np.ones(4, np.float32)),
                 (1, np.ones(3, np.int32)), (1, np.ones(3, np.float32))]:
        np.testing.assert_array_equal(program(k, x), x * 2 + k)
    assert len(list(cache_dir.iterdir())) == 4
    fresh = aot.Program(_double_plus, static_argnums=(0,), persist=True)  # same function: finds the stored ones
    np.testing.assert_array_equal(fresh(2, np.ones(3, np.float32)), np.full(3, 4.0))
    assert len(list(cache_dir.iterdir())) == 4


def test_a_corrupt_program_file_is_replaced(cache_dir, caplog):
    aot.Program(_double_plus, static_argnums=(0,), persist=True)(3, np.ones(2, np.float32))
    (path,) = cache_dir.iterdir()
    path.write_bytes(b"not a program")
    with caplog.at_level(logging.WARNING, logger="mg5jax.aot"):
        out = aot.Program(_double_plus, static_argnums=(0,), persist=True)(3, np.ones(2, np.float32))
    np.testing.assert_array_equal(out, [5.0, 5.0])
    assert "ignoring unreadable compiled program" in caplog.text and str(path) in caplog.text
    fresh = aot.Program(_double_plus, static_argnums=(0,), persist=True)
    np.testing.assert_array_equal(fresh(3, np.ones(2, np.float32)), [5.0, 5.0])  # the rewritten file loads


def test_closures_lambdas_and_unpicklable_static_arguments_stay_in_memory(cache_dir):
    program = aot.Program(_apply, static_argnums=(0,), persist=True)
    np.testing.assert_array_equal(program(lambda v: v + 1, np.zeros(2, np.float32)), [1.0, 1.0])  # unpicklable
    table = jnp.arange(3.0)

    def add_table(x):  # its constant would be baked into the program
        return x + table

    np.testing.assert_array_equal(aot.Program(add_table, persist=True)(np.ones(3, np.float32)), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(aot.Program(lambda x: x * 3, persist=True)(np.ones(2, np.float32)), [3.0, 3.0])
    assert not cache_dir.exists() or not list(cache_dir.iterdir())


@dataclasses.dataclass(frozen=True)
class _Scale:  # a static argument whose class lives in the stored function's own (digested) module
    k: float

    def __call__(self, x):
        return x * self.k


def _scale_by(settings, x):
    return x * settings.k


def test_static_arguments_that_refer_to_other_code_stay_in_memory(cache_dir):
    """ml_collections is in no key: pickle names its class without its code, so the program is not stored.
    A class of the stored function's own module is keyed by that file's digest."""
    import ml_collections

    settings = ml_collections.FrozenConfigDict({"k": 3.0})
    program = aot.Program(_scale_by, static_argnums=(0,), persist=True)
    np.testing.assert_array_equal(program(settings, np.ones(2, np.float32)), [3.0, 3.0])
    assert not cache_dir.exists() or not list(cache_dir.iterdir())
    program = aot.Program(_apply, static_argnums=(0,), persist=True)
    np.testing.assert_array_equal(program(_Scale(3.0), np.ones(2, np.float32)), [3.0, 3.0])
    assert len(list(cache_dir.iterdir())) == 1


def test_static_values_of_other_types_and_another_context_are_other_programs(cache_dir):
    """As `jax.jit`: 1, 1.0 and True are different static arguments; the default device is part of the key."""
    program = aot.Program(_double_plus, static_argnums=(0,), persist=True)
    x = np.ones(2, np.int32)
    assert [program(k, x).dtype for k in (1, 1.0, True, 1)] == [jnp.int32, jnp.float32, jnp.int32, jnp.int32]
    assert len(program._compiled) == len(list(cache_dir.iterdir())) == 3
    assert program(1.0, x).devices() == {jax.devices()[0]}
    with jax.default_device(jax.devices()[1]):
        assert program(1.0, x).devices() == {jax.devices()[1]}


def test_partials_stay_in_memory_and_negative_argument_numbers_are_refused(cache_dir):
    np.testing.assert_array_equal(aot.Program(functools.partial(_double_plus, 2), persist=True)(np.ones(2, np.float32)),
                                  [4, 4])
    assert not cache_dir.exists()
    with pytest.raises(ValueError, match="argument numbers must be >= 0"):
        aot.Program(_double_plus, static_argnums=(-2,))


def test_mg5jax_aot_0_keeps_programs_in_memory(cache_dir, monkeypatch):
    monkeypatch.setenv("MG5JAX_AOT", "0")
    program = aot.Program(_double_plus, static_argnums=(0,), persist=True)
    np.testing.assert_array_equal(program(1, np.ones(2, np.float32)), [3, 3])
    assert not cache_dir.exists()


def test_without_a_cache_directory_nothing_is_written(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        program = aot.Program(_double_plus, static_argnums=(0,), persist=True)
        np.testing.assert_array_equal(program(1, np.ones(2, np.float32)), [3.0, 3.0])
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_least_recently_used_programs_go_when_the_store_is_full(cache_dir, monkeypatch):
    program = aot.Program(_double_plus, static_argnums=(0,), persist=True)
    program(1, np.ones(2, np.float32))
    (first,) = cache_dir.iterdir()
    program(1, np.ones(3, np.float32))
    (second,) = set(cache_dir.iterdir()) - {first}
    os.utime(first, (1_000, 1_000))
    os.utime(second, (2_000, 2_000))
    aot.Program(_double_plus, static_argnums=(0,), persist=True)(1, np.ones(2, np.float32))  # loads `first`
    monkeypatch.setattr(aot, "MAX_BYTES", first.stat().st_size + second.stat().st_size + 1024)  # room for two
    program(1, np.ones(4, np.float32))  # a third program: the store is over its limit
    assert first.exists() and not second.exists() and len(list(cache_dir.iterdir())) == 2


def test_what_is_stored_and_under_which_key(cache_dir):
    """Functions from outside mg5jax are stored only when made `persist` (a helper they call in another
    file is in no key); donation is part of the key (a loaded program must not delete a caller's array)."""
    np.testing.assert_array_equal(aot.Program(_double_plus, static_argnums=(0,))(1, np.ones(2, np.float32)), [3, 3])
    assert not cache_dir.exists()
    aot.Program(_double_plus, static_argnums=(0,), persist=True)(1, jnp.ones(2))
    keep = jnp.ones(2)
    aot.Program(_double_plus, static_argnums=(0,), donate_argnums=(1,), persist=True)(1, jnp.ones(2))
    np.testing.assert_array_equal(aot.Program(_double_plus, static_argnums=(0,), persist=True)(1, keep), [3, 3])
    assert not keep.is_deleted() and len(list(cache_dir.iterdir())) == 2


def test_an_unwritable_store_keeps_programs_in_memory(cache_dir, caplog):
    cache_dir.parent.mkdir(exist_ok=True)
    cache_dir.write_text("a file where the store's folder should be")  # mkdir fails, as on a read-only mount
    with caplog.at_level(logging.WARNING, logger="mg5jax.aot"):
        out = aot.Program(_double_plus, static_argnums=(0,), persist=True)(1, np.ones(2, np.float32))
    np.testing.assert_array_equal(out, [3.0, 3.0])
    assert "cannot store the compiled program" in caplog.text


def test_equal_static_arguments_made_anew_do_not_pile_up(cache_dir):
    program = aot.Program(_double_plus, static_argnums=(0,), persist=True)
    for _ in range(aot._HELD + 20):
        program(np.float64(1.5), np.ones(2, np.float32))  # an equal static argument, a new object each call
    assert len(program._by_id) == aot._HELD and len(program._compiled) == 1
    assert len(aot._DIGESTS) <= aot._HELD
    program = aot.Program(_double_plus, static_argnums=(0,), persist=True)
    for _ in range(10):
        program(float("2.5"), np.ones(2, np.float32))  # a plain value: found by value
    assert len(program._by_id) == 1


def test_preload_loads_what_the_last_run_used_and_falls_back_on_anything_amiss(cache_dir, monkeypatch, caplog):
    monkeypatch.setattr(aot, "_RECORD", {})
    monkeypatch.setattr(aot, "_PRELOADED", {})
    x = np.ones(2, np.float32)
    assert aot.preload("run") is None  # no list yet; this run's programs are recorded
    aot.Program(_double_plus, static_argnums=(0,), persist=True)(1, x)
    listing = cache_dir / "run.json"
    recorded = json.loads(listing.read_text())
    (name,) = recorded["programs"]
    assert name.startswith("_double_plus-") and (cache_dir / name).is_file()

    aot.preload("run").join()
    assert list(aot._PRELOADED) == [cache_dir / name]
    np.testing.assert_array_equal(aot.Program(_double_plus, static_argnums=(0,), persist=True)(1, x), [3, 3])
    assert not aot._PRELOADED  # taken by the program that asked for it

    listing.write_text(json.dumps({**recorded, "environment": "another installation"}))
    assert aot.preload("run") is None and not aot._PRELOADED
    listing.write_text("{not json")
    assert aot.preload("run") is None

    listing.write_text(json.dumps(recorded))
    (cache_dir / name).write_bytes(b"not a program")
    aot.preload("run").join()
    with caplog.at_level(logging.WARNING, logger="mg5jax.aot"):
        out = aot.Program(_double_plus, static_argnums=(0,), persist=True)(1, x)
    np.testing.assert_array_equal(out, [3, 3])  # compiled anew
    assert "ignoring unreadable compiled program" in caplog.text


def _noisy_sum(x, key, absent, unused):
    """A program with a donated argument, a typed PRNG key, a None and an argument it does not use."""
    del absent, unused
    return x * 2 + jax.random.uniform(key, x.shape)


def test_a_loaded_program_runs_once_on_zeros_unless_its_arguments_are_too_large(cache_dir, monkeypatch):
    """What preload does on an accelerator with each program it loads, run here on CPU."""
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    x = jax.device_put(np.ones((8, 4), np.float32), jax.sharding.NamedSharding(mesh, jax.P("data", "fsdp")))
    program = aot.Program(_noisy_sum, donate_argnums=(0,), persist=True)
    expected = program(x.copy(), jax.random.key(1), None, np.ones(3, np.int32))
    (path,) = cache_dir.glob("_noisy_sum-*.bin")
    compiled = aot._read(path)
    assert aot._run_once(compiled)
    out = compiled(x.copy(), jax.random.key(1), None, np.ones(3, np.int32))  # still runs as stored
    np.testing.assert_array_equal(out, expected)
    monkeypatch.setattr(aot, "RUN_ONCE_MAX_BYTES", 8 * 4 * 4 - 1)  # x alone is 128 bytes
    assert not aot._run_once(aot._read(path))


def test_preload_runs_programs_first_on_an_accelerator_until_a_caller_asks(cache_dir, monkeypatch):
    monkeypatch.setattr(aot, "_RECORD", {})
    monkeypatch.setattr(aot, "_PRELOADED", {})
    x = np.ones(2, np.float32)
    assert aot.preload("accelerator") is None
    for k in (1, 2):
        aot.Program(_double_plus, static_argnums=(0,), persist=True)(k, x)
    ran = []

    def run_once(compiled):  # a caller asks for a program while the first one runs
        ran.append(compiled)
        aot._ASKED.set()
        return True

    monkeypatch.setattr(aot, "_run_once", run_once)
    aot.preload("accelerator").join()  # on CPU: loaded, not run
    assert not ran and len(aot._PRELOADED) == 2
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    aot._PRELOADED.clear()
    aot.preload("accelerator").join()  # a new preload runs first again, until the caller asked
    assert len(ran) == 1 and len(aot._PRELOADED) == 2
    monkeypatch.undo()
    np.testing.assert_array_equal(aot.Program(_double_plus, static_argnums=(0,), persist=True)(2, x), [4, 4])
