"""`make demo`: build the tiny weights and data, train the demo config, write an HTML story.

Everything is offline and sized for a laptop CPU; each stage is a normal entry point, so the demo
runs exactly what a user runs: `python -m mg5jax.tiny`, `python train.py`, `python infer.py`.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path("outputs/demo")


def _run(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def main() -> None:
    _run("-m", "mg5jax.tiny", "--root", str(ROOT))
    _run("train.py", "--config", "configs/demo.py")
    if pathlib.Path("infer.py").is_file():
        _run("infer.py", "--config", "configs/demo.py", "--out", str(ROOT / "stories"))
        print(f"\nopen {(ROOT / 'stories' / 'index.html').absolute()} to read the generated stories")
    print(f"training run: {(ROOT / 'run').absolute()} (checkpoints/, metrics.jsonl)")


if __name__ == "__main__":
    main()
