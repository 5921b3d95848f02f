"""Our jitted guided sampler vs diffusers' PyTorch StableDiffusionPipeline on the same CPU (or GPU).

Builds random SD-2.1-shaped models (no downloads) in a temp dir, loads them into both stacks, and
times text-to-image from given prompt embeddings with CFG on (PNDM, 20 steps, 32×32 latents ->
256×256 images) at batch 1 and 4. Compile time is reported apart from run time; per-part timings
(one guided U-Net step, one VAE decode) show where the time goes. PyTorch runs at each of
`--torch-threads` (on a shared machine OpenMP's spinning threads can make 1 thread faster than 2);
the ratio uses its fastest. With `--device cuda` both run on the first GPU, fp32 with TF32 matrix
units on both sides (JAX's default there; torch is told to allow it). Prints one JSON object.

    .venv/bin/python benchmarks/sd_sampler.py [--steps 20] [--batches 1 4] [--repeats 2] [--torch-threads 1 2]
                                              [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 128, 128),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=[2, 4, 4, 4], use_linear_projection=True, upcast_attention=False, cross_attention_dim=128,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
)  # fmt: skip
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=256, scaling_factor=0.18215, force_upcast=True,
)  # fmt: skip
SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, skip_prk_steps=True,
    steps_offset=1, set_alpha_to_one=False, prediction_type="epsilon", timestep_spacing="leading",
)  # fmt: skip
CONTEXT = (77, 128)


def _median_time(fn, repeats: int, sync=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_torch(directory: pathlib.Path):
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**UNET).eval(), AutoencoderKL(**VAE).eval()
    unet.save_pretrained(directory / "unet", safe_serialization=True)
    vae.save_pretrained(directory / "vae", safe_serialization=True)
    return StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=PNDMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip


def bench_torch(pipe, steps: int, repeats: int, inputs, threads: int, device: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    cond, uncond, latents = (torch.from_numpy(x).to(device) for x in inputs)
    pipe.set_progress_bar_config(disable=True)
    h = w = UNET["sample_size"] * 8

    def run():
        with torch.no_grad():
            return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents, num_inference_steps=steps,
                        guidance_scale=7.5, height=h, width=w, output_type="np").images  # fmt: skip

    start = time.perf_counter()
    images = run()  # first call: oneDNN primitive creation and allocator warm-up
    first = time.perf_counter() - start
    total = _median_time(run, repeats)
    t = torch.tensor(981)
    context = torch.cat([uncond, cond])
    x2 = torch.cat([latents, latents])
    with torch.no_grad():
        unet_step = _median_time(lambda: pipe.unet(x2, t, encoder_hidden_states=context), repeats, sync)
        decode = _median_time(lambda: pipe.vae.decode(latents / VAE["scaling_factor"]), repeats, sync)
    return {"threads": threads, "first_call_s": first, "run_s": total, "unet_step_s": unet_step,
            "vae_decode_s": decode}, images  # fmt: skip


def bench_jax(steps: int, repeats: int, inputs, sampler) -> dict:
    from flax import nnx

    from mg5jax.diffusion.schedulers import make_scheduler

    cond, uncond, latents = (jnp.asarray(x) for x in inputs)
    scheduler = make_scheduler("pndm", SCHEDULER)
    run = lambda: sampler(scheduler, steps, cond, uncond, 7.5, latents=latents)  # noqa: E731
    images = run()
    compile_s, first_run = sampler.timings["compile_s"], sampler.timings["run_s"]
    total = _median_time(run, repeats)

    unet = nnx.merge(sampler.unet_def, sampler.unet_params)
    vae = nnx.merge(sampler.vae_def, sampler.vae_params)
    unet_fn = jax.jit(lambda x, c: unet(x, jnp.int32(981), c))
    decode_fn = jax.jit(lambda z: vae.decode(z / VAE["scaling_factor"]))
    x2, context = jnp.concatenate([latents, latents]), jnp.concatenate([uncond, cond])
    jax.block_until_ready(unet_fn(x2, context))
    jax.block_until_ready(decode_fn(latents))
    unet_step = _median_time(lambda: jax.block_until_ready(unet_fn(x2, context)), repeats)
    decode = _median_time(lambda: jax.block_until_ready(decode_fn(latents)), repeats)
    return {"compile_s": compile_s, "first_run_s": first_run, "run_s": total, "unet_step_s": unet_step,
            "vae_decode_s": decode}, np.asarray(images)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    else:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        args.torch_threads = [torch.get_num_threads()]  # host threads barely matter when the GPU computes

    from mg5jax.diffusion.sampler import GuidedSampler
    from mg5jax.models.unet import UNet2DConditionModel
    from mg5jax.models.vae import AutoencoderKL

    result = {"device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
              "load_average_at_start": os.getloadavg(),
              "steps": args.steps, "scheduler": "pndm", "guidance_scale": 7.5, "latents": [4, 32, 32],
              "image": [256, 256], "unet": {k: UNET[k] for k in ("block_out_channels", "layers_per_block")},
              "vae_block_out_channels": VAE["block_out_channels"], "runs": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(tmp)
        torch_pipe = build_torch(directory).to(args.device)
        unet = UNet2DConditionModel.from_pretrained(directory / "unet", dtype=jnp.float32, param_dtype=jnp.float32)
        vae = AutoencoderKL.from_pretrained(directory / "vae", dtype=jnp.float32, param_dtype=jnp.float32)
        sampler = GuidedSampler(unet, vae)
        for batch in args.batches:
            rng = np.random.default_rng(batch)
            inputs = (rng.standard_normal((batch, *CONTEXT)).astype(np.float32),
                      rng.standard_normal((batch, *CONTEXT)).astype(np.float32),
                      rng.standard_normal((batch, 4, 32, 32)).astype(np.float32))  # fmt: skip
            jax_times, jax_images = bench_jax(args.steps, args.repeats, inputs, sampler)
            torch_runs = []
            for threads in args.torch_threads:
                times, torch_images = bench_torch(torch_pipe, args.steps, args.repeats, inputs, threads, args.device)
                torch_runs.append(times)
            best = min(torch_runs, key=lambda r: r["run_s"])
            result["runs"].append({
                "batch": batch, "jax": jax_times, "torch": torch_runs,
                "ratio_torch_over_jax_run": best["run_s"] / jax_times["run_s"],
                "images_max_abs_diff": float(np.abs(torch_images - jax_images).max()),
            })  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
