"""MiniGPT-5 train step: our jitted `Trainer.train_step` vs an equivalent PyTorch step on the same CPU.

Both sides train the stage-1 set (the 9 new rows of embed_tokens / lm_head, the whole voken mapper
at 10× lr) with AdamW (weight decay 0.01) on the same batch, fp32 throughout. The objective is the
VIST one with the caption loss off: splice the input-image features into the text, LLM
cross-entropy, voken windows → mapper (CFG drop 0.1), VAE posterior sample of the target image,
noise, min-SNR-5 ε-MSE through the U-Net. Input images come as precomputed features `[B, M, 32, D]`
on both sides (no ViT: `model.vision.kind = "none"` with `data.input_features_dir`); the target
images go through the frozen VAE encoder inside the step, as in the original.

The models are random and built offline in a temporary directory with `mg5jax.tiny`'s builders (a
LLaMA of `--llm-hidden` × `--llm-layers`, the tiny SD-2.1-shaped U-Net/VAE for `--image-size`
targets); the batch comes from our data pipeline over synthetic VIST stories. The PyTorch side is
transformers `LlamaForCausalLM` + diffusers `UNet2DConditionModel` / `AutoencoderKL` + the
original's mapper (`nn.Transformer`), loaded from the same weights (our LLM with its voken rows
saved in the HF layout, our mapper exported to the original's keys), with `torch.optim.AdamW`, the
same warmup/decay schedule and the original's gradient hooks on the vocab matrices (our side masks
the updates instead, so its old rows also escape weight decay). Both run the same text loss on
the first step (`text_loss_first_step` checks it).

Every side runs in its own subprocess, started by a parent that imports neither framework, so
`ru_maxrss` is that side's peak host memory: ours, then PyTorch at each `--torch-threads`, repeated
`--rounds` times to even out the load of a shared machine. The first step (our compile) is timed
apart; `--steps` steady steps then give each run's median step time, and each side reports the
median over rounds. `--profile` also times the same pieces of the
step (LLM, VAE encoder, mapper + U-Net) on both sides. Prints one JSON object.

    .venv/bin/python benchmarks/train_step.py [--batch 2] [--steps 10] [--rounds 2] [--torch-threads 1 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_VOKENS = 8
QUERY_TOKENS = 32  # input-image features per <ImageHere> (the Q-Former's 32 queries)
MAPPER_LR_MULT = 10.0
TRAINABLE = (  # configs/stage1_cc3m.py
    (r"llm\.model\.embed_tokens\..*", 1.0),  # only the new rows move (update mask)
    (r"llm\.lm_head\..*", 1.0),
    (r"mapper\..*", MAPPER_LR_MULT),
)
OPTIMIZER = dict(learning_rate=2e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, warmup_steps=2,
                 total_steps=1000)


# ------------------------------------------------------------------------------------ shared setup


def _memory_mib() -> dict[str, float]:
    """Resident memory of this process, MiB: now (VmRSS), peak (ru_maxrss) and the peak of this
    program image (VmHWM; ru_maxrss also counts the parent's RSS at fork, hence the thin parent)."""
    status = dict(line.split(":", 1) for line in pathlib.Path("/proc/self/status").read_text().splitlines())
    return {"rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "hwm_rss_mib": round(int(status["VmHWM"].split()[0]) / 1024, 1)}


def _config(work: pathlib.Path, args):
    """Our run config: the demo config with this benchmark's models, data and stage-1 trainable set."""
    sys.path.insert(0, str(REPO))
    from configs import demo

    c = demo.get_config()
    c.model.llm_path = str(work / "llm")
    c.model.sd_path = str(work / "sd")
    c.model.vision.kind = "none"
    c.model.attn_impl = args.attn_impl
    c.model.train_new_rows_only = True
    c.model.mapper.enc_layers = args.mapper_layers
    c.model.mapper.dec_layers = args.mapper_layers
    c.model.mapper.heads = 4
    c.model.mapper.ff = 4 * args.cross_dim
    c.loss.caption_weight = 0.0
    c.loss.group_rows = 0  # one mean over the batch, as the PyTorch step computes it
    c.data.train_path = str(work / "data" / "VIST" / "train_cleaned.json")
    c.data.val_path = ""
    c.data.input_features_dir = str(work / "features")
    c.data.length_buckets = tuple(args.buckets)
    c.data.output_image_size = args.image_size
    c.trainer.workdir = str(work / "run")
    c.trainer.async_checkpointing = False
    c.trainer.optimizer.update(OPTIMIZER)
    c.trainer.optimizer.trainable = TRAINABLE
    c.trainer.optimizer.grad_accum_steps = 1
    return c


def prepare(work: pathlib.Path, args) -> dict:
    """Build the models, the data and one batch under `work`; write what the PyTorch side loads."""
    from mg5jax import tiny

    data = work / "data"
    tiny.write_synthetic_vist(data, num_stories=24, image_size=args.image_size, seed=0)
    tiny.write_synthetic_cc3m(data, num_rows=200, image_size=args.image_size, seed=0)  # tokenizer corpus only
    tiny.build_llm_dir(work / "llm", tiny.demo_corpus(data), hidden_size=args.llm_hidden, layers=args.llm_layers,
                       heads=args.llm_hidden // 64, intermediate=args.llm_hidden * 8 // 3 // 16 * 16, seed=0)
    tiny.build_sd_dir(work / "sd", image_size=args.image_size, cross_attention_dim=args.cross_dim, seed=0)
    rng = np.random.default_rng(0)
    features = work / "features"
    features.mkdir()
    for png in (data / "VIST" / "train_images").glob("*.png"):
        np.save(features / f"{png.stem}.npy",
                rng.normal(0.0, 0.02, size=(QUERY_TOKENS, args.llm_hidden)).astype(np.float32))

    import jax
    from flax import nnx
    from safetensors.numpy import save_file

    from mg5jax import build
    from mg5jax.convert.mapper import export_mapper_params
    from mg5jax.data import pipeline

    cfg = _config(work, args)
    built = build.build_model(cfg, train=True)
    samples = build.read_samples("vist", cfg.data.train_path, test=False, seed=cfg.seed, strict=True)
    ds = pipeline.make_dataset(samples, build.make_builder(cfg, built, args.batch, train=True), seed=cfg.seed,
                               shuffle=True, num_epochs=None)
    batch = next(iter(ds))
    np.savez(work / "batch.npz", **batch)
    model = built.model
    model.llm.save_pretrained(work / "torch_llm")
    save_file(dict(export_mapper_params(nnx.state(model.mapper))), str(work / "mapper.safetensors"))
    ids = built.tokenizer.ids
    c = model.config
    meta = {
        "voken0": ids.voken_ids[0], "placeholder": ids.image_placeholder_id, "bos": ids.bos_id,
        "num_new_rows": built.num_new_rows, "cfg_drop": c.cfg_drop, "snr_gamma": c.snr_gamma,
        "text_weight": c.text_loss_weight, "image_weight": c.image_loss_weight,
        "alphas_cumprod": np.asarray(model.alphas_cumprod[...]).tolist(),
        "mapper": dataclasses.asdict(model.mapper.cfg),
    }
    (work / "meta.json").write_text(json.dumps(meta))
    n_params = {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(part, nnx.Param)))
                for name, part in (("llm", model.llm), ("mapper", model.mapper), ("unet", model.unet),
                                   ("vae", model.vae))}
    m = batch["input_image_features"].shape[1]
    return {"params": n_params, "batch_shapes": {k: list(v.shape) for k, v in batch.items()},
            "spliced_length": 1 + batch["input_ids"].shape[1] + (QUERY_TOKENS - 1) * m,
            "input_images_in_batch": int(batch["input_image_mask"].sum()), "latent_size": args.image_size // 8}


def _load_batch(work: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(work / "batch.npz") as z:
        return {k: z[k] for k in z.files}


def _median_time(fn, n: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _timed_run(step, batch, steps: int, after_load: dict) -> dict:
    """First step, then `steps` steady steps; step times and memory at each stage."""
    start = time.perf_counter()
    first_terms = step(batch)
    first = time.perf_counter() - start
    after_first = _memory_mib()
    median, times = _median_time(lambda: step(batch), steps)
    return {"first_step_s": first, "step_s": median, "step_times_s": times, "first_step_terms": first_terms,
            "memory_after_load": after_load, "memory_after_first_step": after_first, **_memory_mib()}


# ------------------------------------------------------------------------------------------ ours


def run_jax(work: pathlib.Path, args) -> dict:
    import jax

    from mg5jax import build
    from mg5jax.training.trainer import Trainer, TrainerConfig

    imported = {**_memory_mib(), "heavy_modules": sorted({"torch", "transformers", "diffusers"} & set(sys.modules))}
    cfg = _config(work, args)
    built = build.build_model(cfg, train=True)
    masks = build.voken_row_masks(built.model, built.num_new_rows)
    trainer = Trainer(built.model, TrainerConfig.from_dict(cfg.trainer.to_dict()), update_masks=masks)
    batch = _load_batch(work)
    out = _timed_run(trainer.train_step, batch, args.steps, _memory_mib())
    trainer.close()
    out.update(compile_s=out["first_step_s"] - out["step_s"], memory_after_imports=imported,
               jax=jax.__version__, backend=jax.default_backend(), xla_flags=os.environ.get("XLA_FLAGS", ""))
    if args.profile:
        out["profile"] = profile_jax(trainer, batch, args.steps)
    return out


def profile_jax(trainer, batch: dict, steps: int) -> dict:
    """Median times of jitted pieces of our step (the pieces `profile_torch` times), compile excluded."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    graphdef, params, frozen = nnx.split(trainer.model, trainer.trainable, ...)
    batch = jax.tree.map(jnp.asarray, batch)
    key = jax.random.key(0)
    s, h = batch["input_ids"].shape[0], batch["output_images"].shape[-1] // 8
    k_win, k_lat = jax.random.split(key)
    windows = jax.random.normal(k_win, (s, NUM_VOKENS, trainer.model.llm.config.hidden_size))
    latents = jax.random.normal(k_lat, (s, 4, h, h))
    timesteps = jnp.arange(s, dtype=jnp.int32) * 97

    def loss(p, fz, b):
        return nnx.merge(graphdef, p, fz).loss(b, key)["loss"]

    def text_loss(p, fz, b):
        m = nnx.merge(graphdef, p, fz)
        embeds, att, labels = m.splice(b)
        logits, targets = m.llm(inputs_embeds=embeds, attention_mask=att).logits[:, :-1], labels[:, 1:]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))
        return jnp.sum(jnp.where(targets >= 0, ce, 0.0)) / jnp.maximum(jnp.sum(targets >= 0), 1)

    def unet_loss(p, fz, b):
        m = nnx.merge(graphdef, p, fz)
        return jnp.mean(jnp.square(m.unet(latents, timesteps, m.conditioning(windows))))

    def vae_encode(p, fz, b):
        return nnx.merge(graphdef, p, fz).vae.encode(b["output_images"][:, 0]).mean

    pieces = {"loss_forward": loss, "loss_forward_backward": jax.grad(loss), "llm_forward": text_loss,
              "llm_forward_backward": jax.grad(text_loss), "mapper_unet_forward_backward": jax.grad(unet_loss),
              "vae_encode": vae_encode}
    out = {}
    for name, fn in pieces.items():
        compiled = jax.jit(fn).lower(params, frozen, batch).compile()

        def run(compiled=compiled):
            jax.block_until_ready(compiled(params, frozen, batch))

        run()
        out[name + "_s"] = _median_time(run, steps)[0]
    return out


# --------------------------------------------------------------------------------------- PyTorch


def _torch_mapper(cfg: dict):
    import warnings

    import torch

    class TorchMapper(torch.nn.Module):
        """The original's mapper (fc → nn.Transformer, 77 learned queries), with its attribute names."""

        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Sequential(torch.nn.Linear(cfg["llm_dim"], cfg["hidden"]), torch.nn.GELU(),
                                          torch.nn.Linear(cfg["hidden"], cfg["hidden"]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # enable_nested_tensor is off with norm_first
                self.llm_to_t2i_mapping = torch.nn.Transformer(
                    d_model=cfg["hidden"], nhead=cfg["heads"], num_encoder_layers=cfg["enc_layers"],
                    num_decoder_layers=cfg["dec_layers"], dim_feedforward=cfg["ff"], dropout=0.0,
                    layer_norm_eps=cfg["layer_norm_eps"], batch_first=True, norm_first=True)
            self.t2i_decoder_prompt = torch.nn.Parameter(torch.zeros(1, cfg["num_queries"], cfg["hidden"]))

        def forward(self, voken_hidden_states):
            src = self.fc(voken_hidden_states)
            tgt = self.t2i_decoder_prompt.repeat(voken_hidden_states.shape[0], 1, 1)
            return self.llm_to_t2i_mapping(src, tgt)

    return TorchMapper()


class TorchStep:
    """The MiniGPT-5 stage-1 train step in PyTorch, batched (the objective of `MiniGPT5.loss`)."""

    def __init__(self, work: pathlib.Path, threads: int):
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from safetensors.torch import load_file
        from transformers import LlamaForCausalLM

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.torch = torch
        self.meta = meta = json.loads((work / "meta.json").read_text())
        self.llm = LlamaForCausalLM.from_pretrained(work / "torch_llm", dtype=torch.float32).train()
        self.unet = UNet2DConditionModel.from_pretrained(work / "sd" / "unet").train()
        self.vae = AutoencoderKL.from_pretrained(work / "sd" / "vae").eval()
        self.mapper = _torch_mapper(meta["mapper"]).train()
        self.mapper.load_state_dict(load_file(str(work / "mapper.safetensors")))
        for module in (self.llm, self.unet, self.vae):
            module.requires_grad_(False)
        embed, head = self.llm.get_input_embeddings().weight, self.llm.lm_head.weight
        rows = torch.zeros(embed.shape[0], 1)
        rows[-meta["num_new_rows"]:] = 1.0
        for w in (embed, head):  # the original's hooks: only the new rows get gradients
            w.requires_grad_(True)
            w.register_hook(lambda g: g * rows)
        self.alphas_cumprod = torch.tensor(meta["alphas_cumprod"], dtype=torch.float32)
        o = OPTIMIZER
        self.optimizer = torch.optim.AdamW(
            [{"params": [embed, head], "lr": o["learning_rate"]},
             {"params": list(self.mapper.parameters()), "lr": o["learning_rate"] * MAPPER_LR_MULT}],
            betas=(o["b1"], o["b2"]), eps=o["eps"], weight_decay=o["weight_decay"])
        warm, total = o["warmup_steps"], o["total_steps"]
        self.schedule = torch.optim.lr_scheduler.LambdaLR(  # HF linear warmup/decay, as our optimizer
            self.optimizer, lambda n: n / max(1, warm) if n < warm else max(0.0, (total - n) / max(1, total - warm)))

    def splice(self, batch):
        """`<s>` + text with each `<ImageHere>` replaced by its Q features, right-padded to L = 1+T+(Q-1)·M.

        Returns `inputs_embeds [B,L,D]`, `attention_mask [B,L]`, `labels [B,L]` (our layout, batched).
        """
        torch = self.torch
        ids, mask, labels, feats = (batch[k] for k in ("input_ids", "attention_mask", "labels",
                                                       "input_image_features"))
        b, t = ids.shape
        m, q, d = feats.shape[1:]
        length = 1 + t + (q - 1) * m
        embed = self.llm.get_input_embeddings()
        is_slot = (ids == self.meta["placeholder"]) & (mask > 0)
        before = torch.cumsum(is_slot, 1) - is_slot.long()
        out_pos = 1 + torch.arange(t)[None] + (q - 1) * before
        text_pos = torch.where(is_slot, length, out_pos)  # slot tokens land in an extra row, dropped below
        slot_start = torch.full((b, m + 1), length).scatter(1, torch.where(is_slot, before, m), out_pos)[:, :m]
        image_pos = torch.where(slot_start[:, :, None] == length, length,
                                slot_start[:, :, None] + torch.arange(q)).reshape(b, m * q)
        embeds = torch.zeros(b, length + 1, d).scatter(1, text_pos[..., None].expand(-1, -1, d), embed(ids))
        embeds = embeds.scatter(1, image_pos[..., None].expand(-1, -1, d), feats.reshape(b, m * q, d))
        embeds = torch.cat([embed(torch.full((b, 1), self.meta["bos"])), embeds[:, 1:length]], 1)
        att = torch.zeros(b, length + 1, dtype=torch.long).scatter(1, text_pos, mask.long())
        att = att.scatter(1, image_pos, 1)[:, :length]
        att[:, 0] = 1
        lab = torch.full((b, length + 1), -100).scatter(1, text_pos, labels.long())[:, :length]
        return embeds, att, lab

    def text(self, batch):
        """Hidden states `[B,L,D]`, the shifted LLM cross-entropy and the spliced labels."""
        embeds, att, labels = self.splice(batch)
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=att).last_hidden_state
        logits = self.llm.lm_head(hidden)
        text_loss = self.torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return hidden, text_loss, labels

    def loss(self, batch) -> dict:
        torch, meta = self.torch, self.meta
        hidden, text_loss, labels = self.text(batch)
        is_voken = labels == meta["voken0"]
        valid = is_voken.any(1) & batch["output_image_mask"][:, 0]
        idx = (is_voken.int().argmax(1)[:, None] - 1 + torch.arange(NUM_VOKENS)).clamp(0, hidden.shape[1] - 1)
        windows = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))[valid]  # [S, W, D]
        s = windows.shape[0]
        drop = torch.rand(s) < meta["cfg_drop"]
        cond = self.mapper(torch.where(drop[:, None, None], torch.zeros_like(windows), windows))
        with torch.no_grad():
            dist = self.vae.encode(batch["output_images"][:, 0][valid]).latent_dist
            latents = dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.alphas_cumprod.shape[0], (s,))
        abar = self.alphas_cumprod[timesteps][:, None, None, None]
        pred = self.unet(abar.sqrt() * latents + (1 - abar).sqrt() * noise, timesteps,
                         encoder_hidden_states=cond).sample
        snr = abar.flatten() / (1 - abar.flatten())
        weight = torch.clamp(snr, max=meta["snr_gamma"]) / snr
        image_loss = (((pred - noise) ** 2).mean(dim=(1, 2, 3)) * weight).mean()
        loss = meta["text_weight"] * text_loss + meta["image_weight"] * image_loss
        return {"loss": loss, "text_loss": text_loss, "image_loss": image_loss}

    def step(self, batch) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.loss(batch)
        terms["loss"].backward()
        self.optimizer.step()
        self.schedule.step()
        return {k: float(v.detach()) for k, v in terms.items()}


def run_torch(work: pathlib.Path, args) -> dict:
    import diffusers  # noqa: F401  (the imports the step needs, for the after-imports memory)
    import torch
    import transformers  # noqa: F401

    imported = _memory_mib()
    step = TorchStep(work, args.threads)
    batch = {k: torch.from_numpy(v) for k, v in _load_batch(work).items()}
    out = _timed_run(step.step, batch, args.steps, _memory_mib())
    out.update(threads=args.threads, memory_after_imports=imported, torch=torch.__version__)
    if args.profile:
        out["profile"] = profile_torch(step, batch, args.steps)
    return out


def profile_torch(step: TorchStep, batch: dict, steps: int) -> dict:
    """Median times of the pieces `profile_jax` times, eager."""
    torch = step.torch
    s, h = batch["input_ids"].shape[0], batch["output_images"].shape[-1] // 8
    windows = torch.randn(s, NUM_VOKENS, step.llm.config.hidden_size)
    latents = torch.randn(s, 4, h, h)
    timesteps = torch.arange(s) * 97

    def backward(fn):
        def run():
            step.optimizer.zero_grad(set_to_none=True)
            fn().backward()
        return run

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def unet_loss():
        return step.unet(latents, timesteps, encoder_hidden_states=step.mapper(windows)).sample.square().mean()

    pieces = {
        "loss_forward": no_grad(lambda: step.loss(batch)),
        "loss_forward_backward": backward(lambda: step.loss(batch)["loss"]),
        "llm_forward": no_grad(lambda: step.text(batch)),
        "llm_forward_backward": backward(lambda: step.text(batch)[1]),
        "mapper_unet_forward_backward": backward(unet_loss),
        "vae_encode": no_grad(lambda: step.vae.encode(batch["output_images"][:, 0]).latent_dist.mean),
    }
    out = {}
    for name, fn in pieces.items():
        fn()
        out[name + "_s"] = _median_time(fn, steps)[0]
    step.optimizer.zero_grad(set_to_none=True)
    return out


# ---------------------------------------------------------------------------------------- driver


def _child(side: str, work: pathlib.Path, args, threads: int | None = None) -> dict:
    """Run one side (or the preparation) in a fresh interpreter; its last stdout line is its JSON."""
    cmd = [sys.executable, __file__, "--side", side, "--work", str(work), "--steps", str(args.steps),
           "--batch", str(args.batch), "--llm-hidden", str(args.llm_hidden), "--llm-layers", str(args.llm_layers),
           "--attn-impl", args.attn_impl, "--mapper-layers", str(args.mapper_layers),
           "--cross-dim", str(args.cross_dim), "--image-size", str(args.image_size),
           "--buckets", *map(str, args.buckets)]
    env = dict(os.environ)
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if side == "jax" and args.xla_flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    if args.profile and side != "prepare":
        cmd.append("--profile")
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode:
        sys.exit(f"train_step.py: the {side} side failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "load_average_1min_at_start": load}


def _summary(runs: list[dict], batch: int) -> dict:
    """Medians over rounds (each round's step time is itself a median), with every round kept."""
    def med(key):
        return statistics.median(r[key] for r in runs)

    out = {"step_s": med("step_s"), "samples_per_s": batch / med("step_s"), "first_step_s": med("first_step_s"),
           "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "hwm_rss_mib": max(r["hwm_rss_mib"] for r in runs)}
    if "compile_s" in runs[0]:
        out["compile_s"] = med("compile_s")
    if "profile" in runs[0]:
        out["profile"] = {k: statistics.median(r["profile"][k] for r in runs) for k in runs[0]["profile"]}
    return {**out, "rounds": runs}


def _rounded(x):
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return round(x, 4) if isinstance(x, float) else x


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2, help="samples per step (the original's per-device batch)")
    p.add_argument("--steps", type=int, default=10, help="steady steps timed per run (after the first)")
    p.add_argument("--rounds", type=int, default=2, help="times each side runs, alternating")
    p.add_argument("--torch-threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--llm-hidden", type=int, default=256)
    p.add_argument("--llm-layers", type=int, default=4)
    p.add_argument("--mapper-layers", type=int, default=2, help="encoder and decoder layers of the mapper")
    p.add_argument("--cross-dim", type=int, default=64, help="U-Net cross-attention (= mapper) width")
    p.add_argument("--image-size", type=int, default=128, help="target image side (latents are /8)")
    p.add_argument("--buckets", type=int, nargs="+", default=[96, 128, 160], help="text length buckets")
    p.add_argument("--attn-impl", choices=["reference", "fused"], default="reference")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for our side only")
    p.add_argument("--profile", action="store_true", help="also time the same pieces of the step on both sides")
    p.add_argument("--side", choices=["prepare", "jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--work", type=pathlib.Path, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.side:
        run = {"prepare": prepare, "jax": run_jax, "torch": run_torch}[args.side]
        print(json.dumps(run(args.work, args)))
        return

    load_before = os.getloadavg()
    ours, torch_runs = [], {t: [] for t in args.torch_threads}
    with tempfile.TemporaryDirectory(prefix="mg5_train_step_") as d:
        work = pathlib.Path(d)
        setup = _child("prepare", work, args)
        setup.pop("load_average_1min_at_start")
        for _ in range(args.rounds):
            ours.append(_child("jax", work, args))
            for t in args.torch_threads:
                torch_runs[t].append(_child("torch", work, args, t))
    ours_summary = _summary(ours, args.batch)
    torch_summary = {t: _summary(r, args.batch) for t, r in torch_runs.items()}
    best = min(torch_summary, key=lambda t: torch_summary[t]["step_s"])
    text_losses = [r["first_step_terms"]["text_loss"] for r in ours + sum(torch_runs.values(), [])]
    print(json.dumps(_rounded({
        "benchmark": "MiniGPT-5 stage-1-style train step (VIST objective, caption loss off), fp32, CPU",
        "config": {"batch": args.batch, "llm_hidden": args.llm_hidden, "llm_layers": args.llm_layers,
                   "mapper_layers": args.mapper_layers, "cross_dim": args.cross_dim, "image_size": args.image_size,
                   "attn_impl": args.attn_impl, "steps": args.steps, "rounds": args.rounds, **setup},
        "ratio_samples_per_s": ours_summary["samples_per_s"] / torch_summary[best]["samples_per_s"],
        "torch_best_threads": best,
        "ratio_by_torch_threads": {str(t): s["step_s"] / ours_summary["step_s"] for t, s in torch_summary.items()},
        "peak_rss_ratio_ours_over_torch": {str(t): ours_summary["peak_rss_mib"] / s["peak_rss_mib"]
                                           for t, s in torch_summary.items()},
        "text_loss_first_step_max_rel_diff": (max(text_losses) - min(text_losses)) / abs(text_losses[0]),
        "mg5jax": ours_summary,
        "torch": {str(t): s for t, s in torch_summary.items()},
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }), indent=2))


if __name__ == "__main__":
    main()
