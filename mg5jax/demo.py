"""`make demo`: build the tiny weights and data, train the demo config, write an HTML story.

Everything is offline and sized for a laptop CPU; each stage is a normal entry point, so the demo
runs exactly what a user runs: `python -m mg5jax.tiny`, `python train.py`, `python infer.py`.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path("outputs/demo")


def _run(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def write_prompts(path: pathlib.Path, limit: int = 6) -> pathlib.Path:
    """Story-continuation prompts ("Tell me the next scene with image.") from the validation stories,
    each with the story's own next image for comparison."""
    from mg5jax.data.datasets import read_vist

    samples, _ = read_vist(str(ROOT / "data" / "VIST" / "val_cleaned.json"), test=False, seed=0)
    picked = [s for s in samples if s.task_name.endswith("-multimodal")][:limit]
    rows = [{"text": s.source, "images": [p for p in s.input_images if p is not None], "seed": i,
             "reference_image": s.output_image} for i, s in enumerate(picked)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    _run("-m", "mg5jax.tiny", "--root", str(ROOT))
    _run("train.py", "--config", "configs/demo.py")
    prompts = write_prompts(ROOT / "prompts.jsonl")
    _run("infer.py", "--config", "configs/demo.py", "--prompts", str(prompts), "--out", str(ROOT / "stories"),
         "--steps", "25", "--max_new_tokens", "96", "--overwrite")
    print(f"\ntraining run: {(ROOT / 'run').absolute()} (checkpoints/, best/, samples/, metrics.jsonl, tensorboard/)")
    print(f"open {(ROOT / 'stories' / 'index.html').absolute()} to read the generated stories")


if __name__ == "__main__":
    main()
