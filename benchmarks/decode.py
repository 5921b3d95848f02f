"""KV-cache decoding: mg5jax's jitted loop vs transformers `generate` (torch) on the same CPU (or GPU).

A small random LLaMA (hidden 512, 8 layers, 8 heads, intermediate 1376, vocab 32000) is built and
saved in a temporary directory (no downloads); both sides load the same fp32 weights, and ours is then
re-laid for inference by `prepare_for_decoding` (fused q/k/v and gate/up; on a CPU, weights packed for
the small-batch kernel of `cpu_decode`; `--plain` skips it). Every row
decodes exactly `--max-new` tokens (no EOS). Compile time (first call minus a warm call) is kept
apart from run time; tokens/s counts generated tokens over the whole batch; each timing is the best
of `--repeats` runs, and torch's is the best over 1 thread and all cores. With `--device cuda` both
run on the first GPU (fp32, TF32 matrix units allowed on both sides). Decoding is greedy (both sides
must choose the same ids), or with `--sampling original` MiniGPT-5's sampling settings on both sides.
Prints one JSON object.

    .venv/bin/python benchmarks/decode.py [--batch 1 8] [--max-new 128] [--prompt-len 32] [--device cpu|cuda]
        [--sampling greedy|original] [--plain]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as TorchLlama

from mg5jax.generation import SamplingConfig, generate
from mg5jax.models.llama import LlamaForCausalLM, prepare_for_decoding

SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=1024)


def _best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


# --sampling original: MiniGPT-5's decoding settings (REFERENCE §7) on both sides
ORIGINAL = dict(do_sample=True, top_k=50, top_p=0.9, temperature=1.0, repetition_penalty=2.0)


def bench_torch(model, ids: np.ndarray, max_new: int, repeats: int, threads: int,
                sampling: dict) -> tuple[float, np.ndarray]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.from_numpy(ids.astype(np.int64)).to(model.device)
    kw = dict(attention_mask=torch.ones_like(x), eos_token_id=None, pad_token_id=0, **sampling)
    with torch.inference_mode():
        model.generate(x, max_new_tokens=4, **kw)  # warm-up
        seconds, out = _best_time(lambda: model.generate(x, max_new_tokens=max_new, **kw), repeats)
    return seconds, out[:, ids.shape[1]:].cpu().numpy()


def bench_jax(model, ids: np.ndarray, max_new: int, repeats: int, sampling: dict) -> tuple[float, float, np.ndarray]:
    cfg = SamplingConfig(max_new_tokens=max_new, **sampling)
    x = jnp.asarray(ids)
    split = nnx.split(model)  # as a caller that decodes often does (generate's docstring)

    def run():
        return jax.block_until_ready(generate(split, input_ids=x, config=cfg, key=jax.random.key(0)))

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    seconds, out = _best_time(run, repeats)
    return first - seconds, seconds, np.asarray(out.ids)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attn-impl", choices=["reference", "fused"], default="reference")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sampling", choices=["greedy", "original"], default="greedy",
                   help="greedy, or MiniGPT-5's top-k 50 / top-p 0.9 / repetition penalty 2.0 sampling")
    p.add_argument("--plain", action="store_true", help="decode with the model as loaded (no prepare_for_decoding)")
    args = p.parse_args()
    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    else:
        torch.backends.cuda.matmul.allow_tf32 = True

    torch.manual_seed(0)
    torch_model = TorchLlama(LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2)).eval()
    with tempfile.TemporaryDirectory() as d:
        torch_model.save_pretrained(d)
        model = LlamaForCausalLM.from_pretrained(d, dtype=jnp.float32, param_dtype=jnp.float32,
                                                 attn_impl=args.attn_impl)
    prepared = None if args.plain else prepare_for_decoding(model)

    torch_model.to(args.device)
    torch_threads = sorted({1, torch.get_num_threads()}, reverse=True) if args.device == "cpu" else [1]
    sampling = ORIGINAL if args.sampling == "original" else dict(do_sample=False)
    rng = np.random.default_rng(0)
    results = {}
    for b in args.batch:
        ids = rng.integers(3, SHAPE["vocab_size"], size=(b, args.prompt_len)).astype(np.int32)
        # torch's intra-op threads spin badly on a busy machine: time every setting, keep its best
        hf = {t: bench_torch(torch_model, ids, args.max_new, args.repeats, t, sampling) for t in torch_threads}
        best_threads = min(hf, key=lambda t: hf[t][0])
        hf_s, hf_ids = hf[best_threads]
        compile_s, jax_s, jax_ids = bench_jax(model, ids, args.max_new, args.repeats, sampling)
        tokens = b * args.max_new
        results[f"batch_{b}"] = {
            "mg5jax_tokens_per_s": round(tokens / jax_s, 1),
            "transformers_tokens_per_s": round(tokens / hf_s, 1),
            "speedup": round(hf_s / jax_s, 2),
            "speedup_vs_torch_default_threads": round(hf[torch_threads[0]][0] / jax_s, 2),
            "mg5jax_run_s": round(jax_s, 4),
            "mg5jax_compile_s": round(compile_s, 2),
            "transformers_run_s": round(hf_s, 4),
            "transformers_tokens_per_s_by_threads": {t: round(tokens / hf[t][0], 1) for t in hf},
            # greedy: the two sides must agree; sampled ids come from different random streams
            "ids_equal_fraction": float((jax_ids == hf_ids).mean()),
        }
    print(json.dumps({
        "benchmark": f"{args.sampling} decode, KV cache",
        "sampling": sampling,
        "model": SHAPE,
        "max_new_tokens": args.max_new,
        "prompt_len": args.prompt_len,
        "attn_impl": args.attn_impl,
        "prepare_for_decoding": prepared,
        "cpu": platform.processor() or platform.machine(),
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "torch_threads_tried": torch_threads,
        "jax_backend": jax.default_backend(),
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
