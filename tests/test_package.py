"""Import-time XLA:CPU defaults of the package."""

import os
import subprocess
import sys

import pytest

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


def test_this_process_runs_with_the_default():
    assert f"{mg5jax.YNN_FLAG}=reduce" in os.environ["XLA_FLAGS"]
