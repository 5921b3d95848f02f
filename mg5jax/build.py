"""From a run config to the objects a run needs: the MiniGPT-5 model with its tokenizers, and the data.

Entry points (train.py, infer.py) call these; nothing here knows about the training loop.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import re
import shlex
import shutil
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from flax import nnx
from transformers.models.clip.tokenization_clip import CLIPTokenizer  # the class, not the package (imports torch)

from mg5jax.convert import keymap as km
from mg5jax.convert.sources import CheckpointError
from mg5jax.data import datasets, pipeline
from mg5jax.data import images as image_ops
from mg5jax.data.tokenization import MiniGPT5Tokenizer, load_hf_tokenizer
from mg5jax.diffusion import schedulers
from mg5jax.diffusion.pipeline import StableDiffusionPipeline
from mg5jax.generation.interleaved import GenerationSettings, InterleavedGenerator, Prompt, image_size_problem
from mg5jax.generation.report import write_outputs
from mg5jax.models import lora as lora_lib
from mg5jax.models.clip_text import CLIPTextModel, encode_prompts
from mg5jax.models.llama import VOCAB_PARAMS, LlamaForCausalLM, add_voken_rows
from mg5jax.models.mapper import MapperConfig, VokenMapper
from mg5jax.models.minigpt5 import MiniGPT5, MiniGPT5Config
from mg5jax.models.quantize import LLAMA_TARGETS, VIT_TARGETS, quantize_int8
from mg5jax.models.unet import UNet2DConditionModel
from mg5jax.models.vae import AutoencoderKL
from mg5jax.models.vision import VisionEncoder
from mg5jax.training.checkpoint import (INHERITED, flat_config, read_inherited, read_params, recorded_config,
                                         save_inherited, set_aside, trained_params_dir)

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PATH_FIELDS = ("_path", "_dir", "init_from", "workdir")  # the endings of the config fields that name files or folders


@dataclasses.dataclass
class Built:
    """A model ready to train or run, with the tokenizers that feed it."""

    model: MiniGPT5
    tokenizer: MiniGPT5Tokenizer
    caption_tokenizer: CLIPTokenizer
    num_new_rows: int  # vocab rows added for the vokens and <ImageHere> (the only rows that train)
    from_init_from: tuple[str, ...] = ()  # the param paths `model.init_from` gave


def enable_compile_cache(directory: str | None = None) -> None:
    """Keep compiled programs on disk (default `.cache/jax`, or $MG5JAX_COMPILE_CACHE) so a second
    run of the same config skips XLA compilation."""
    import os

    directory = directory or os.environ.get("MG5JAX_COMPILE_CACHE", ".cache/jax")
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(directory).absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def config_dtype(name: str, field: str):
    """The jnp dtype a config field names ("float32", "bfloat16", ...); `field` is named in the error."""
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def require_dir(path: str, field: str) -> pathlib.Path:
    """`path` as a Path; an error naming the setting `field` when it is not a directory."""
    p = pathlib.Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{field}: directory not found: {p}")
    return p


def require_file(path: str, field: str) -> pathlib.Path:
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{field}: file not found: {p}")
    return p


def read_json(path, field: str):
    """The JSON in `path`; a missing file is an error naming `field`, bad JSON one naming the file."""
    return datasets.load_json(require_file(str(path), field))


def scheduler_config(sd_path) -> dict:
    """The diffusers scheduler config of the Stable Diffusion directory `model.sd_path`."""
    return read_json(pathlib.Path(sd_path) / "scheduler" / "scheduler_config.json", "model.sd_path")


def load_tokenizer(cfg) -> MiniGPT5Tokenizer:
    """The LLM's tokenizer with the voken tokens (no weights: a caller reads its data with it first)."""
    require_dir(cfg.model.llm_path, "model.llm_path")
    return MiniGPT5Tokenizer.from_pretrained(pathlib.Path(cfg.model.llm_path), num_vokens=cfg.model.num_vokens)


def grad_accum_steps(cfg, global_batch: int) -> int:
    """`trainer.optimizer.grad_accum_steps`, or, when it is None, the micro-steps per update that come
    closest to `data.effective_batch_size` without passing it; a batch that misses it is logged as a warning."""
    given = cfg.trainer.optimizer.grad_accum_steps
    if given is not None:
        return given
    wanted = cfg.data.effective_batch_size
    steps = max(1, wanted // global_batch)
    if steps * global_batch != wanted:
        log.warning("data.effective_batch_size=%d is not a multiple of the global batch %d (data.per_device_batch_size"
                    " %d × %d devices): updates average %d examples instead. Choose the batch per device so that it "
                    "divides, or set trainer.optimizer.grad_accum_steps", wanted, global_batch,
                    cfg.data.per_device_batch_size, global_batch // cfg.data.per_device_batch_size,
                    steps * global_batch)
    return steps


def build_model(cfg, *, train: bool = True, init_from: bool = True, mesh: jax.sharding.Mesh | None = None,
                tokenizer: MiniGPT5Tokenizer | None = None) -> Built:
    """Load every pretrained part named in `cfg.model`, add the voken rows (and LoRA), build the mapper.
    With `mesh`, the pretrained weights are read straight into their shardings (a 7B LLM never sits whole
    on one device).

    Frozen parts are stored in `model.frozen_dtype`; the trainable parts (voken rows, LoRA, mapper)
    in fp32. With `model.init_from` set (and `init_from`), the trainable params of that run
    (`load_run`) or of the released `stage1_cc3m.ckpt` (a `.ckpt` file: fc, queries, voken rows,
    mapper) are loaded. For inference (`train=False`) no remat, no caption text encoder, and the voken
    rows in the frozen dtype. `tokenizer`: the one `load_tokenizer` gave, when the caller has it already.
    """
    m = cfg.model
    frozen = config_dtype(m.frozen_dtype, "model.frozen_dtype")
    compute = config_dtype(m.compute_dtype, "model.compute_dtype")
    check_model_paths(cfg, init_from=init_from)  # every path before any weights load
    llm_dir, sd_dir = pathlib.Path(m.llm_path), pathlib.Path(m.sd_path)
    rngs = nnx.Rngs(cfg.seed, dropout=cfg.seed)  # "dropout": LoRA's stream, reseeded by every train step

    schedule_cfg = scheduler_config(sd_dir)  # before any weights load
    # the loss's target is the noise, hard-coded as in the original (REFERENCE §4.4): a v-prediction
    # U-Net (SD 2.1 at 768 px) would train against the wrong target; generation samples either kind
    noise_schedule = schedulers.NoiseSchedule.from_config(
        schedule_cfg, where=f"{sd_dir / 'scheduler' / 'scheduler_config.json'} (model.sd_path)",
        prediction_types=("epsilon",) if train else schedulers.NoiseSchedule.PREDICTION_TYPES)

    tokenizer = tokenizer or load_tokenizer(cfg)
    llm = LlamaForCausalLM.from_pretrained(llm_dir, dtype=compute, param_dtype=frozen, attn_impl=m.attn_impl,
                                           residual_dtype=config_dtype(m.residual_dtype, "model.residual_dtype"),
                                           remat=llm_remat(cfg) if train else False, mesh=mesh)
    num_new = m.num_vokens + 1
    # trainable rows in fp32; for inference the whole matrices are frozen like the rest
    add_voken_rows(llm, num_new, vocab_size=tokenizer.ids.vocab_size, param_dtype=jnp.float32 if train else frozen)
    if m.lora.enabled:
        wrapped = lora_lib.apply_lora(llm, targets=m.lora.targets, rank=m.lora.rank, alpha=m.lora.alpha,
                                      dropout=m.lora.dropout, param_dtype=jnp.float32, rngs=rngs)
        log.info("LoRA r=%d on %d projections", m.lora.rank, len(wrapped))

    vision = _build_vision(m, frozen, compute, mesh)
    unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet", dtype=compute, param_dtype=frozen, mesh=mesh,
                                                remat=bool(m.remat_unet and train), attention_impl=m.attn_impl)
    vae = AutoencoderKL.from_pretrained(sd_dir / "vae", dtype=compute, param_dtype=frozen, mesh=mesh)
    caption_tokenizer = load_hf_tokenizer(CLIPTokenizer, sd_dir / "tokenizer", "CLIP")

    text_encoder, empty = None, None
    cross = unet.config.cross_attention_dim  # an int, or one per block (all equal for SD)
    text_width = cross if isinstance(cross, int) else cross[0]
    if cfg.loss.caption_weight > 0 and train:  # the caption loss's targets; generation does not need it
        text_encoder = CLIPTextModel.from_pretrained(sd_dir / "text_encoder", dtype=compute, param_dtype=frozen,
                                                     mesh=mesh)
        # the empty caption's feature (the target of CFG-dropped groups) in fp32, as the original computes
        # it once at init (REFERENCE §1.10); a bf16 run loads an fp32 copy of the encoder for it
        encoder32 = text_encoder if frozen == compute == jnp.float32 else CLIPTextModel.from_pretrained(
            sd_dir / "text_encoder", dtype=jnp.float32, param_dtype=jnp.float32, mesh=mesh)
        ids, mask = encode_prompts(caption_tokenizer, [""])
        empty = np.asarray(encoder32(jnp.asarray(ids), attention_mask=jnp.asarray(mask)), np.float32)[0]
        del encoder32

    mapper_cfg = MapperConfig(llm_dim=llm.config.hidden_size, num_vokens=m.num_vokens, hidden=text_width,
                              num_queries=caption_tokenizer.model_max_length, enc_layers=m.mapper.enc_layers,
                              dec_layers=m.mapper.dec_layers, heads=m.mapper.heads, ff=m.mapper.ff)
    mapper = VokenMapper(mapper_cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)

    ids = tokenizer.ids
    config = minigpt5_config(cfg, voken_ids=ids.voken_ids, image_placeholder_id=ids.image_placeholder_id,
                             bos_id=ids.bos_id, num_query_tokens=_num_query_tokens(vision, cfg.data.input_features_dir))
    model = MiniGPT5(config, llm=llm, mapper=mapper, unet=unet, vae=vae, noise_schedule=noise_schedule,
                     vision=vision, text_encoder=text_encoder, empty_text_feature=empty)
    from_init = []
    if init_from and m.init_from:
        if pathlib.Path(m.init_from).suffix == ".ckpt":  # the original's stage-2 start
            from mg5jax.convert.minigpt5 import load_official

            from_init = load_official(model, m.init_from, stage=1)
            log.info("model.init_from: loaded the official stage-1 checkpoint %s", m.init_from)
        else:
            trained, kept = load_run(model, m.init_from)
            from_init = _load_from_chain(model, m.init_from, trained + kept)
    return Built(model, tokenizer, caption_tokenizer, num_new, tuple(from_init))


def _load_from_chain(model: MiniGPT5, run_dir: str, loaded: list[str]) -> list[str]:
    """The mapper params a run of ours does not give (`loaded`: what `load_run` took from it; a run from
    before runs kept their `inherited/` lacks the fc and decoder queries it froze) from its recorded
    `model.init_from`, and on down that chain of runs (to an official stage-1 .ckpt, whose other params
    then do not replace what the later runs trained); an error naming them where the chain ends first
    (they would stay at their random initialisation). Returns every path loaded, `loaded` included."""
    flat = km.flat_params(nnx.state(model, nnx.Param))
    done = set(loaded)
    want = {p for p in flat if p.startswith("mapper.")} - done
    source, seen = run_dir, {str(pathlib.Path(run_dir).absolute())}
    while want:
        record = recorded_config(source) or {}
        earlier = _from_run_folder((record.get("model") or {}).get("init_from") or "", record.get("cwd"))
        path = pathlib.Path(earlier)
        problem = ("records no model.init_from" if not earlier else
                   "starts from itself" if str(path.absolute()) in seen else
                   f"started from {earlier}, not found from {pathlib.Path.cwd()}" if not path.exists() else None)
        if problem:
            raise CheckpointError(
                f"model.init_from {run_dir}: holds no {sorted(want)[0]} ({len(want)} mapper params; a stage-2 run "
                "keeps only what it trains, and a run with other model.mapper settings has other params), and "
                f"{source} {problem}: give model.init_from the stage-1 run or stage1_cc3m.ckpt, or a run that started "
                "from one")
        if path.suffix == ".ckpt":  # the official stage-1 file: all of stage 1, then what the runs trained on top
            from mg5jax.convert.minigpt5 import load_official

            trained = {p: flat[p].get_value() for p in done}
            load_official(model, earlier, stage=1)
            for p, value in trained.items():
                flat[p].set_value(value)
            got = set(want)
        else:
            trained, kept = load_run(model, earlier, only=want)
            got = set(trained) | set(kept)
        log.info("model.init_from %s: %d frozen mapper params from %s, the run it started from", run_dir, len(got),
                 earlier)
        want -= got
        done |= got
        source = earlier
        seen.add(str(path.absolute()))
    return sorted(done)


def minigpt5_config(cfg, *, voken_ids: tuple[int, ...], image_placeholder_id: int, bos_id: int,
                    num_query_tokens: int) -> MiniGPT5Config:
    """The model config: token ids and query count as given, loss settings from `cfg.loss`."""
    loss = cfg.loss
    return MiniGPT5Config(
        voken_ids=tuple(voken_ids), image_placeholder_id=image_placeholder_id, bos_id=bos_id,
        num_query_tokens=num_query_tokens, groups_per_sample=loss.groups_per_sample,
        text_loss_weight=loss.text_weight, image_loss_weight=loss.image_weight,
        caption_loss_weight=loss.caption_weight, cfg_drop=loss.cfg_drop, snr_gamma=loss.snr_gamma,
        loss_group_rows=loss.group_rows)


def sd_baseline_pipeline(cfg, built: Built) -> StableDiffusionPipeline:
    """Stable Diffusion text-to-image on the model's U-Net and VAE with SD's own text encoder (the
    model's, when it has one for the caption loss): the original's `image_pipeline`, whose image of a
    caption is its CC3M baseline (REFERENCE §7)."""
    m = cfg.model
    sd_dir = require_dir(m.sd_path, "model.sd_path")
    encoder = built.model.text_encoder
    if encoder is None:
        compute = config_dtype(m.compute_dtype, "model.compute_dtype")
        frozen = config_dtype(m.frozen_dtype, "model.frozen_dtype")
        encoder = CLIPTextModel.from_pretrained(sd_dir / "text_encoder", dtype=compute, param_dtype=frozen)
    text_config = read_json(sd_dir / "text_encoder" / "config.json", "model.sd_path")
    return StableDiffusionPipeline(
        built.model.unet, built.model.vae, encoder, built.caption_tokenizer,
        scheduler_config(sd_dir),
        use_attention_mask=bool(text_config.get("use_attention_mask", False)))


def check_model_paths(cfg, *, init_from: bool = True) -> None:
    """Every file and directory `cfg.model` names exists (an error names the setting),
    `model.init_from` (with `init_from`) is a run of ours or an official stage-1 file, and
    `data.output_image_size` fits the Stable Diffusion model."""
    m, v = cfg.model, cfg.model.vision
    require_dir(m.llm_path, "model.llm_path")
    require_dir(m.sd_path, "model.sd_path")
    check_output_image_size(cfg)
    if v.kind == "lavis":
        for field in ("vit_path", "qformer_path", "proj_path"):
            require_file(getattr(v, field), f"model.vision.{field}")
    elif v.kind == "blip2":
        require_dir(v.blip2_dir, "model.vision.blip2_dir")
        if v.proj_path:
            require_file(v.proj_path, "model.vision.proj_path")
    if init_from and m.init_from:
        if pathlib.Path(m.init_from).suffix == ".ckpt":
            require_file(m.init_from, "model.init_from")
        else:
            trained_params_dir(m.init_from, "model.init_from")


def check_precomputed_encoders(cfg) -> None:
    """The precomputed folders a run reads (`data.*input_features_dir`, `data.*output_moments_dir`) hold
    what their fields name, by their `encoding.json` (encode_images writes it): another kind of array is
    an error. Arrays made with other weights than this config's (its VAE; its vision encoder, unless
    `model.vision.kind` is "none") get a warning, since training would learn from one model's arrays while
    generation runs the other (the paths may differ for a copy of the same weights). A folder without the
    record passes: shapes are checked as batches are built."""
    d, m, v = cfg.data, cfg.model, cfg.model.vision
    vae = [str(pathlib.Path(m.sd_path) / "vae")]
    vision = {"blip2": [v.blip2_dir, v.proj_path], "lavis": [v.vit_path, v.qformer_path, v.proj_path]}.get(v.kind)
    for field, what, weights, name in (
            ("input_features_dir", "input features", vision, "model.vision"),
            ("val_input_features_dir", "input features", vision, "model.vision"),
            ("output_moments_dir", "VAE moments", vae, "model.sd_path's VAE"),
            ("val_output_moments_dir", "VAE moments", vae, "model.sd_path's VAE")):
        path = pathlib.Path(d[field]) / pipeline.ENCODING
        if not d[field] or not path.is_file():
            continue
        record = read_json(path, f"data.{field}")
        held = record.get("what") if isinstance(record, dict) else None
        if held != what:
            raise datasets.DataError(f"data.{field} {d[field]}: holds {held or 'unknown arrays'} ({path}), not {what}")
        encoder, ours = record.get("encoder"), [w for w in weights or () if w]
        if not ours or not isinstance(encoder, str) or not encoder:
            continue
        made_from = encoder.rsplit(" (", 1)[0].split(", ")
        if len(made_from) != len(ours) or not all(_same_path(a, b) for a, b in zip(made_from, ours)):
            log.warning("data.%s %s holds %s of %s, and %s is %s: training would learn from one model's arrays "
                        "while generation runs the other", field, d[field], what, encoder, name, ", ".join(ours))


def check_output_image_size(cfg) -> None:
    """`data.output_image_size` must be a multiple of what the VAE and the U-Net of `model.sd_path` divide
    it by (read from their config.json files, before any weights load)."""
    size, sd = cfg.data.output_image_size, pathlib.Path(cfg.model.sd_path)
    if problem := image_size_problem(size, read_json(sd / "vae" / "config.json", "model.sd_path")["block_out_channels"],
                                     read_json(sd / "unet" / "config.json", "model.sd_path")["block_out_channels"]):
        raise ValueError(f"data.output_image_size={size} for {sd}: {problem}")


def llm_remat(cfg) -> bool | str:
    """What the LLM recomputes in a training backward pass: nothing (False), everything (True), or what
    the `jax.checkpoint_policies` policy `model.remat_llm_policy` does not save."""
    m = cfg.model
    if not m.remat_llm:
        return False
    if m.remat_llm_policy and not callable(getattr(jax.checkpoint_policies, m.remat_llm_policy, None)):
        raise ValueError(f"model.remat_llm_policy={m.remat_llm_policy!r}: not a jax.checkpoint_policies name "
                         "(e.g. 'dots_with_no_batch_dims_saveable')")
    return m.remat_llm_policy or True


def check_frozen_mapper_is_loaded(cfg) -> None:
    """The mapper is the one part built at random: a trainable set that freezes some of it (stage 2:
    fc and the decoder queries) needs `model.init_from` to give those their stage-1 values."""
    from mg5jax.training.optimizer import resolve_trainable

    m = cfg.model
    if m.init_from:
        return
    probe = MapperConfig(llm_dim=8, num_vokens=m.num_vokens, hidden=8, num_queries=1, enc_layers=m.mapper.enc_layers,
                         dec_layers=m.mapper.dec_layers, heads=1, ff=8)
    mapper = nnx.eval_shape(lambda: VokenMapper(probe, rngs=nnx.Rngs(0)))  # the names, no weights
    labels = resolve_trainable(nnx.State({"mapper": nnx.state(mapper, nnx.Param)}), cfg.trainer.optimizer.trainable,
                               warn_unused=False)
    frozen = sorted(path for path, mult in labels.items() if mult is None)
    if frozen:
        raise ValueError(f"model.init_from is empty, but trainer.optimizer.trainable freezes {len(frozen)} mapper "
                         f"params (e.g. {frozen[0]}), which would stay at their random initialisation: give the "
                         "stage-1 run or the official stage1_cc3m.ckpt they come from (--config.model.init_from=…)")


def _build_vision(m, frozen, compute, mesh) -> VisionEncoder | None:
    v = m.vision
    if v.kind == "none":
        return None
    if v.kind == "lavis":  # the paths were checked by check_model_paths
        return VisionEncoder.from_lavis(v.vit_path, v.qformer_path, v.proj_path, dtype=compute, param_dtype=frozen,
                                        mesh=mesh)
    if v.kind == "blip2":
        return VisionEncoder.from_pretrained(v.blip2_dir, proj=v.proj_path or None, dtype=compute, param_dtype=frozen,
                                             mesh=mesh)
    raise ValueError(f"model.vision.kind={v.kind!r}: expected 'lavis', 'blip2' or 'none'")


def _num_query_tokens(vision: VisionEncoder | None, features_dir: str) -> int:
    """LLM positions per input image: the Q-Former's queries, or without a vision encoder those of the
    precomputed features (32, the Q-Former's, when there are none)."""
    if vision is not None:
        return vision.config.qformer.num_query_tokens
    shape = pipeline.precomputed_shape(features_dir) if features_dir and pathlib.Path(features_dir).is_dir() else None
    return shape[0] if shape else 32


def voken_row_masks(model: MiniGPT5, num_new: int, trainable=None) -> dict[str, jax.Array]:
    """Update masks `{param path: 0/1 mask}` letting only the last `num_new` vocab rows move; with the
    run's `trainable` rules, for the vocab params they train (a frozen lm_head needs no mask)."""
    import re

    from mg5jax.training.optimizer import resolve_trainable

    labels = resolve_trainable(model, trainable, warn_unused=False) if trainable is not None else None
    masks = {}
    for path, var in km.flat_params(nnx.state(model, nnx.Param)).items():
        if re.search(VOCAB_PARAMS, path) and (labels is None or labels.get(path) is not None):
            names = tuple(var.get_metadata().get("out_sharding") or ())
            axis = names.index("vocab")
            n = var.shape[axis]
            shape = [n if i == axis else 1 for i in range(len(var.shape))]
            masks[path] = (jnp.arange(n) >= n - num_new).astype(jnp.float32).reshape(shape)
    return masks


def quantize_for_inference(model: MiniGPT5) -> list[str]:
    """Int8 weights (`model.int8_weights`) for the LLM's and the ViT's layer projections, in place, after
    every checkpoint is loaded (LoRA adapters are folded in). Returns the dotted paths replaced."""
    paths = [f"llm.{p}" for p in quantize_int8(model.llm, LLAMA_TARGETS)]
    if model.vision is not None:
        paths += [f"vision.vit.{p}" for p in quantize_int8(model.vision.vit, VIT_TARGETS)]
    log.info("int8 weights: %d projections", len(paths))
    return paths


def load_trainable(model: MiniGPT5, run_dir: str, field: str = "model.init_from", *, strict: bool = False,
                   only: set[str] | None = None) -> list[str]:
    """Load the trainable params saved by an earlier run of ours into `model`: its best validation
    step, or its newest checkpoint when it ran no validation (`checkpoint.trained_params_dir`).

    Params present in both are loaded (a stage-2 model takes the stage-1 voken rows, fc, mapper and
    queries; its fresh LoRA stays; of a run with `model.train_new_rows_only`, only the new vocab rows),
    or of those only the paths in `only`; with `strict` (inference
    from the run itself), a stored param the model lacks is an error. Returns the loaded paths; a
    shape mismatch is an error. `field` names the setting that gave `run_dir` in errors.
    """
    if isinstance(model, Built):
        raise TypeError("load_trainable takes the model: build_model(...).model, not what build_model returns")
    params_dir, chosen = trained_params_dir(run_dir, field)
    flat_stored = _flatten(read_params(params_dir))
    state = nnx.state(model, nnx.Param)
    flat = km.flat_params(state)
    # a run that moved only the new vocab rows stored its whole matrices, the old rows as it held them (bf16
    # by default): of those, the new rows are taken and the old ones stay the model's (its LLM file's)
    new_rows_only = ((recorded_config(run_dir) or {}).get("model") or {}).get("train_new_rows_only") is True
    new_rows = voken_row_masks(model, len(model.config.voken_ids) + 1) if new_rows_only else {}
    extra = sorted(p for p in flat_stored if p not in flat)
    if strict and extra:
        raise CheckpointError(f"{params_dir}: {len(extra)} trained params have no place in this model, e.g. "
                              f"{extra[0]} (was the run trained with other model settings, e.g. model.lora?)")
    loaded = []
    for path, value in flat_stored.items():
        if path not in flat or (only is not None and path not in only):
            continue
        if tuple(value.shape) != tuple(flat[path].shape):
            raise CheckpointError(f"{params_dir}: {path} has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(flat[path].shape)}")
        now = flat[path].get_value()  # stays where the model's param is (sharded over a mesh, say)
        value = _like(now, value)
        if path in new_rows:
            value = jax.device_put(jnp.where(new_rows[path] > 0, value, now), now.sharding)
        flat[path].set_value(value)
        loaded.append(path)
    if not loaded and only is None:
        raise CheckpointError(f"{params_dir}: none of its params belong to this model")
    log.info("%s %s: loaded %d trainable params from the %s", field, run_dir, len(loaded), chosen)
    return loaded


def _like(now: jax.Array, value) -> jax.Array:
    """A stored value as the model's param `now` holds it: its dtype, on its devices and sharding."""
    return jax.device_put(np.asarray(value).astype(now.dtype), now.sharding)


def inherited_params(cfg, built: Built) -> nnx.State:
    """The params a run takes from `model.init_from` and does not train (stage 2: the mapper's fc and
    decoder queries; the LLM's layers too where the stage-1 run trained them and this one freezes them)."""
    from mg5jax.training.optimizer import resolve_trainable

    labels = resolve_trainable(built.model, cfg.trainer.optimizer.trainable, warn_unused=False)
    frozen = {p for p in built.from_init_from if labels.get(p, 0.0) is None}
    return nnx.state(built.model, nnx.All(nnx.Param, lambda path, _: ".".join(map(str, path)) in frozen))


def keep_inherited(cfg, built: Built, workdir: str, *, resumed: bool,
                   mesh: jax.sharding.Mesh | None = None) -> int:
    """A run with `model.init_from` keeps what it took from there and does not train in
    `<workdir>/inherited/` when it starts (`save_inherited`; an earlier run's copy there is moved aside
    first, as its best/ is); resumed, it loads that copy, so it goes on with the values it started with,
    whatever that earlier run holds now. `mesh`: the run's (the copy is saved replicated over it, as a
    multi-host save needs). Returns how many params the run keeps there (recorded with its checkpoints:
    `load_inherited` refuses the run once they are gone)."""
    params = inherited_params(cfg, built)  # none without model.init_from
    count = len(km.flat_params(params))
    if resumed:
        loaded = load_inherited(built.model, workdir, "trainer.workdir")
        if count and not loaded:
            log.warning("trainer.workdir %s keeps no inherited/ (made before runs kept it): its %d frozen params "
                        "come from model.init_from %s as it is now", workdir, count, cfg.model.init_from)
        return len(loaded)
    earlier, best = pathlib.Path(workdir) / INHERITED, pathlib.Path(workdir) / "best"
    if jax.process_index() == 0 and earlier.exists():
        if best.exists():  # it goes with that run's best/, which the trainer sets aside too
            log.warning("%s held an earlier run's params: moved to %s", earlier, set_aside(earlier))
        else:  # a run that stopped before its first checkpoint: nothing loads it
            shutil.rmtree(earlier)
    if jax.process_count() > 1:  # every host past the move before any writes (the save is collective)
        multihost_utils.sync_global_devices("mg5jax: an earlier inherited/ set aside")
    if count:
        if mesh is not None:  # host-local arrays (the mapper's) or sharded ones: replicated, as a multi-host save needs
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            params = jax.tree.map(
                lambda x: jax.device_put(np.asarray(x) if x.is_fully_addressable else x, replicated), params)
        log.info("kept %d params from model.init_from in %s", count, save_inherited(workdir, params))
    return count


def load_run(model: MiniGPT5, run_dir: str, field: str = "model.init_from", *, strict: bool = False,
             only: set[str] | None = None) -> tuple[list[str], list[str]]:
    """A run of ours into `model` as it trained: its trained params (`load_trainable`, with `strict`), then
    for the rest what it kept from its own `model.init_from` (`load_inherited`), never over a trained one;
    of both, only the paths in `only` when given. Returns (trained paths, kept paths)."""
    trained = load_trainable(model, run_dir, field, strict=strict, only=only)
    rest = (set(km.flat_params(nnx.state(model, nnx.Param))) if only is None else set(only)) - set(trained)
    return trained, load_inherited(model, run_dir, field, only=rest)


def load_inherited(model: MiniGPT5, run_dir: str, field: str = "--checkpoint", *,
                   only: set[str] | None = None) -> list[str]:
    """Load the params a run of ours kept from its `model.init_from` (`keep_inherited`), or of those only
    the paths in `only`, into `model`: the values it trained with. Returns the loaded paths (none for a
    run that kept none); a param the model lacks, or of another shape, is an error."""
    stored = read_inherited(run_dir)
    if stored is None:
        kept = (recorded_config(run_dir) or {}).get("inherited") or 0
        if kept:
            raise CheckpointError(f"{field} {run_dir}: its inherited/ is gone, where the run kept the {kept} params "
                                  "its model.init_from gave it and it did not train: without them it does not load "
                                  "as it trained (restore the folder from a copy of the run)")
        return []
    flat = km.flat_params(nnx.state(model, nnx.Param))
    loaded = []
    for path, value in _flatten(stored).items():
        if only is not None and path not in only:
            continue
        if path not in flat or tuple(value.shape) != tuple(flat[path].shape):
            raise CheckpointError(f"{field} {run_dir}: its inherited/ holds {path} "
                                  + (f"of shape {tuple(value.shape)}, the model expects {tuple(flat[path].shape)}"
                                     if path in flat else "which this model lacks")
                                  + ": was the run trained with other model settings (model.mapper, model.lora)? "
                                    "Load it with its recorded config (infer.py --checkpoint without --config)")
        flat[path].set_value(_like(flat[path].get_value(), value))
        loaded.append(path)
    if loaded:
        log.info("%s %s: loaded %d params it kept from its model.init_from (the values it trained with)", field,
                 run_dir, len(loaded))
    return loaded


def inference_model(cfg, *, run_dir: str | None = None, field: str = "--checkpoint",
                    official: tuple[str, str | None] | None = None,
                    tokenizer: MiniGPT5Tokenizer | None = None) -> tuple[Built, dict]:
    """The model for generation: built from `cfg` with the trained params of a run of ours (`run_dir`, its
    best validation step, and what it kept from its `model.init_from`; check `cfg` first with
    `check_run_config`) or of the official Lightning files
    (`official`: stage 1, and stage 2 or None), int8 where `model.int8_weights` says, and the LLM re-laid
    for decoding. Returns it with `prepare_for_decoding`'s report. `field` names `run_dir` in errors;
    `tokenizer`: the one `load_tokenizer` gave, when the caller has it already."""
    from mg5jax.convert.minigpt5 import import_official
    from mg5jax.models.llama import prepare_for_decoding

    if (run_dir is None) == (official is None):
        raise ValueError("inference_model takes a run of ours (run_dir) or the official files (official)")
    if run_dir is not None:
        trained_params_dir(run_dir, field)  # a wrong run is named before any model loads
    # the official files hold all trainable params (stage 1: fc and queries too): no model.init_from then
    built = build_model(cfg, train=False, init_from=official is None, tokenizer=tokenizer)
    if official is not None:
        import_official(built.model, *official)
    else:
        load_run(built.model, run_dir, field, strict=True)
    if cfg.model.int8_weights:
        quantize_for_inference(built.model)
    prepared = prepare_for_decoding(built.model.llm)
    log.info("LLM prepared for decoding: %d layers fused, %d projections packed%s", prepared["fused_layers"],
             prepared["packed_layers"], f" (not packed: {prepared['not_packed']})" if prepared["not_packed"] else "")
    return built, prepared


def _from_run_folder(value, ran_in: str | None):
    """A recorded path setting as seen from here: a relative one joined to `ran_in`, the folder the run's
    train.py ran in (when recorded); "" and absolute paths as they are."""
    if not ran_in or not isinstance(value, str) or not value or os.path.isabs(value) or "://" in value:
        return value
    return os.path.normpath(os.path.join(ran_in, value))


def run_config(run_dir: str, field: str = "--checkpoint"):
    """The config a run of ours was trained with, as `train.py` recorded it with its newest checkpoint (a
    locked ConfigDict; sequences as tuples, as config files write them), so the run loads without its
    config file. A relative path in it is taken from where `train.py` ran (it records that folder), and
    one not found is an error that says so."""
    import ml_collections

    trained_params_dir(run_dir, field)  # a wrong run is named first
    recorded = recorded_config(run_dir)
    if not recorded:
        raise CheckpointError(f"{field} {run_dir}: records no config (no complete checkpoint in checkpoints/, or "
                              "one saved without it): give the config it was trained with (--config)")

    ran_in = recorded.get("cwd")

    def tuples(value, key=""):
        """Sequences as tuples; a relative path (a `*_path`, `*_dir`, `init_from` or `workdir` field) from
        where train.py ran."""
        if isinstance(value, dict):
            return {k: tuples(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return tuple(tuples(v) for v in value)
        return _from_run_folder(value, ran_in) if key.endswith(PATH_FIELDS) else value

    recorded = {k: v for k, v in recorded.items() if k not in ("schedule", "inherited", "cwd")}  # train.py's records
    try:
        from configs import base  # the repository's: every field
    except ImportError:
        base = None
    missing = sorted(set(flat_config(base.get_config().to_dict())) - set(flat_config(recorded))) if base else []
    if missing:
        raise CheckpointError(f"{field} {run_dir}: its recorded config lacks {len(missing)} fields of configs/base.py, "
                              f"e.g. {missing[0]} (recorded by an older mg5jax?): give the config it was trained with "
                              "(--config)")
    cfg = ml_collections.ConfigDict(tuples(recorded))
    cfg.lock()
    try:
        check_model_paths(cfg)
    except FileNotFoundError as e:
        where = f"from {ran_in}, where its train.py ran" if ran_in else "from where its train.py ran"
        raise FileNotFoundError(f"{e} (as {run_dir} recorded it, a relative path taken {where}: give the config "
                                "with the paths as they are now)") from e
    return cfg


def _flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if set(v) == {"value"}:
                out[key] = v["value"]
            else:
                out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _same_path(a: str, b: str) -> bool:
    """Two settings name the same file or directory ("" only equals "")."""
    if not a or not b:
        return a == b
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (here)
        return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def run_settings(recorded: dict) -> list[str]:
    """The settings a run's weights depend on, given its recorded config: a config that differs in one
    would load the run into another model (LoRA, mapper, voken count), mix in other frozen or stage-1
    weights, or feed the ViT images of another size."""
    model, names = recorded.get("model", {}), ["llm_path", "sd_path", "init_from", "num_vokens", "lora.enabled",
                                               *(f"mapper.{k}" for k in ("enc_layers", "dec_layers", "heads", "ff"))]
    if model.get("lora", {}).get("enabled"):
        names += ["lora.targets", "lora.rank", "lora.alpha"]
    # a run on precomputed features (kind "none") may take any encoder at inference: the one that made them
    kind = model.get("vision", {}).get("kind")
    names += {"lavis": ["vision.kind", "vision.vit_path", "vision.qformer_path", "vision.proj_path"],
              "blip2": ["vision.kind", "vision.blip2_dir", "vision.proj_path"]}.get(kind, [])
    return [f"model.{n}" for n in names] + (["data.input_image_size"] if kind in ("lavis", "blip2") else [])


def check_run_config(cfg, run_dir: str) -> None:
    """Refuse a config that differs from the one a run of ours recorded in a setting its weights depend
    on (`run_settings`; a stage-2 run also needs the stage-1 weights it started from), naming each
    difference and the overrides that restore them."""
    recorded = recorded_config(run_dir)
    if recorded is None:
        log.warning("%s records no config (no complete checkpoint in checkpoints/, or one saved without it): "
                    "the config's model settings cannot be checked against the ones it was trained with", run_dir)
        return
    saved, current = flat_config(recorded), flat_config(cfg.to_dict())
    changed = []
    for key in run_settings(recorded):
        if key not in saved or key not in current:
            continue  # a run recorded before the setting existed
        theirs, ours = saved[key], current[key]
        theirs = _from_run_folder(theirs, recorded.get("cwd")) if key.endswith(PATH_FIELDS) else theirs
        path = key.endswith(PATH_FIELDS) and isinstance(theirs, str) and isinstance(ours, str)
        if not (_same_path(theirs, ours) if path else theirs == ours):
            changed.append((key, theirs, ours))
    if changed:
        diffs = ", ".join(f"{k}={v!r} (this config: {n!r})" for k, v, n in changed)
        fix = " ".join(shlex.quote(f"--config.{k}={v}") for k, v, _ in changed)
        raise ValueError(f"{run_dir} was trained with {diffs}: add {fix}")


# ---------------------------------------------------------------------------------------------- data


def generation_prompts(cfg, tokenizer: MiniGPT5Tokenizer, *, limit: int, seed: int) -> list[Prompt]:
    """The first `limit` generation tasks of the config's validation file (test mode, REFERENCE §6) as
    prompts with their task name, caption, and the dataset's image and text; prompt i samples with seed
    `seed + i`. Tasks with more input images than the model reads (none without a vision encoder, else
    `data.max_input_images`), or with an image that cannot be read, are left out (with a warning)."""
    d = cfg.data
    if not d.val_path:
        raise ValueError("data.val_path is not set: no validation prompts to generate from")
    samples = read_samples(d.kind, d.val_path, test=True, seed=cfg.seed, strict=d.strict, tokenizer=tokenizer,
                           field="data.val_path")
    images = [tuple(p for p in s.input_images if p is not None) for s in samples]
    # a model without a vision encoder reads no input image; otherwise at most data.max_input_images
    most, why = (0, "model.vision.kind='none'") if cfg.model.vision.kind == "none" else \
        (d.max_input_images, f"data.max_input_images={d.max_input_images}")
    kept = [i for i, paths in enumerate(images) if len(paths) <= most]
    if len(kept) < len(samples):
        log.warning("data.val_path: %d of %d generation tasks have more input images than this model reads (%s): "
                    "left out", len(samples) - len(kept), len(samples), why)
    prompts, unreadable = [], 0
    for i in kept:  # the first `limit` whose images all decode (a dataset's may not: training skips those too)
        if len(prompts) == limit:
            break
        s = samples[i]
        try:
            for path in (*images[i], *([s.output_image] if s.output_image else [])):
                image_ops.load_image(path)
        except image_ops.ImageLoadError as e:
            unreadable += 1
            if unreadable <= pipeline.LOGGED_SKIPS:
                log.warning("data.val_path: generation task %s left out: %s", s.task_name, e)
            continue
        # the turn's own text, vokens and stop removed (a CC3M task's is its caption, shown as that already)
        text = re.sub(r"\[IMG\d+\]", "", s.target).replace("###", "").strip()
        prompts.append(Prompt(s.source, images[i], seed + len(prompts), s.caption, s.output_image,
                              reference_text=text if text and text != s.caption else None, task=s.task_name))
    if unreadable > pipeline.LOGGED_SKIPS:
        log.warning("data.val_path: %d generation tasks left out for unreadable images", unreadable)
    return prompts


def sample_hook(cfg, built: Built, trainer) -> Callable[[int], None] | None:
    """`on_sample(step)`: generate for the first `cfg.sample_prompts` validation prompts with the
    trainer's current weights and write `<workdir>/samples/step_<N>/` (the original logs a sample
    every 500 steps, in stage 1 with SD's image of the caption beside it: so here when the model has
    the caption loss's text encoder). None, with a warning, when there is nothing to generate from."""
    if not cfg.data.val_path:
        log.warning("trainer.sample_every is set but data.val_path is not: no sample generation")
        return None
    prompts = generation_prompts(cfg, built.tokenizer, limit=cfg.sample_prompts, seed=cfg.seed)
    if not prompts:
        log.warning("trainer.sample_every: no validation prompt to generate from%s", " without input images "
                    "(model.vision.kind is 'none')" if built.model.vision is None else "")
        return None
    baseline = built.model.text_encoder is not None
    settings = GenerationSettings(image_size=cfg.data.output_image_size, max_images=1, sd_baseline=baseline)
    sd_pipeline = sd_baseline_pipeline(cfg, built) if baseline else None
    schedule = scheduler_config(cfg.model.sd_path)
    out = pathlib.Path(cfg.trainer.workdir) / "samples"

    def on_sample(step: int) -> None:
        try:
            # a generator per call: it holds the weights it was made with, and each train step replaces them
            generator = InterleavedGenerator(trainer.model, built.tokenizer, schedule, settings=settings,
                                             input_image_size=cfg.data.input_image_size,
                                             max_input_images=cfg.data.max_input_images,
                                             llm_dir=cfg.model.llm_path, sd_pipeline=sd_pipeline)
            with jax.set_mesh(trainer.mesh):
                responses = generator(prompts, key=jax.random.key(cfg.seed))  # every process takes part
            if jax.process_index() != 0:
                return
            # a resumed run redoes the samples of a step it had reached: the same weights, replaced
            index = write_outputs(responses, out / f"step_{step:06d}", title=f"MiniGPT-5 at step {step}",
                                  overwrite=True)
        except Exception as e:  # noqa: BLE001 - samples are for looking at: a failure must not end the run
            log.warning("step %d: sample generation failed, training goes on (%s: %s)", step, type(e).__name__, e)
            return
        log.info("step %d: %d sample responses with %d images in %s", step, len(responses),
                 sum(len(r.images) for r in responses), index)

    return on_sample


def read_samples(kind: str, path: str, *, test: bool, seed: int, strict: bool,
                 tokenizer: MiniGPT5Tokenizer | None = None, field: str = "data path",
                 required: bool = False) -> list[datasets.Sample]:
    """Read one dataset file with the reader of its kind (REFERENCE §6); `field` names the setting in errors.
    With `required`, a file that gives no sample is an error saying why."""
    file = require_file(path, field)
    if kind == "cc3m":
        samples, report = datasets.read_cc3m(str(file), test=test, seed=seed, strict=strict)
    elif kind == "vist":
        samples, report = datasets.read_vist(str(file), test=test, seed=seed, strict=strict)
    elif kind == "mmdialog":
        len_fn = tokenizer.count_tokens if tokenizer is not None else None
        samples, report = datasets.read_mmdialog(str(file), tokenizer_len_fn=len_fn, test=test, strict=strict)
    else:
        raise ValueError(f"data.kind={kind!r}: expected 'cc3m', 'vist' or 'mmdialog'")
    stops = ", ".join(f"{n} {rule}" for rule, n in sorted(report.stops.items()))
    counts = f"records read: {report.records}, skipped: {report.skipped}"
    counts += f"; stopped early: {stops}" if stops else ""
    log.info("%s: %d samples from %s (%s)", kind, len(samples), file, counts)
    if required and not samples:
        raise datasets.DataError(f"{field} {path}: no samples ({counts}{'' if report.records else '; an empty file?'})")
    return samples


def batch_spec(cfg, built: Built, batch_size: int) -> pipeline.BatchSpec:
    d = cfg.data
    vae_factor = 2 ** (len(built.model.vae.config.block_out_channels) - 1)
    return pipeline.BatchSpec(
        batch_size=batch_size, length_buckets=tuple(d.length_buckets), max_input_images=d.max_input_images,
        max_output_images=cfg.loss.groups_per_sample, input_image_size=d.input_image_size,
        output_image_size=d.output_image_size, num_query_tokens=built.model.config.num_query_tokens,
        llm_dim=built.model.llm.config.hidden_size, latent_size=d.output_image_size // vae_factor)


def caption_fn(tokenizer: CLIPTokenizer):
    """A caption → (ids [77], mask [77]) function for the example builder."""
    def fn(text: str):
        ids, mask = encode_prompts(tokenizer, [text])
        return ids[0], mask[0]
    return fn


def make_builder(cfg, built: Built, batch_size: int, *, train: bool) -> pipeline.ExampleBuilder:
    """The example builder of the training (`train`) or validation data: validation reads precomputed
    files from the `val_` folders when they are set (its images are another folder, often with the
    same file names)."""
    d = cfg.data
    features = d.input_features_dir if train else d.val_input_features_dir or d.input_features_dir
    moments = d.output_moments_dir if train else d.val_output_moments_dir or d.output_moments_dir
    return pipeline.ExampleBuilder(
        built.tokenizer, batch_spec(cfg, built, batch_size),
        caption_tokenizer=caption_fn(built.caption_tokenizer) if cfg.loss.caption_weight > 0 else None,
        train=train, fix_img7_mask=d.fix_img7_mask, input_features_dir=features or None,
        output_moments_dir=moments or None, vision_encoder=built.model.vision is not None, strict=d.strict)


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    return max(1, math.floor(num_samples / global_batch))


def eval_every(cfg, num_samples: int, global_batch: int) -> int:
    """Micro-steps between validations: `evals_per_epoch` times per epoch when set (the original's
    val_check_interval), else `trainer.eval_every`."""
    if cfg.evals_per_epoch:
        return max(1, steps_per_epoch(num_samples, global_batch) // cfg.evals_per_epoch)
    return cfg.trainer.eval_every
