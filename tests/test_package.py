"""Import-time behaviour of the package: XLA:CPU defaults, and no torch in a JAX process."""

import io
import logging
import os
import pathlib
import subprocess
import sys

import pytest
from _fixtures_sd import tiny_sd_dir  # noqa: F401  (session fixture)
from fixtures_tokenizer import tiny_tokenizer_dir  # noqa: F401  (session fixture)

import mg5jax

SHOW_FLAGS = "import os, mg5jax; print(os.environ.get('XLA_FLAGS', ''))"


def _flags_after_import(xla_flags: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", SHOW_FLAGS], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("given, expected", [
    (None, f"{mg5jax.YNN_FLAG}=reduce"),
    ("--xla_force_host_platform_device_count=2", f"--xla_force_host_platform_device_count=2 {mg5jax.YNN_FLAG}=reduce"),
    (f"{mg5jax.YNN_FLAG}=dot", f"{mg5jax.YNN_FLAG}=dot"),  # a user's own setting wins
])  # fmt: skip
def test_import_routes_only_reductions_to_ynnpack(given, expected):
    assert _flags_after_import(given) == expected


def test_a_backend_started_before_the_import_keeps_its_flags():
    """XLA reads its flags once: setting them later would only mislabel stored programs."""
    script = "import jax, os; jax.devices(); import mg5jax; print(os.environ.get('XLA_FLAGS', ''))"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_this_process_runs_with_the_default():
    assert f"{mg5jax.YNN_FLAG}=reduce" in os.environ["XLA_FLAGS"]


def test_training_and_generation_code_loads_tokenizers_without_torch(tiny_tokenizer_dir: pathlib.Path,  # noqa: F811
                                                                     tiny_sd_dir: pathlib.Path):  # noqa: F811
    """transformers' auto classes import torch (~230 MiB resident) when it is installed; we never need it."""
    code = (
        "import sys\n"
        "import mg5jax.build, mg5jax.training.trainer, mg5jax.generation.interleaved, mg5jax.data.pipeline\n"
        "from mg5jax.data.tokenization import MiniGPT5Tokenizer\n"
        "from mg5jax.diffusion import StableDiffusionPipeline\n"
        f"MiniGPT5Tokenizer.from_pretrained({str(tiny_tokenizer_dir)!r})\n"
        f"StableDiffusionPipeline.from_pretrained({str(tiny_sd_dir)!r})\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("sizes", [dict(data=-1, fsdp=0), dict(data=-1, fsdp=-2), dict(data=-1, tensor=-1)])
def test_mesh_sizes_below_one_are_named(sizes):
    from mg5jax import parallel

    with pytest.raises(ValueError, match="mesh axis sizes must be >= 1, one of them may be -1"):
        parallel.make_mesh(**sizes)


def test_log_lines_keep_clear_of_progress_bars(monkeypatch):
    """A record logged while a bar is drawn gets its own line; the bar is drawn again below it."""
    from tqdm import tqdm

    from mg5jax import cli

    console = io.StringIO()
    monkeypatch.setattr(sys, "stderr", console)
    inner = logging.StreamHandler(console)
    inner.setLevel(logging.INFO)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [inner])
    monkeypatch.setattr(root, "level", logging.INFO)
    cli.logs_above_progress_bars()
    cli.logs_above_progress_bars()  # a second call wraps nothing twice
    assert len(root.handlers) == 1 and root.handlers[0].inner is inner
    with tqdm(total=4, desc="generating", file=console, ascii=True, ncols=60) as bar:
        bar.update(1)
        logging.getLogger("mg5jax.test").info("rendered 2 images")
        logging.getLogger("mg5jax.test").debug("not shown")
        bar.update(1)
    lines = console.getvalue().replace("\r", "\n").split("\n")
    assert "rendered 2 images" in lines, lines  # alone on its line, not after the bar's text
    assert "not shown" not in console.getvalue()
    assert any(line.startswith("generating:  50%") for line in lines[lines.index("rendered 2 images"):])
