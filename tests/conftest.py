"""Test setup: 8 simulated CPU devices, the persistent compile cache, shared tiny reference models."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the configs/ package, as train.py sees it
SAMPLES = REPO.parent / "shared" / "data" / "minigpt5-samples"

jax.config.update("jax_compilation_cache_dir", str(REPO / ".cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def samples_dir() -> pathlib.Path:
    """The real-format MiniGPT-5 sample data beside the checkout; skip when it is absent."""
    if not SAMPLES.is_dir():
        pytest.skip(f"sample data not found at {SAMPLES} (it lives in ../shared beside the repo)")
    return SAMPLES
