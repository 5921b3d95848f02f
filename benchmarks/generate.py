"""Interleaved generation throughput on the demo model: batch 1 vs batch 8, and the cold start.

    python benchmarks/generate.py [--steps 25] [--max_new_tokens 96]

Needs the demo assets and run (`make demo`). Prints JSON: tokens/s and images/s per batch size,
the batch-8 / batch-1 throughput ratio (eight prompts as one batch against the same eight one at a
time), and cold start (compile + first response) against the same response in steady state, each
with its phases (`InterleavedGenerator.timings`: prepare, text, images, respond). The
persistent compilation cache (.cache/jax) is used, as in a real run: on a second run the generation
programs load from `.cache/jax/programs` (mg5jax.aot) without tracing;
`programs_stored_at_start` says how many were there. As infer.py does, the programs the last run used
are preloaded in the background while the model loads (`model_load_s`; `--no_preload` loads each one
when first called instead, inside the cold start) and, on an accelerator, run once on zeros there
(`--no_first_run` skips that); `start_to_first_response_s` counts the load too. The LLM is prepared for decoding
(`prepare_for_decoding`, reported as `llm_prepared`).

`sequential` and `pipelined` are what infer.py gets from a prompts file: `--stream_prompts` prompts (the
eight with other seeds) in batches of 1 and of 8, one `__call__` after another or through
`InterleavedGenerator.generate_batches`, which prepares the next batch while this one runs and starts
its text as soon as this one's images are.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import pathlib
import sys
import time

import jax

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
jax.config.update("jax_compilation_cache_dir", str(REPO / ".cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def main() -> None:
    from configs import demo
    from mg5jax import aot, build
    from mg5jax.demo import ROOT, write_prompts
    from mg5jax.generation.interleaved import GenerationSettings, InterleavedGenerator, Prompt
    from mg5jax.models import cpu_decode

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--stream_prompts", type=int, default=32,
                    help="prompts of the sequential and pipelined runs (in batches of 1 and of 8)")
    ap.add_argument("--no_preload", action="store_true", help="load each stored program when first called")
    ap.add_argument("--no_first_run", action="store_true",
                    help="on an accelerator, do not run preloaded programs once on zeros while the model loads")
    args = ap.parse_args()
    if args.no_first_run:
        aot.RUN_ONCE_MAX_BYTES = -1
    if not (ROOT / "run" / "checkpoints").is_dir():
        sys.exit(f"no demo run in {ROOT}: run `make demo` first")
    stored = REPO / ".cache" / "jax" / "programs"
    programs_at_start = len(list(stored.glob("*.bin"))) if stored.is_dir() else 0
    start = time.perf_counter()
    if jax.default_backend() == "cpu":
        cpu_decode.available()  # registered before stored programs that call the kernels load
    if not args.no_preload:
        aot.preload("benchmark-generate")
    cfg = demo.get_config()
    built, prepared = build.inference_model(cfg, run_dir=cfg.trainer.workdir, field="trainer.workdir")
    model_load_s = time.perf_counter() - start
    rows = [json.loads(line) for line in write_prompts(ROOT / "prompts.jsonl", limit=8).read_text().splitlines()]
    prompts = [Prompt(r["text"], tuple(r["images"]), seed=i) for i, r in enumerate(rows)]
    prompts = (prompts * 8)[:8]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, num_inference_steps=args.steps,
                                  image_size=cfg.data.output_image_size, max_images=1)
    gen = InterleavedGenerator.from_built(cfg, built, settings)

    gc.collect()
    gc.freeze()  # as infer.py does once the model is loaded

    def timed(batch):
        start = time.perf_counter()
        out = gen(batch)
        return time.perf_counter() - start, out, dict(gen.timings)

    cold_s, _, cold_phases = timed(prompts[:1])
    result = {"steps": args.steps, "max_new_tokens": args.max_new_tokens, "backend": jax.default_backend(),
              "device": jax.devices()[0].device_kind, "preload": not args.no_preload,
              "first_run_while_loading": not (args.no_preload or args.no_first_run or jax.default_backend() == "cpu"),
              "model_load_s": round(model_load_s, 2), "llm_prepared": prepared}

    def best(batch):
        timed(batch)  # compile this batch shape (prompt lengths share buckets)
        return min((timed(batch) for _ in range(args.repeats)), key=lambda run: run[0])

    # the same eight prompts one at a time and as one batch: the same responses (a row's does not depend
    # on its batch), so the time ratio is the throughput ratio (the batch's sampler call may render a few
    # padding images: calls are padded to a power of two)
    singles = [best([p]) for p in prompts]
    batched = best(prompts)
    one_at_a_time = (sum(s for s, _, _ in singles), [r for _, o, _ in singles for r in o],
                     {k: sum(t.get(k, 0.0) for _, _, t in singles) for k in {k for _, _, t in singles for k in t}})
    for b, (seconds, out, phases) in ((1, one_at_a_time), (8, batched)):
        tokens = sum(len(r.token_ids) for r in out)
        images = sum(len(r.images) for r in out)
        result[f"batch{b}"] = {"seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
                               "images_per_s": round(images / seconds, 2), "images": images, "tokens": tokens,
                               "phases_s": {k: round(v, 4) for k, v in phases.items()}}
    result["throughput_ratio_b8_vs_b1"] = round(result["batch1"]["seconds"] / result["batch8"]["seconds"], 2)
    steady_s = singles[0][0]
    result["steady_first_prompt_s"] = round(steady_s, 3)
    result["steady_first_prompt_phases_s"] = {k: round(v, 4) for k, v in singles[0][2].items()}
    result["cold_start_s"] = round(cold_s, 3)
    result["cold_start_phases_s"] = {k: round(v, 4) for k, v in cold_phases.items()}
    result["cold_vs_steady_response"] = round(cold_s / steady_s, 2)
    result["start_to_first_response_s"] = round(model_load_s + cold_s, 2)
    result["programs_stored_at_start"] = programs_at_start

    # what infer.py gets from a prompts file: N prompts in batches of 1 and of 8, one call after another
    # against `generate_batches` (the next batch prepared while this one runs, its text queued behind its images)
    many = [dataclasses.replace(prompts[i % len(prompts)], seed=i) for i in range(args.stream_prompts)]

    def run_all(size: int, pipelined: bool) -> tuple[float, list]:
        batches = [many[i : i + size] for i in range(0, len(many), size)]
        start = time.perf_counter()
        out = [r for b in (gen.generate_batches(batches) if pipelined else map(gen, batches)) for r in b]
        return time.perf_counter() - start, out

    for pipelined in (False, True):
        name = "pipelined" if pipelined else "sequential"
        result[name] = {"prompts": len(many)}
        for size in (1, 8):
            run_all(size, pipelined)  # the render call sizes these seeds need
            seconds, out = min((run_all(size, pipelined) for _ in range(args.repeats)), key=lambda run: run[0])
            tokens, images = sum(len(r.token_ids) for r in out), sum(len(r.images) for r in out)
            result[name][f"batch{size}"] = {"seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
                                            "images_per_s": round(images / seconds, 2), "images": images,
                                            "tokens": tokens}
        result[name]["throughput_ratio_b8_vs_b1"] = round(
            result[name]["batch1"]["seconds"] / result[name]["batch8"]["seconds"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
