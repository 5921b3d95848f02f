"""Generate stories and dialogues with images: `python infer.py --config configs/stage2_vist.py ...`.

Prompts come from `--prompt` (+ `--image`, repeatable), a JSON / JSONL file of
`{"text": ..., "images": [...], "seed": ...}` (`--prompts`), or — by default — the generation
tasks of the config's validation file (VIST / MMDialog / CC3M test samples, REFERENCE §6). Weights:
the best validation step of `--checkpoint` (default: the config's `trainer.workdir`; its newest
checkpoint if it ran no validation), or the official Lightning files (`--official_stage1`,
`--official_stage2`). Without `--config`, the config the `--checkpoint` run recorded is used
(`python infer.py --checkpoint runs/stage2_vist`). Writes PNGs, one JSON record per prompt
and an `index.html` under `--out`; prompts from the validation file show the dataset's image beside the
response, and with `--sd_baseline` CC3M prompts also get Stable Diffusion's image of their caption.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import pathlib
import re
import shlex
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mg5jax.cli import check_config_fields, flags_parser, logs_above_progress_bars

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (ml_collections).", lock_config=True)
_PROMPT = flags.DEFINE_string("prompt", None, "One prompt; use <Img><ImageHere></Img> where an --image goes.")
_IMAGE = flags.DEFINE_multi_string("image", [], "Input image file(s) for --prompt, in order.")
_PROMPTS = flags.DEFINE_string("prompts", None, "A .json list or .jsonl file of {text, images, seed} prompts "
                               "(optional: caption, reference_image, reference_text, task); relative image paths are "
                               "relative to the file.")
_LIMIT = flags.DEFINE_integer("limit", 8, "Prompts taken from the config's validation file.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Run directory of ours (default: trainer.workdir); without "
                                  "--config, the config it recorded is used.")
_STAGE1 = flags.DEFINE_string("official_stage1", None, "Official stage1_cc3m.ckpt (fc, queries, voken rows).")
_STAGE2 = flags.DEFINE_string("official_stage2", None, "Official stage2_*.ckpt on top of --official_stage1.")
_OUT = flags.DEFINE_string("out", "outputs/stories", "Output directory (index.html, run.json, NNN/ per prompt).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the results of an earlier run in --out (its index.html, "
                               "run.json and NNN/ folders); without it such a folder is refused.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the first prompt (prompt i uses seed + i unless it names one); "
                             "a response depends only on its prompt's seed and the settings (up to float "
                             "rounding: in another batch a pixel may differ by one level).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts generated together.")
_STREAM = flags.DEFINE_bool("stream", False, "Print text as it is generated.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Sampled tokens per response.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 2, "Images per response.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance scale.")
_STEPS = flags.DEFINE_integer("steps", 50, "Denoising steps.")
_SCHEDULER = flags.DEFINE_enum("scheduler", "pndm", ["pndm", "ddim", "dpm++2m", "euler"], "Sampler.")
_GREEDY = flags.DEFINE_bool("greedy", False, "Greedy decoding instead of the original's sampling.")
_SD_BASELINE = flags.DEFINE_bool("sd_baseline", False, "Also render Stable Diffusion's image of each prompt's "
                                 "caption beside the response (CC3M prompts; the original's baseline).")

log = logging.getLogger("mg5jax.infer")


def _require_images(images, where: str) -> None:
    """Every image exists and decodes as generation will decode it (checked before any model loads)."""
    from mg5jax.data.images import ImageLoadError, load_image

    for image in images:
        if not pathlib.Path(image).is_file():
            raise FileNotFoundError(f"{where}: image file not found: {image}")
        try:
            load_image(image)
        except ImageLoadError as e:
            raise ValueError(f"{where}: {e}") from e


def check_flags() -> None:
    """Refuse flag combinations and values that would be ignored or fail late (before any model loads)."""
    from mg5jax.convert.sources import check_torch_file
    from mg5jax.generation.report import earlier_results, replaceable

    if _PROMPT.value is not None and _PROMPTS.value is not None:
        raise ValueError("give --prompt or --prompts, not both")
    if _IMAGE.value and _PROMPT.value is None:
        raise ValueError("--image goes with --prompt")
    if _CHECKPOINT.value and _STAGE1.value:
        raise ValueError("give --checkpoint (a run of ours) or --official_stage1, not both")
    if _LIMIT.present and (_PROMPT.value is not None or _PROMPTS.value is not None):
        raise ValueError("--limit takes prompts from the config's validation file: not with --prompt / --prompts")
    if _STAGE2.value and not _STAGE1.value:
        raise ValueError("--official_stage2 needs --official_stage1 (stage 2 has no fc or decoder queries)")
    for name, path in (("--official_stage1", _STAGE1.value), ("--official_stage2", _STAGE2.value)):
        if path and not pathlib.Path(path).is_file():
            raise FileNotFoundError(f"{name}: file not found: {path}")
        if path:
            check_torch_file(path, name)
    for flag in (_BATCH, _MAX_NEW, _MAX_IMAGES, _STEPS, _LIMIT):
        if flag.value < 1:
            raise ValueError(f"--{flag.name}={flag.value}: expected at least 1")
    # prompt i takes seed + i: the config's --limit prompts must all stay in range (a file's rows: flag_prompts)
    last = _SEED.value + (_LIMIT.value - 1 if _PROMPT.value is None and _PROMPTS.value is None else 0)
    if _SEED.value < 0 or last >= 2**31:
        raise ValueError(f"--seed={_SEED.value}: expected an integer in [0, 2**31)"
                         + (f" that stays there for the {_LIMIT.value} prompts (seed + {_LIMIT.value - 1})"
                            if last != _SEED.value else ""))
    if not math.isfinite(_GUIDANCE.value):
        raise ValueError(f"--guidance_scale={_GUIDANCE.value}: expected a finite number")
    out = pathlib.Path(_OUT.value)
    if not (existing := next(p for p in (out, *out.parents) if p.exists())).is_dir():
        raise ValueError(f"--out {_OUT.value}: {'it' if existing == out else existing} exists and is not a directory")
    earlier = earlier_results(_OUT.value)
    if earlier and not (_OVERWRITE.value or replaceable(earlier)):
        responses = sum(p.is_dir() for p in earlier)
        what = f"the results of an earlier run ({responses} responses)" if responses else \
            " and ".join(p.name for p in earlier)
        raise ValueError(f"--out {_OUT.value}: holds {what}: pass --overwrite to replace them, or choose another "
                         "--out")


def check_official_lora(cfg) -> None:
    """--official_stage2 holds LoRA adapters trained at alpha / r = 2: refused before any model loads when
    the config's LLM has none or scales them otherwise."""
    from mg5jax.convert.minigpt5 import OFFICIAL_LORA_SCALING

    lora = cfg.model.lora
    if _STAGE2.value and not lora.enabled:
        raise ValueError("--official_stage2 holds LoRA adapters, and this config's model.lora.enabled is False: use "
                         "a stage-2 config (configs/stage2_vist.py, configs/stage2_mmdialog.py)")
    if _STAGE2.value and lora.alpha != OFFICIAL_LORA_SCALING * lora.rank:
        raise ValueError(f"--official_stage2's LoRA runs at alpha / r = {OFFICIAL_LORA_SCALING}; this config's "
                         f"model.lora has alpha {lora.alpha} / rank {lora.rank} (the original: 16 / 8)")


def _read_rows(path: pathlib.Path) -> list[tuple[str, object]]:
    """`(where, row)` for the rows of a .json list ("entry 1", …) or a .jsonl file ("line 3", …); a parse
    error names the file and line."""
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {path}: not text ({e})") from e
    if path.suffix == ".json" or text.lstrip().startswith("["):  # a list, whatever the file's name
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--prompts {path}: not valid JSON ({e})") from e
        if not isinstance(rows, list):
            raise ValueError(f"--prompts {path}: expected a list of prompts, got a {type(rows).__name__}")
        return [(f"entry {i}", row) for i, row in enumerate(rows, 1)]
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"line {line_no}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"--prompts {path}, line {line_no}: not valid JSON ({e.msg})") from e
    return rows


def flag_prompts():
    """The prompts given by --prompt / --prompts (checked before any model loads) and where each came
    from, or (None, None)."""
    from mg5jax.generation.interleaved import Prompt

    seed = _SEED.value
    if _PROMPT.value is not None:
        _require_images(_IMAGE.value, "--image")
        return [Prompt(_PROMPT.value, tuple(_IMAGE.value), seed)], ["--prompt"]
    if _PROMPTS.value is not None:
        path = pathlib.Path(_PROMPTS.value)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts: file not found: {path}")
        rows = _read_rows(path)
        if not rows:
            raise ValueError(f"--prompts {path}: no prompts in the file")
        prompts, labels = [], []
        for i, (where, row) in enumerate(rows):
            where = f"--prompts {path}, {where}"
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{where}: no 'text' string")
            images = row.get("images", [])
            if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
                raise ValueError(f"{where}: 'images' must be a list of file paths, got {images!r}")
            # relative paths are relative to the prompts file
            images = tuple(str((path.parent / p) if not pathlib.Path(p).is_absolute() else p) for p in images)
            _require_images(images, where)
            reference = row.get("reference_image")
            if isinstance(reference, str) and reference.strip():
                reference = str(path.parent / reference)  # an absolute path stays itself
                _require_images([reference], f"{where}: reference_image")
            if "seed" not in row and seed + i >= 2**31:
                raise ValueError(f"{where}: its seed is --seed + {i} = {seed + i}, past 2**31 - 1: give a smaller "
                                 "--seed, or the row a seed")
            try:
                prompts.append(Prompt(row["text"], images, row.get("seed", seed + i), row.get("caption"), reference,
                                      row.get("reference_text"), row.get("task")))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e
            labels.append(where)
        return prompts, labels
    return None, None


def check_prompts(prompts, labels: list[str], cfg, max_tokens: int, tokenizer) -> None:
    """Refuse, before any model loads, what generation would refuse after (`prompt_problem`, with the
    tokenizer alone)."""
    from mg5jax.generation.interleaved import prompt_problem

    for prompt, where in zip(prompts, labels):
        problem = prompt_problem(prompt, tokenizer.encode(prompt.text), tokenizer,
                                 max_input_images=cfg.data.max_input_images, has_vision=cfg.model.vision.kind != "none",
                                 max_tokens=max_tokens, images_setting="data.max_input_images")
        if problem:
            raise ValueError(f"{where}: {problem}")


def _check_inputs_survive_overwrite(prompts, labels: list[str]) -> None:
    """--overwrite removes the earlier results in --out first: a prompt must not read its images from them."""
    from mg5jax.generation.report import earlier_results

    if not _OVERWRITE.value:
        return
    earlier = [p.resolve() for p in earlier_results(_OUT.value) if p.is_dir()]
    for prompt, where in zip(prompts, labels):
        for image in (*prompt.images, *([prompt.reference_image] if prompt.reference_image else [])):
            path = pathlib.Path(image).resolve()
            if any(path.is_relative_to(d) for d in earlier):
                raise ValueError(f"{where}: image {image} is among the earlier results that --overwrite replaces "
                                 f"in --out {_OUT.value}: copy it elsewhere first")


def config_prompts(cfg, tokenizer):
    """The first --limit prompts of the config's validation file."""
    from mg5jax import build

    if not cfg.data.val_path:
        raise ValueError("no prompts: give --prompt, --prompts, or set data.val_path in the config")
    return build.generation_prompts(cfg, tokenizer, limit=_LIMIT.value, seed=_SEED.value)


def run(cfg) -> int:
    import jax
    from tqdm import tqdm

    from mg5jax import aot, build
    from mg5jax.diffusion.schedulers import make_scheduler
    from mg5jax.generation.interleaved import GenerationSettings, InterleavedGenerator
    from mg5jax.generation.report import ReportWriter
    from mg5jax.models import cpu_decode
    from mg5jax.training.checkpoint import trained_params_dir

    check_flags()
    check_official_lora(cfg)
    prompts, labels = flag_prompts()
    settings = GenerationSettings(
        do_sample=not _GREEDY.value, max_new_tokens=_MAX_NEW.value, max_images=_MAX_IMAGES.value,
        guidance_scale=_GUIDANCE.value, num_inference_steps=_STEPS.value, scheduler=_SCHEDULER.value,
        image_size=cfg.data.output_image_size, sd_baseline=_SD_BASELINE.value)
    if _STAGE1.value:
        weights = {"official_stage1": os.path.abspath(_STAGE1.value),
                   "official_stage2": _STAGE2.value and os.path.abspath(_STAGE2.value)}
    else:
        run_dir = _CHECKPOINT.value or cfg.trainer.workdir
        field = "--checkpoint" if _CHECKPOINT.value else "trainer.workdir"
        params_dir, chosen = trained_params_dir(run_dir, field)  # a run to load from (before any model loads)
        build.check_run_config(cfg, run_dir)  # before the prompts: a wrong config names every difference at once
        weights = {"checkpoint": os.path.abspath(run_dir), "params": os.path.abspath(params_dir), "chosen": chosen}
    tokenizer = build.load_tokenizer(cfg)
    if prompts is not None:
        check_prompts(prompts, labels, cfg, settings.length_buckets[-1], tokenizer)
        _check_inputs_survive_overwrite(prompts, labels)
    else:  # the validation file's tasks, read (and their images checked) before any weights load
        prompts = config_prompts(cfg, tokenizer)
    if not prompts:
        raise ValueError(f"no prompts to generate: no samples in data.val_path {cfg.data.val_path}")
    # the scheduler and its step count checked before any weights load
    make_scheduler(settings.scheduler, build.scheduler_config(cfg.model.sd_path)).set_timesteps(
        settings.num_inference_steps, (1, 4, 8, 8))
    build.enable_compile_cache()
    if jax.default_backend() == "cpu":
        cpu_decode.available()  # registered before stored programs that call the kernels load
    aot.preload("infer")  # the programs the last run used load while the weights do
    if _STAGE1.value:
        built, _ = build.inference_model(cfg, official=(_STAGE1.value, _STAGE2.value), tokenizer=tokenizer)
    else:
        built, _ = build.inference_model(cfg, run_dir=run_dir, field=field, tokenizer=tokenizer)
    baseline = _SD_BASELINE.value and any(p.caption for p in prompts)
    if _SD_BASELINE.value and not baseline:
        log.warning("--sd_baseline: no prompt has a caption (CC3M prompts do), so no baseline images")
    settings = dataclasses.replace(settings, sd_baseline=baseline)
    generator = InterleavedGenerator.from_built(cfg, built, settings)
    gc.collect()
    gc.freeze()  # the model's objects live until exit: collections no longer walk its whole graph
    # what reproduces these responses, with each one's record.json (prompt, input images, seed)
    recipe = {"command": shlex.join(sys.argv), "weights": weights, "batch_size": _BATCH.value,
              "settings": dataclasses.asdict(settings)}
    # written batch by batch: a later failure loses nothing before it
    report = ReportWriter(_OUT.value, run=recipe, overwrite=_OVERWRITE.value)
    responses = []
    batches = [prompts[start : start + _BATCH.value] for start in range(0, len(prompts), _BATCH.value)]
    try:
        if _STREAM.value:
            for i, batch in enumerate(batches):
                start = i * _BATCH.value
                for item in generator.stream(batch):
                    if isinstance(item, list):
                        report.add(item)
                        responses.extend(item)
                    elif shown := _for_display(item[1]):
                        print(f"[{start + item[0]}] {shown}", flush=True)
        else:
            # the next batch is prepared while this one runs, and decodes while this one's results are written
            with tqdm(total=len(prompts), desc="generating", unit="prompt", dynamic_ncols=True) as bar:
                for done in generator.generate_batches(batches):
                    report.add(done)
                    responses.extend(done)
                    bar.update(len(done))
    except Exception:
        if report.written:  # a failing batch may have written some of its responses
            print(f"stopped after {report.written} of {len(prompts)} responses, which are written: {report.index}",
                  file=sys.stderr, flush=True)
        raise
    for i, r in enumerate(responses):
        print(f"[{i}] {r.text}")
    print(f"wrote {len(responses)} responses with {sum(len(r.images) for r in responses)} images: {report.index}")
    return 0


def _for_display(text: str) -> str:
    """Streamed text as a reader wants it: an image marker for each voken group, no "###" stop."""
    text = re.sub(r"\[IMG0\]", " [image] ", text)
    text = re.sub(r"\[IMG[1-9]\d*\]", "", text).replace("###", "")
    return text if text.strip() else ""


def main(argv) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("mg5jax").setLevel(logging.INFO)
    logs_above_progress_bars()
    cfg = _CONFIG.value
    if cfg is None and not _CHECKPOINT.value:
        sys.exit("infer.py: --config is required (e.g. --config configs/stage2_vist.py), or --checkpoint with a run "
                 "of ours, whose recorded config is used")
    if cfg is not None:
        check_config_fields("infer.py", cfg, flags.FLAGS["config"].config_filename)
    from mg5jax.convert.sources import CheckpointError
    from mg5jax.data.datasets import DataError
    from mg5jax.data.images import ImageLoadError

    try:
        if cfg is None:
            from mg5jax import build

            cfg = build.run_config(_CHECKPOINT.value)
            log.info("config: the one %s recorded", _CHECKPOINT.value)
        sys.exit(run(cfg))
    except (FileNotFoundError, CheckpointError, DataError, ImageLoadError, ValueError) as e:
        sys.exit(f"infer.py: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser("infer.py"))
