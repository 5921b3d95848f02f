"""Will a run fit? Compile the real programs for a TPU topology ahead of time and report memory per device.

    python -m mg5jax.plan --config configs/stage2_vist.py --topology v5e:2x4 [--generate]

The full-size model is built abstractly (`nnx.eval_shape`: `jax.ShapeDtypeStruct`s placed by the
logical-axis rules, no weights, no host memory); then the trainer's jitted train step (or, with
`--generate`, the generation programs: the prompt splice with the vision encoder, the KV-cache
prefill, the decode loop and the guided sampler with CFG) is lowered and compiled for the named
topology. Printed as JSON: per-device argument / output / temp / total bytes from
`compiled.memory_analysis()`, step FLOPs from `compiled.cost_analysis()`, a per-part breakdown of
parameter and optimizer bytes, compile seconds, and the mesh and rules used.

Part sizes come from the `config.json` files named by the run config when they exist (the same
files `build.build_model` reads), otherwise from the real models: Vicuna-7B v0, SD 2.1-base, EVA
ViT-g + Q-Former. Topologies: `v5e:2x4`, `v5e:1x1`, `v4:2x2x1`, `v5p:2x2x1` (any name libtpu knows;
needs the `tpu` extra: `pip install -e '.[tpu]'`, run with `JAX_PLATFORMS=cpu`), or `cpu` for the
local devices (what the test uses).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import re
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mg5jax import parallel
from mg5jax.build import (config_dtype, grad_accum_steps, llm_remat, minigpt5_config, quantize_for_inference,
                          voken_row_masks)
from mg5jax.cli import check_config_fields, parse_flags, run_module
from mg5jax.convert.keymap import abstract_rngs, keypath_str
from mg5jax.diffusion import schedulers
from mg5jax.diffusion import sampler as sampler_lib
from mg5jax.generation import decode, interleaved
from mg5jax.generation.interleaved import GenerationSettings
from mg5jax.generation.sampling import SamplingConfig
from mg5jax.models import lora as lora_lib
from mg5jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from mg5jax.models.llama import LlamaConfig, LlamaForCausalLM, add_voken_rows
from mg5jax.models.mapper import MapperConfig, VokenMapper
from mg5jax.models.minigpt5 import MiniGPT5
from mg5jax.models.unet import UNet2DConditionModel, UNetConfig
from mg5jax.models.vae import AutoencoderKL, VAEConfig
from mg5jax.models.vision import VisionEncoder, VisionEncoderConfig
from mg5jax.training.optimizer import OptimizerConfig, build_optimizer, resolve_masks
from mg5jax.training.trainer import check_training_mesh, make_train_step

log = logging.getLogger(__name__)

GIB = 1 << 30
# HBM per chip; a chip whose TensorCores are separate devices (v4 without megacore) splits it evenly
HBM_PER_CHIP = {"TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB, "TPU v5": 95 * GIB, "TPU v6 lite": 32 * GIB}
# libtpu's default host is 2x2x1 chips; smaller slices must say so
CHIPS_PER_HOST = {"v5e:1x1": (1, 1, 1), "v5e:1x2": (1, 2, 1), "v5e:2x1": (2, 1, 1)}
MIN_FREE_FRACTION = 0.15  # a plan "fits" with at least this share of HBM left
# XLA effort for the planner's compiles. At -1 the TPU compiler schedules with little communication /
# compute overlap, so it needs less memory than a run's compile (effort 0) may take when HBM is free; a
# full-size train step then compiles in minutes in 8 GB of host memory instead of > 20 min and > 17 GB.
QUICK_EFFORT = -1.0

# SD 2.1-base's text encoder and scheduler (ENVIRONMENT §3), for runs whose sd_path is not on disk
SD21_TEXT_ENCODER = CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                   num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")
SD21_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": False,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "prediction_type": "epsilon", "timestep_spacing": "leading"}
LLAMA_TOKENIZER_SIZE = 32000  # Vicuna v0's tokenizer; the checkpoint has one more (pad) row

# parameter path -> part of the model (first prefix match wins)
PARTS = (
    ("lora", r"llm\..*\.lora_[ab]\b"),
    ("voken_rows", r"llm\.(model\.embed_tokens|lm_head)\b"),  # the whole matrices that hold the rows
    ("llm", r"llm\b"),
    ("mapper", r"mapper\b"),
    ("unet", r"unet\b"),
    ("vae", r"vae\b"),
    ("vision", r"vision\b"),
    ("text_encoder", r"text_encoder\b"),
)
_MODEL_PATH = re.compile(r"(^|\.)((?:llm|mapper|unet|vae|vision|text_encoder)\..*)$")


# ------------------------------------------------------------------------------------------ sizes


@dataclasses.dataclass(frozen=True)
class ModelSizes:
    """Architecture of every part of a run, and where each came from (a file or "default")."""

    llm: LlamaConfig
    vocab_size: int  # LLM rows after the voken rows are added (the tokenizer's length)
    vision: VisionEncoderConfig | None  # None: input images arrive as precomputed features
    unet: UNetConfig
    vae: VAEConfig
    text_encoder: CLIPTextConfig | None  # None: no caption loss
    mapper: MapperConfig
    scheduler: dict  # diffusers scheduler_config.json
    sources: dict[str, str]


def _tokenizer_size(llm_dir: pathlib.Path, num_vokens: int) -> int | None:
    if not ((llm_dir / "tokenizer.model").is_file() or (llm_dir / "tokenizer.json").is_file()):
        return None
    from mg5jax.data.tokenization import MiniGPT5Tokenizer

    return len(MiniGPT5Tokenizer.from_pretrained(llm_dir, num_vokens=num_vokens))


def model_sizes(cfg) -> ModelSizes:
    """Read the part configs named by `cfg.model` (config.json files only); missing ones are the real sizes."""
    m = cfg.model
    sources = {}
    num_new = m.num_vokens + 1

    llm_dir = pathlib.Path(m.llm_path)
    if (llm_dir / "config.json").is_file():
        llm = LlamaConfig.from_json(llm_dir)
        vocab = _tokenizer_size(llm_dir, m.num_vokens) or llm.vocab_size + num_new
        sources["llm"] = str(llm_dir / "config.json")
    else:
        llm, vocab = LlamaConfig(), LLAMA_TOKENIZER_SIZE + num_new
        sources["llm"] = "default: Vicuna-7B v0"

    sd_dir = pathlib.Path(m.sd_path)

    def sd_part(name, from_json, default):
        path = sd_dir / name / "config.json"
        if path.is_file():
            sources[name] = str(path)
            return from_json(path)
        sources[name] = "default: SD 2.1-base"
        return default

    unet = sd_part("unet", UNetConfig.from_json, UNetConfig())
    vae = sd_part("vae", VAEConfig.from_json, VAEConfig())
    text_encoder = None
    if cfg.loss.caption_weight > 0:
        text_encoder = sd_part("text_encoder", CLIPTextConfig.from_json, SD21_TEXT_ENCODER)
    scheduler_file = sd_dir / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else SD21_SCHEDULER

    vision = None
    if m.vision.kind == "blip2" and (pathlib.Path(m.vision.blip2_dir) / "config.json").is_file():
        vision = VisionEncoderConfig.from_json(pathlib.Path(m.vision.blip2_dir) / "config.json",
                                               proj_dim=llm.hidden_size)
        sources["vision"] = str(pathlib.Path(m.vision.blip2_dir) / "config.json")
    elif m.vision.kind in ("lavis", "blip2"):
        vision = VisionEncoderConfig(proj_dim=llm.hidden_size)
        sources["vision"] = "default: EVA ViT-g + Q-Former"
    elif m.vision.kind != "none":
        raise ValueError(f"model.vision.kind={m.vision.kind!r}: expected 'lavis', 'blip2' or 'none'")

    cross = unet.cross_attention_dim[0]
    mapper = MapperConfig(llm_dim=llm.hidden_size, num_vokens=m.num_vokens, hidden=cross,
                          num_queries=(text_encoder or SD21_TEXT_ENCODER).max_position_embeddings,
                          enc_layers=m.mapper.enc_layers, dec_layers=m.mapper.dec_layers, heads=m.mapper.heads,
                          ff=m.mapper.ff)
    return ModelSizes(llm, vocab, vision, unet, vae, text_encoder, mapper, scheduler, sources)


# ------------------------------------------------------------------------------------- the model


def abstract_minigpt5(cfg, sizes: ModelSizes, *, train: bool) -> MiniGPT5:
    """The run's MiniGPT-5 with every weight a `jax.ShapeDtypeStruct`, in the dtypes `build.build_model`
    gives them (frozen parts in `model.frozen_dtype`; voken rows, LoRA and mapper in fp32). For
    inference (`train=False`) as `infer.py` builds it: no caption text encoder, voken rows in the
    frozen dtype and, with `model.int8_weights`, int8 LLM and ViT projections."""
    m = cfg.model
    frozen = config_dtype(m.frozen_dtype, "model.frozen_dtype")
    compute = config_dtype(m.compute_dtype, "model.compute_dtype")
    num_new = m.num_vokens + 1
    vocab = sizes.vocab_size
    voken_ids = tuple(range(vocab - num_new, vocab - 1))
    schedule = schedulers.NoiseSchedule.from_config(sizes.scheduler)

    def build() -> MiniGPT5:
        rngs = abstract_rngs(cfg.seed)
        llm = LlamaForCausalLM(sizes.llm, dtype=compute, param_dtype=frozen, attn_impl=m.attn_impl,
                               residual_dtype=config_dtype(m.residual_dtype, "model.residual_dtype"),
                               remat=llm_remat(cfg) if train else False, rngs=rngs)
        add_voken_rows(llm, num_new, vocab_size=vocab, param_dtype=jnp.float32 if train else frozen)
        if m.lora.enabled:
            lora_lib.apply_lora(llm, targets=m.lora.targets, rank=m.lora.rank, alpha=m.lora.alpha,
                                dropout=m.lora.dropout, param_dtype=jnp.float32, rngs=rngs)
        vision = None
        if sizes.vision is not None:
            vision = VisionEncoder(sizes.vision, dtype=compute, param_dtype=frozen, rngs=rngs)
        unet_cfg = dataclasses.replace(sizes.unet, remat=m.remat_unet if train else False,
                                       attention_impl=m.attn_impl)
        unet = UNet2DConditionModel(unet_cfg, dtype=compute, param_dtype=frozen, rngs=rngs)
        vae = AutoencoderKL(sizes.vae, dtype=compute, param_dtype=frozen, rngs=rngs)
        text_encoder = empty = None
        if sizes.text_encoder is not None and train:
            text_encoder = CLIPTextModel(sizes.text_encoder, dtype=compute, param_dtype=frozen, rngs=rngs)
            empty = jnp.zeros((sizes.mapper.num_queries, sizes.mapper.hidden), jnp.float32)
        mapper = VokenMapper(sizes.mapper, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
        config = minigpt5_config(
            cfg, voken_ids=voken_ids, image_placeholder_id=vocab - 1, bos_id=sizes.llm.bos_token_id or 1,
            num_query_tokens=sizes.vision.qformer.num_query_tokens if sizes.vision is not None else 32)
        model = MiniGPT5(config, llm=llm, mapper=mapper, unet=unet, vae=vae, noise_schedule=schedule,
                         vision=vision, text_encoder=text_encoder, empty_text_feature=empty)
        if not train and m.int8_weights:
            quantize_for_inference(model)
        return model

    return nnx.eval_shape(build)


# ------------------------------------------------------------------------------------ topology


def topology_devices(name: str) -> list:
    """The devices of a TPU topology (compile-only, no TPU needed), or the local ones for "cpu"."""
    if name == "cpu":
        return jax.devices("cpu")
    from jax.experimental import topologies

    kwargs = {"chips_per_host_bounds": CHIPS_PER_HOST[name]} if name in CHIPS_PER_HOST else {}
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices)
    except Exception as e:  # noqa: BLE001 - libtpu raises several kinds for a bad name
        raise ValueError(f"--topology={name!r}: not a TPU topology libtpu can describe "
                         f"(is the 'tpu' extra installed?): {type(e).__name__}: {e}") from e


def device_hbm(devices: Sequence) -> int | None:
    """HBM bytes of one device, or None when unknown (CPU)."""
    kind = devices[0].device_kind
    if kind not in HBM_PER_CHIP:
        return None
    cores = {getattr(d, "core_on_chip", 0) for d in devices}
    return HBM_PER_CHIP[kind] // len(cores)


def mesh_for(cfg, devices: Sequence) -> Mesh:
    """The run's (data, fsdp, tensor) mesh over `devices`, sized as `trainer.mesh` says."""
    t = cfg.trainer.mesh
    return parallel.make_mesh(t.data, t.fsdp, t.tensor, devices=list(devices))


# ------------------------------------------------------------------------------------ accounting


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    dtype = x.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):  # a key is stored as its key data (uint32 words)
        shape = (*shape, *jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), dtype)).shape)
        dtype = np.dtype(np.uint32)
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _flat(tree) -> dict[str, jax.ShapeDtypeStruct]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {keypath_str(path): x for path, x in leaves}


def part_of(path: str) -> str:
    """The part of the model a (parameter or optimizer-state) path belongs to."""
    match = _MODEL_PATH.search(path)
    if match:
        for part, pattern in PARTS:
            if re.match(pattern, match.group(2)):
                return part
    return "other"


def part_bytes(params, frozen, opt_state) -> dict[str, dict[str, int]]:
    """Per part: parameter count, bytes per device of trainable / frozen params and of optimizer state."""
    out: dict[str, dict[str, int]] = {}

    def add(tree, field, count=False):
        for path, x in _flat(tree).items():
            row = out.setdefault(part_of(path), {"params": 0, "trainable_bytes": 0, "frozen_bytes": 0,
                                                 "optimizer_bytes": 0})
            row[field] += _shard_bytes(x)
            if count:
                row["params"] += int(np.prod(x.shape, dtype=np.int64))

    add(params, "trainable_bytes", count=True)
    add(nnx.filter_state(frozen, nnx.Param), "frozen_bytes", count=True)
    add(opt_state, "optimizer_bytes")
    return dict(sorted(out.items()))


def abstract(tree, shardings):
    """`jax.ShapeDtypeStruct`s of `tree` placed on `shardings` (a matching tree)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def memory_report(compiled, hbm: int | None) -> dict:
    """Per-device bytes of a compiled program and whether it fits `hbm` with `MIN_FREE_FRACTION` left."""
    stats = compiled.memory_analysis()
    mem = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "code_bytes": int(stats.generated_code_size_in_bytes),
    }
    mem["total_bytes"] = (mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"] + mem["temp_bytes"]
                          + mem["code_bytes"])
    return dict(mem, **_fit(mem["total_bytes"], hbm))


def _fit(total: int, hbm: int | None) -> dict:
    out = {"total_gib": round(total / GIB, 3)}
    if hbm is not None:
        out.update(hbm_gib=round(hbm / GIB, 3), free_fraction=round(1 - total / hbm, 4),
                   fits=bool(total <= (1 - MIN_FREE_FRACTION) * hbm))
    return out


def flops(compiled) -> float | None:
    """FLOPs of one run of a compiled program on one device (XLA's cost analysis)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


# XLA:TPU refuses to compile a program that needs more than the device's HBM; the message gives the
# program's whole requirement (arguments, outputs and temporaries, "HLO temporaries" in its words)
_OUT_OF_HBM = re.compile(r"RESOURCE_EXHAUSTED:.*HLO temporaries \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def compile_program(fn, args: tuple, kwargs: dict, hbm: int | None):
    """Lower and compile `fn(*args, **kwargs)`; returns the compiled program (None when it does not
    fit) and its report: `memory`, `flops_per_device` and `compile_s`. A program too big for the
    device is reported with the bytes XLA asked for, as not fitting."""
    start = time.perf_counter()
    try:
        compiled = fn.lower(*args, **kwargs).compile()
    except jax.errors.JaxRuntimeError as e:
        match = _OUT_OF_HBM.search(str(e))
        if match is None:
            raise
        required = int(float(match.group(1)) * _UNITS[match.group(2)])
        arguments = sum(_shard_bytes(x) for x in jax.tree.leaves((args, kwargs))
                        if isinstance(x, jax.ShapeDtypeStruct))
        memory = {"argument_bytes": arguments, "total_bytes": required, "compile_error": str(e).splitlines()[0],
                  **_fit(required, hbm)}
        memory["fits"] = False
        return None, {"memory": memory, "flops_per_device": None, "compile_s": round(time.perf_counter() - start, 1)}
    seconds = round(time.perf_counter() - start, 1)
    return compiled, {"memory": memory_report(compiled, hbm), "flops_per_device": flops(compiled), "compile_s": seconds}


def _rules_json(rules) -> list:
    return [[name, list(axes) if isinstance(axes, tuple) else axes] for name, axes in rules]


# -------------------------------------------------------------------------------------- training


def train_batch(cfg, sizes: ModelSizes, batch_size: int, text_length: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of one training batch (layout in `mg5jax.data.pipeline`) at the largest bucket."""
    d = cfg.data
    m, g = d.max_input_images, cfg.loss.groups_per_sample
    q = sizes.vision.qformer.num_query_tokens if sizes.vision is not None else 32
    batch = {
        "input_ids": ((batch_size, text_length), jnp.int32),
        "attention_mask": ((batch_size, text_length), jnp.int32),
        "labels": ((batch_size, text_length), jnp.int32),
        "input_image_mask": ((batch_size, m), jnp.bool_),
        "output_image_mask": ((batch_size, g), jnp.bool_),
    }
    if sizes.vision is None or d.input_features_dir:
        batch["input_image_features"] = ((batch_size, m, q, sizes.llm.hidden_size), jnp.float32)
    else:
        s = d.input_image_size
        batch["input_images"] = ((batch_size, m, 3, s, s), jnp.float32)
    if d.output_moments_dir:
        h = d.output_image_size // sizes.vae.downsample_factor
        batch["output_moments"] = ((batch_size, g, 2 * sizes.vae.latent_channels, h, h), jnp.float32)
    else:
        s = d.output_image_size
        batch["output_images"] = ((batch_size, g, 3, s, s), jnp.float32)
    if cfg.loss.caption_weight > 0:
        n = sizes.mapper.num_queries
        batch.update(caption_ids=((batch_size, n), jnp.int32), caption_mask=((batch_size, n), jnp.int32),
                     has_caption=((batch_size,), jnp.bool_))
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in batch.items()}


def _place_batch(batch: dict, mesh: Mesh) -> dict:
    return {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.batch_sharding(mesh, x.ndim))
            for k, x in batch.items()}


def optimizer_config(cfg, global_batch: int) -> OptimizerConfig:
    """The run's optimizer settings, with accumulation derived as train.py does."""
    opt = cfg.trainer.optimizer.to_dict()
    opt["grad_accum_steps"] = grad_accum_steps(cfg, global_batch)
    if opt["total_steps"] is None:
        opt["total_steps"] = OptimizerConfig.total_steps
    return OptimizerConfig.from_dict(opt)


def plan_training(cfg, devices: Sequence, *, batch_per_device: int | None = None,
                  text_length: int | None = None, sizes: ModelSizes | None = None) -> dict:
    """Compile the run's train step for `devices` on abstract state; report memory, FLOPs and parts."""
    sizes = sizes or model_sizes(cfg)
    mesh = mesh_for(cfg, devices)
    check_training_mesh(mesh)
    per_device = batch_per_device or cfg.data.per_device_batch_size
    global_batch = per_device * len(devices)
    text_length = text_length or max(cfg.data.length_buckets)
    model = abstract_minigpt5(cfg, sizes, train=True)
    masks = (voken_row_masks(model, cfg.model.num_vokens + 1, cfg.trainer.optimizer.trainable)
             if cfg.model.train_new_rows_only else None)
    opt_cfg = optimizer_config(cfg, global_batch)
    tx, trainable = build_optimizer(model, opt_cfg, update_masks=masks)
    optimizer = nnx.eval_shape(lambda mdl: nnx.Optimizer(mdl, tx, wrt=trainable), model)
    model_def, params, frozen = nnx.split(model, trainable, ...)
    opt_def, opt_state = nnx.split(optimizer)
    param_sh = parallel.state_shardings(params, mesh)
    opt_sh = parallel.state_shardings(opt_state, mesh)
    args = (abstract(params, param_sh), abstract(opt_state, opt_sh),
            abstract(frozen, parallel.state_shardings(frozen, mesh)),
            _place_batch(train_batch(cfg, sizes, global_batch, text_length), mesh),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec())))
    step = make_train_step(model_def, opt_def, trainable, jax.random.key(cfg.seed), param_shardings=param_sh,
                           opt_shardings=opt_sh, mesh=mesh, grad_masks=resolve_masks(masks, params))
    with jax.set_mesh(mesh):
        _, report = compile_program(step, args, {}, device_hbm(devices))
    q = sizes.vision.qformer.num_query_tokens if sizes.vision is not None else 32
    return {
        "program": "train_step",
        "batch": {"per_device": per_device, "global": global_batch, "grad_accum_steps": opt_cfg.grad_accum_steps,
                  "text_tokens": text_length, "input_images": cfg.data.max_input_images,
                  "llm_length": 1 + text_length + (q - 1) * cfg.data.max_input_images,
                  "target": ("vae moments" if cfg.data.output_moments_dir
                             else f"{cfg.data.output_image_size}px image")},
        "remat": {"llm": llm_remat(cfg), "unet": cfg.model.remat_unet},
        **report,
        "parts": part_bytes(args[0], args[2], args[1]),
    }


# ------------------------------------------------------------------------------------ generation


def _decode_state_sharding(x: jax.ShapeDtypeStruct, batch: int, batch_sh, replicated) -> NamedSharding:
    """A decode-loop state leaf: batch-major ones (the KV cache included) like the batch, the others
    replicated."""
    return batch_sh(x.ndim) if x.ndim and x.shape[0] == batch else replicated


def _llm_sampling(settings: GenerationSettings, num_new: int,
                  vocab: int) -> tuple[SamplingConfig, decode.ForcedInsertion]:
    """The decode settings and voken insertion `InterleavedGenerator` uses, with Vicuna v0's ids (eos 1,
    bos 0, "###" as [835] or [2277, 29937]; REFERENCE §7) in place of a tokenizer's."""
    sampling = settings.sampling(eos_ids=(1,), seen_ids=(0,), stop_sequences=((835,), (2277, 29937)), pad_id=0)
    return sampling, settings.insertion(range(vocab - num_new, vocab - 1))


def plan_generation(cfg, devices: Sequence, *, prompts: int = 8, text_length: int | None = None,
                    settings: GenerationSettings = GenerationSettings(), sizes: ModelSizes | None = None) -> dict:
    """Compile the generation programs for `devices` with every weight resident and sharded by the rules.

    Programs: `splice` (vision encoder + embedding of the prompts), `prefill` and `decode` (the
    KV-cache loop of `generation.decode`), `render` (mapper-conditioned guided sampler with CFG and
    VAE decode for `prompts × max_images` images, `render_batch` per call). `resident` is the peak while a program runs with
    the whole model on the devices: all weights + that program's other inputs, outputs and temps.
    """
    sizes = sizes or model_sizes(cfg)
    mesh = mesh_for(cfg, devices)
    hbm = device_hbm(devices)
    text_length = text_length or max(cfg.data.length_buckets)
    model = abstract_minigpt5(cfg, sizes, train=False)
    graphdef, state = nnx.split(model)
    shardings = parallel.state_shardings(state, mesh)
    placed = abstract(state, shardings)
    model_bytes = sum(_shard_bytes(x) for x in jax.tree.leaves(placed))
    b = prompts
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_devices = int(np.prod([mesh.shape[a] for a in parallel.batch_sharding(mesh, 1).spec[0] or ()]))

    def batch_sh(ndim, rows=b):  # the batch over the batch axes, replicated where it does not split evenly
        return parallel.batch_sharding(mesh, ndim) if rows % batch_devices == 0 else replicated

    programs: dict[str, dict] = {}

    def run(name, weight_args, fn, *args, **kwargs):
        compiled, report = compile_program(fn, args, kwargs, hbm)
        weights = sum(_shard_bytes(x) for x in jax.tree.leaves(weight_args))
        resident = model_bytes + report["memory"]["total_bytes"] - weights
        programs[name] = {**report, "weights_bytes": weights, "resident_bytes": resident,
                          **{f"resident_{k}": v for k, v in _fit(resident, hbm).items()}}
        return compiled

    # 1. splice: prompt text embeddings with each image's Q vision tokens in place
    batch = train_batch(cfg, sizes, b, text_length)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh(v.ndim)) for k, v in batch.items()
             if k in ("input_ids", "attention_mask", "labels", "input_images", "input_image_features")}

    with jax.set_mesh(mesh):  # the jitted splice `InterleavedGenerator` runs
        run("splice", placed, interleaved._splice_program.jitted, graphdef, placed, batch)
    embeds, mask = jax.eval_shape(interleaved._splice_program.jitted, graphdef, placed, batch)

    # 2-3. prefill and the decode loop: the jitted functions `generation.decode.generate` runs
    sampling, insertion = _llm_sampling(settings, cfg.model.num_vokens + 1, sizes.vocab_size)
    llm_def, llm_state = nnx.split(model.llm)
    llm_placed = abstract(llm_state, parallel.state_shardings(llm_state, mesh))
    embeds = jax.ShapeDtypeStruct(embeds.shape, embeds.dtype, sharding=batch_sh(3))
    mask = jax.ShapeDtypeStruct(mask.shape, jnp.bool_, sharding=batch_sh(2))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    seeds = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sh(1))
    shapes = jax.eval_shape(functools.partial(decode._start, llm_def, sampling, insertion), llm_placed, None,
                            embeds, mask, key, seeds)
    with jax.set_mesh(mesh):
        run("prefill", llm_placed, decode._start_program.jitted, llm_def, sampling, insertion, llm_placed, None,
            embeds, mask, key, seeds)
        # the loop state (KV cache included) split like the batch
        decode_state = abstract(shapes, jax.tree.map(lambda x: _decode_state_sharding(x, b, batch_sh, replicated), shapes))
        limit = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
        run("decode", llm_placed, decode._advance_program.jitted, llm_def, sampling, insertion, llm_placed,
            decode_state, limit)
    cache = decode_state.cache
    kv_bytes = sum(_shard_bytes(x) for x in (*cache.k, *cache.v))

    # 4. render: the guided sampler's program (PNDM with CFG, then VAE decode) on every voken window's
    # conditioning (the mapper runs apart from it and is tiny)
    # images per sampler call: its largest, as InterleavedGenerator pads it
    n_images = interleaved.render_call_size(min(prompts * settings.max_images, settings.render_batch),
                                            settings.render_batch)
    factor = sizes.vae.downsample_factor
    size = settings.image_size or sizes.unet.sample_size * factor
    latent_shape = (sizes.unet.in_channels, size // factor, size // factor)
    scheduler = schedulers.make_scheduler(settings.scheduler, sizes.scheduler)
    sched_state = scheduler.set_timesteps(settings.num_inference_steps, (n_images, *latent_shape))
    sched_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype,
                                                              sharding=replicated), sched_state)
    unet_def, unet_state = nnx.split(model.unet)
    vae_def, vae_state = nnx.split(model.vae)
    weights = tuple(abstract(w, parallel.state_shardings(w, mesh)) for w in (unet_state, vae_state))
    cond = jax.ShapeDtypeStruct((n_images, sizes.mapper.num_queries, sizes.mapper.hidden), jnp.float32,
                                sharding=batch_sh(3, n_images))
    guidance = jax.ShapeDtypeStruct((n_images,), jnp.float32, sharding=batch_sh(1, n_images))
    render_seeds = jax.ShapeDtypeStruct((n_images,), jnp.uint32, sharding=batch_sh(1, n_images))
    with jax.set_mesh(mesh):
        run("render", weights, sampler_lib._sampler_program.jitted, unet_def, vae_def, scheduler, True, latent_shape,
            *weights, sched_state, cond, cond, guidance, None, render_seeds, key)

    peak = max(p["resident_bytes"] for p in programs.values())
    return {
        "program": "generation",
        "settings": {"prompts": prompts, "text_tokens": text_length, "input_images": cfg.data.max_input_images,
                     "prompt_length": int(embeds.shape[1]), "max_new_tokens": settings.max_new_tokens,
                     "max_images_per_prompt": settings.max_images, "images_per_render_call": n_images,
                     "image_size": size, "scheduler": settings.scheduler,
                     "steps": settings.num_inference_steps, "guidance_scale": settings.guidance_scale,
                     "kv_cache_slots": int(cache.k[0].shape[2])},
        "weights_bytes": model_bytes,
        "kv_cache_bytes": kv_bytes,
        "programs": programs,
        "resident_peak_bytes": peak,
        **{f"resident_peak_{k}": v for k, v in _fit(peak, hbm).items()},
        "parts": part_bytes(nnx.State({}), placed, nnx.State({})),
    }


# ------------------------------------------------------------------------------------------ CLI


def plan(cfg, topology: str, *, generate: bool = False, batch_per_device: int | None = None,
         text_length: int | None = None, prompts: int = 8, effort: float = QUICK_EFFORT,
         config_path: str = "") -> dict:
    """The JSON report of `python -m mg5jax.plan` for a run config on a topology.

    `effort` is XLA's execution-time optimization effort for these compiles (-1 … 1; runs use 0).
    """
    devices = topology_devices(topology)
    sizes = model_sizes(cfg)
    mesh = mesh_for(cfg, devices)
    # jax 0.11 dropped the setting (its compiles run at XLA's default effort, reported as None)
    settable = "jax_exec_time_optimization_effort" in jax.config.values
    effort = effort if settable else None
    if settable:
        previous = jax.config.jax_exec_time_optimization_effort
        jax.config.update("jax_exec_time_optimization_effort", effort)
    try:
        if generate:
            result = plan_generation(cfg, devices, prompts=prompts, text_length=text_length, sizes=sizes)
        else:
            result = plan_training(cfg, devices, batch_per_device=batch_per_device, text_length=text_length,
                                   sizes=sizes)
    finally:
        if settable:
            jax.config.update("jax_exec_time_optimization_effort", previous)
    return {
        "config": config_path,
        "topology": topology,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "hbm_per_device_bytes": device_hbm(devices),
        "exec_time_optimization_effort": effort,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "rules": _rules_json(parallel.DEFAULT_RULES),
        "dtypes": {"frozen": cfg.model.frozen_dtype, "compute": cfg.model.compute_dtype},
        "sizes_from": sizes.sources,
        **result,
    }


def _flags(argv: Sequence[str]):
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    # `--config.a.b=value` overrides are defined from the config file named in `argv`
    config_flags.DEFINE_config_file("config", None, "Python config file (ml_collections).", flag_values=fv,
                                    sys_argv=list(argv))
    flags.DEFINE_string("topology", "v5e:2x4", "TPU topology (v5e:2x4, v5e:1x1, v4:2x2x1, v5p:2x2x1, ...) "
                        "or 'cpu' for the local devices", flag_values=fv)
    flags.DEFINE_bool("generate", False, "plan the generation programs instead of the train step", flag_values=fv)
    flags.DEFINE_integer("batch_per_device", None, "examples per device (default: data.per_device_batch_size)",
                         flag_values=fv)
    flags.DEFINE_integer("text_length", None, "text tokens per example (default: the largest length bucket)",
                         flag_values=fv)
    flags.DEFINE_integer("prompts", 8, "prompts per generation batch", flag_values=fv)
    flags.DEFINE_float("effort", QUICK_EFFORT, "XLA exec-time optimization effort of the compiles (-1 … 1; "
                       "training and inference compile with 0)", flag_values=fv)
    flags.DEFINE_string("out", "", "also write the JSON report to this file", flag_values=fv)
    return fv


def cli(argv: Sequence[str]) -> dict:
    """`python -m mg5jax.plan` with `argv` (program name first): print the JSON report and return it."""
    fv = _flags(argv)
    parse_flags("mg5jax.plan", list(argv), fv)
    if fv.config is None:
        raise ValueError("--config is required, e.g. --config configs/stage2_vist.py")
    check_config_fields("mg5jax.plan", fv.config, fv["config"].config_filename)
    report = plan(fv.config, fv.topology, generate=fv.generate, batch_per_device=fv.batch_per_device,
                  text_length=fv.text_length, prompts=fv.prompts, effort=fv.effort, config_path=fv["config"].config_filename)
    text = json.dumps(report, indent=2)
    if fv.out:
        pathlib.Path(fv.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(fv.out).write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run_module("mg5jax.plan", "usage: python -m mg5jax.plan --config CONFIG [--config.a.b=value …] [flags]", _flags, cli)
