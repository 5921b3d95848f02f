"""Interleaved generation: a batch of prompts (text with `<Img><ImageHere></Img>` slots and their
images) → responses of text with images in them.

One jitted decode loop runs the whole batch (prefill with spliced image embeddings, then sampling
with the original's settings). Whenever a row samples `[IMG0]`, `[IMG1]…[IMG7]` are fed at the next
positions and the voken window — the hidden state that predicted `[IMG0]` and those at
`[IMG0]…[IMG6]` (REFERENCE §7.4) — is kept; decoding continues, so one response may hold several
images. Every window of the batch then goes through the mapper and all images are rendered together
by one jitted guided sampler (negative = the mapped all-zero window). With `sd_baseline`, a prompt
that carries a caption also gets Stable Diffusion's own image of that caption (the original's CC3M
baseline), rendered from the same initial noise as the response's first image.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
import PIL.Image
from flax import nnx

from mg5jax import aot
from mg5jax.data import images as image_ops
from mg5jax.data.datasets import load_json
from mg5jax.data.tokenization import IGNORE_INDEX, MiniGPT5Tokenizer
from mg5jax.diffusion.sampler import GuidedSampler
from mg5jax.diffusion.schedulers import make_scheduler
from mg5jax.generation.decode import ForcedInsertion, GenerationOutput, generate, generate_stream
from mg5jax.generation.sampling import SamplingConfig
from mg5jax.models.minigpt5 import PromptEncoder, map_vokens, uncond_vokens

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One request: the text (with one `<ImageHere>` per input image) and its image files."""

    text: str
    images: tuple[str, ...] = ()
    seed: int = 0  # sampling and image noise of this row depend only on it; 0 <= seed < 2**31
    caption: str | None = None  # what the image should show (CC3M): the SD baseline's prompt
    reference_image: str | None = None  # the dataset's image for this turn, shown beside the response
    reference_text: str | None = None  # the dataset's text for this turn (an MMDialog reply), shown beside it
    task: str | None = None  # the dataset's name of this generation task (e.g. "0_3-mm"), kept in the record

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise ValueError(f"prompt text must be a string, got {type(self.text).__name__}")
        for name in ("caption", "reference_image", "reference_text", "task"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"prompt {name} must be a string, got {type(getattr(self, name)).__name__}")
        if self.reference_image is not None and not self.reference_image.strip():
            raise ValueError("prompt reference_image must be a file path, got an empty string")
        if isinstance(self.images, str) or not all(isinstance(p, str) for p in self.images):
            raise ValueError(f"prompt images must be a list of file paths, got {self.images!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) \
                or not 0 <= self.seed < 2**31:
            raise ValueError(f"prompt seed must be an integer in [0, 2**31), got {self.seed!r}")


def _splice(graphdef, state, batch: dict) -> tuple[jax.Array, jax.Array]:
    """The prompts' LLM input embeddings `[B,L,D]` and mask `[B,L]` (vision encoder included), from a
    split `PromptEncoder`: one program."""
    embeds, mask, _ = nnx.merge(graphdef, state).splice(batch)
    return embeds, mask.astype(bool)


def _conditioning(graphdef, state, windows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """U-Net conditioning of voken windows `[N,W,D]` and the CFG negative for as many images, from the
    split mapper: one program."""
    mapper = nnx.merge(graphdef, state)
    return map_vokens(mapper, windows), uncond_vokens(mapper, *windows.shape)


_splice_program = aot.Program(_splice, static_argnums=(0,))
_conditioning_program = aot.Program(_conditioning, static_argnums=(0,))


PARALLEL_READ_BYTES = 1 << 18  # input image files of a batch read on threads from this size on (in all): smaller
#                                ones decode faster than the threads hand them over (20 files of 64×64: 5 ms alone,
#                                13 ms on 8 threads)


def _file_bytes(path: str) -> int:
    """Size of an input image file; 0 when it cannot be read (its load then says why)."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


@functools.cache
def _image_loader() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that read prompts' input images, one pool per process (PIL decodes and resizes
    without the GIL)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                                 thread_name_prefix="mg5jax-input-images")


@functools.cache
def _prompt_preparer() -> concurrent.futures.ThreadPoolExecutor:
    """The thread that prepares the next batch of `generate_batches` while the current one runs (its
    own: it waits on `_image_loader`)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mg5jax-prompts")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Decoding and rendering settings; defaults are the original's (REFERENCE §7)."""

    do_sample: bool = True
    top_p: float = 0.9
    top_k: int = 50  # transformers 4.31's default, active in the original
    temperature: float = 1.0
    repetition_penalty: float = 2.0
    max_new_tokens: int = 256
    max_images: int = 2  # images per response (the original turns only the first group into one)
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    scheduler: str = "pndm"  # "pndm", "ddim", "dpm++2m" or "euler"
    image_size: int | None = None  # output pixels; default: the U-Net's sample size × the VAE factor
    render_batch: int = 8  # images per sampler call at most (bounds the sampler's memory)
    sd_baseline: bool = False  # also render SD's image of each prompt's caption (needs an `sd_pipeline`)
    length_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024)  # prompt text tokens, padded to a bucket

    def __post_init__(self):
        if self.render_batch < 1:
            raise ValueError(f"GenerationSettings.render_batch={self.render_batch}: expected at least 1")

    def sampling(self, *, eos_ids: tuple[int, ...], seen_ids: tuple[int, ...],
                 stop_sequences: tuple[tuple[int, ...], ...], pad_id: int) -> SamplingConfig:
        """The decode loop's settings for a tokenizer with these ids."""
        return SamplingConfig(
            do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            repetition_penalty=self.repetition_penalty, seen_ids=seen_ids, max_new_tokens=self.max_new_tokens,
            eos_ids=eos_ids, stop_sequences=stop_sequences, pad_id=pad_id)

    def insertion(self, voken_ids: Sequence[int]) -> ForcedInsertion:
        """Sampling `voken_ids[0]` ([IMG0]) feeds the rest; up to `max_images` times per response."""
        return ForcedInsertion(trigger_id=voken_ids[0], tokens=tuple(voken_ids[1:]),
                               max_insertions=self.max_images, keep_tokens=True)


@dataclasses.dataclass
class Response:
    """One generated response: text pieces and images in reading order."""

    prompt: Prompt
    segments: list[str | int]  # text, or the index of an image in `images`
    images: list[np.ndarray]  # [H, W, 3] uint8
    token_ids: list[int]  # every id the LLM chose or was fed (vokens included)
    raw_text: str  # tokenizer.decode of token_ids (the forced [IMG1]…[IMG7] included)
    baseline: np.ndarray | None = None  # [H, W, 3] uint8: SD from the prompt's caption (`sd_baseline`)

    @property
    def text(self) -> str:
        """The response with `[image k]` markers (k from 1) where images appear."""
        return " ".join(s if isinstance(s, str) else f"[image {s + 1}]" for s in self.segments)


def prompt_problem(prompt: Prompt, ids: Sequence[int], tokenizer: MiniGPT5Tokenizer, *, max_input_images: int,
                   has_vision: bool, max_tokens: int, images_setting: str = "max_input_images") -> str | None:
    """Why generation refuses `prompt` (tokenized as `ids`), or None; `images_setting` names the limit."""
    slots, images = ids.count(tokenizer.ids.image_placeholder_id), len(prompt.images)
    if slots != images:
        return f"the text has {slots} <ImageHere> slots but {images} images are given"
    if images > max_input_images:
        return f"{images} input images, more than {images_setting}={max_input_images}"
    if images and not has_vision:
        return "the prompt has input images but the model has no vision encoder (model.vision.kind='none')"
    if len(ids) > max_tokens:
        return f"the prompt has {len(ids)} tokens, more than the {max_tokens} generation takes"
    return None


def stop_sequences(tokenizer: MiniGPT5Tokenizer) -> tuple[tuple[int, ...], ...]:
    """The id sequences of "###" that end a response (the original: [835] and [2277, 29937])."""
    seqs = {tuple(tokenizer.encode("###"))}
    sp = tokenizer.sp_model
    if sp is not None and sp.piece_to_id("##") != sp.unk_id() and sp.piece_to_id("#") != sp.unk_id():
        seqs.add((sp.piece_to_id("##"), sp.piece_to_id("#")))
    return tuple(sorted(seqs))


def sampling_config(tokenizer: MiniGPT5Tokenizer, settings: GenerationSettings, llm_dir=None) -> SamplingConfig:
    """The decode loop's settings. EOS and the initial "seen" id come from the LLM's
    `generation_config.json` when present (Vicuna v0: eos 1, bos 0, so "</s>" does not stop it —
    REFERENCE §10.9), else from the tokenizer."""
    eos, seen = (tokenizer.ids.eos_id,), ()
    gen_file = pathlib.Path(llm_dir) / "generation_config.json" if llm_dir else None
    if gen_file is not None and gen_file.is_file():
        gen = load_json(gen_file)
        if gen.get("eos_token_id") is not None:
            ids = gen["eos_token_id"]
            eos = tuple(ids) if isinstance(ids, list) else (ids,)
        if gen.get("bos_token_id") is not None:
            seen = (gen["bos_token_id"],)
    elif gen_file is not None:
        log.warning("%s not found: EOS is the tokenizer's (%s) and no id starts as seen by the repetition "
                    "penalty; Vicuna v0's file has eos 1, bos 0", gen_file, eos[0])
    return settings.sampling(eos_ids=eos, seen_ids=seen, stop_sequences=stop_sequences(tokenizer),
                             pad_id=tokenizer.ids.pad_id)


def _uint8_images(calls: Sequence[tuple[jax.Array, int]]) -> list[np.ndarray]:
    """The images `[H, W, 3]` uint8 of `InterleavedGenerator._render`'s calls, padding dropped."""
    return [image for pixels, n in calls for image in (np.asarray(pixels)[:n] * 255).round().astype(np.uint8)]


def render_call_size(images: int, render_batch: int) -> int:
    """Images a sampler call renders for a chunk of `images` (at most `render_batch`): padded to a power
    of two, so few shapes are compiled."""
    return min(1 << (images - 1).bit_length(), render_batch)


def image_size_problem(size: int | None, vae_blocks: Sequence[int], unet_blocks: Sequence[int]) -> str | None:
    """What is wrong with an output image size for a VAE and a U-Net of these `block_out_channels`: each
    halves the size once per block after the first, and both need whole numbers. None when it fits."""
    vae, unet = 2 ** (len(vae_blocks) - 1), 2 ** (len(unet_blocks) - 1)
    if size is None or size < 1 or size % (vae * unet):
        return f"must be a multiple of {vae * unet} (the VAE's factor {vae} × the U-Net's {unet})"
    return None


def image_seed(prompt_seed: int, j: int) -> int:
    """The initial-noise seed of image j of a response: from its prompt's seed alone (not the batch, not
    max_images)."""
    return (prompt_seed * 0x9E3779B1 + j) % 2**32


class InterleavedGenerator:
    """Generates text-and-image responses with a `MiniGPT5` model (its weights as they are when the
    generator is made: load checkpoints and quantize first)."""

    def __init__(self, model, tokenizer: MiniGPT5Tokenizer, scheduler_config: dict, *,
                 settings: GenerationSettings = GenerationSettings(), input_image_size: int = 224,
                 max_input_images: int = 5, llm_dir=None, sd_pipeline=None):
        if settings.sd_baseline and sd_pipeline is None:
            raise ValueError("sd_baseline needs an sd_pipeline (StableDiffusionPipeline with SD's text encoder, "
                             "e.g. build.sd_baseline_pipeline)")
        self.model = model
        self.sd_pipeline = sd_pipeline
        self.tokenizer = tokenizer
        self.settings = settings
        self.input_image_size = input_image_size
        self.max_input_images = max_input_images
        self.sampling = sampling_config(tokenizer, settings, llm_dir)
        self.insertion = settings.insertion(tokenizer.ids.voken_ids)
        self.scheduler = make_scheduler(settings.scheduler, scheduler_config)
        self.sampler = GuidedSampler(model.unet, model.vae)
        # (graphdef, state) pairs for the programs: each takes only the parts it uses
        self._prompt_split = nnx.split(PromptEncoder(model))
        self._mapper_split = nnx.split(model.mapper)
        self._llm_split = nnx.split(model.llm)  # and for the decode loop
        vae_factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
        size = settings.image_size or model.unet.config.sample_size * vae_factor
        if problem := image_size_problem(size, model.vae.config.block_out_channels,
                                         model.unet.config.block_out_channels):
            raise ValueError(f"image size {size} (data.output_image_size): {problem}")
        self.latent_size = (size // vae_factor, size // vae_factor)
        # wall seconds of the last call's phases: "prepare_s" (tokens and input images, on the host),
        # "text_s" (splice and decode, until the ids reach the host; in `stream`, with the time the
        # caller spends between chunks), "images_s" (conditioning and sampler, until the pixels do;
        # "sampler_s" of it in the sampler), "respond_s" (the responses' text)
        self.timings: dict[str, float] = {}
        PIL.Image.preinit()  # PIL's common file formats, imported now rather than by the first prompt's image

    @classmethod
    def from_pretrained(cls, run_dir: str | os.PathLike, *, config=None,
                        settings: GenerationSettings | None = None) -> InterleavedGenerator:
        """A generator for a run of ours (the `trainer.workdir` of `train.py`), made as infer.py makes it:
        the model its recorded config describes (`build.run_config`; or `config`, checked against that
        one) with the run's best validation step (its newest checkpoint if it ran no validation), int8
        where the config says, the LLM re-laid for decoding. `settings`: the original's by default;
        images at the config's `data.output_image_size` unless they name a size.

            gen = InterleavedGenerator.from_pretrained("runs/stage2_vist")
            (response,) = gen([Prompt("###Human: a day at the beach ###Assistant:")])
        """
        from mg5jax import build

        run_dir = os.fspath(run_dir)
        if config is None:
            cfg = build.run_config(run_dir, "run_dir")
        else:
            cfg = config
            build.check_run_config(cfg, run_dir)
        built, _ = build.inference_model(cfg, run_dir=run_dir, field="run_dir")
        settings = settings or GenerationSettings()
        return cls.from_built(cfg, built, dataclasses.replace(
            settings, image_size=settings.image_size or cfg.data.output_image_size))

    @classmethod
    def from_built(cls, cfg, built, settings: GenerationSettings) -> InterleavedGenerator:
        """A generator for the model `build` made from `cfg` (`build.inference_model`): input images,
        scheduler, generation config and the SD baseline's pipeline as `cfg` names them."""
        from mg5jax import build

        return cls(built.model, built.tokenizer, build.scheduler_config(cfg.model.sd_path), settings=settings,
                   input_image_size=cfg.data.input_image_size, max_input_images=cfg.data.max_input_images,
                   llm_dir=cfg.model.llm_path,
                   sd_pipeline=build.sd_baseline_pipeline(cfg, built) if settings.sd_baseline else None)

    # ----------------------------------------------------------------------------------------- prompts

    def prepare(self, prompts: Sequence[Prompt]) -> dict:
        """Token ids (padded to a bucket) and input images of a batch of prompts (no labels). Images are
        uint8 pixels `[B, M, 3, S, S]`, normalized in the splice program; files are read on threads
        when there are `PARALLEL_READ_BYTES` of them. A batch without input images has no image slots
        (M = 0): no vision encoder pass, and (Q - 1)·M fewer positions to prefill and attend to."""
        ids = [self.tokenizer.encode(p.text) for p in prompts]
        for i, (p, row) in enumerate(zip(prompts, ids)):
            if problem := prompt_problem(p, row, self.tokenizer, max_input_images=self.max_input_images,
                                         has_vision=self.model.vision is not None,
                                         max_tokens=self.settings.length_buckets[-1]):
                # prompts of one dataset share their opening (the system prompt): the end tells them apart
                raise ValueError(f"prompt {i + 1} of {len(prompts)} (ending {p.text[-60:]!r}): {problem}")
        longest = max(len(r) for r in ids)
        t = min(b for b in self.settings.length_buckets if b >= longest)
        b, s = len(prompts), self.input_image_size
        m = self.max_input_images if any(p.images for p in prompts) else 0
        batch = {
            "input_ids": np.full((b, t), self.tokenizer.ids.pad_id, np.int32),
            "attention_mask": np.zeros((b, t), np.int32),
            "labels": np.full((b, t), IGNORE_INDEX, np.int32),
            "input_image_mask": np.zeros((b, m), bool),
        }
        for i, (p, row) in enumerate(zip(prompts, ids)):
            batch["input_ids"][i, : len(row)] = row
            batch["attention_mask"][i, : len(row)] = 1
        if self.model.vision is None or m == 0:
            batch["input_image_features"] = np.zeros(
                (b, m, self.model.config.num_query_tokens, self.model.llm.config.hidden_size), np.float32)
            return batch
        batch["input_images"] = np.zeros((b, m, 3, s, s), np.uint8)
        slots = [(i, k, path) for i, p in enumerate(prompts) for k, path in enumerate(p.images)]

        def load(path: str) -> np.ndarray:
            return image_ops.input_image_pixels(image_ops.load_image(path), size=s)

        paths = [path for _, _, path in slots]
        parallel = len(paths) > 1 and sum(map(_file_bytes, paths)) >= PARALLEL_READ_BYTES
        loaded = _image_loader().map(load, paths) if parallel else map(load, paths)
        done = 0
        try:
            for (i, k, _), pixels in zip(slots, loaded):
                batch["input_images"][i, k] = pixels
                batch["input_image_mask"][i, k] = True
                done += 1
        except image_ops.ImageLoadError as e:
            i = slots[done][0]
            raise image_ops.ImageLoadError(f"prompt {i + 1} of {b} (ending {prompts[i].text[-60:]!r}): {e}") from e
        return batch

    def _prepared(self, prompts: Sequence[Prompt]) -> tuple[dict, float]:
        """`prepare(prompts)` and the seconds it took."""
        start = time.perf_counter()
        batch = self.prepare(prompts)
        return batch, time.perf_counter() - start

    def _decode_args(self, prompts: Sequence[Prompt], batch: dict, key: jax.Array) -> dict:
        """The decode loop's arguments for prepared prompts (the splice program is dispatched, not waited on)."""
        embeds, mask = _splice_program(*self._prompt_split, batch)
        # text under fold_in(key, 0), image noise under fold_in(key, 1): no decode step shares a key with an image
        return dict(inputs_embeds=embeds, prompt_mask=mask, config=self.sampling, insertion=self.insertion,
                    key=jax.random.fold_in(key, 0), row_seeds=np.asarray([p.seed for p in prompts], np.int32))

    # -------------------------------------------------------------------------------------- generation

    def __call__(self, prompts: Sequence[Prompt], *, key: jax.Array | None = None) -> list[Response]:
        """Generate a response for every prompt (text, then all images of the batch at once)."""
        key = jax.random.key(0) if key is None else key
        batch, prepare_s = self._prepared(prompts)
        self.timings = {"prepare_s": prepare_s}
        started = time.perf_counter()
        out = generate(self._llm_split, **self._decode_args(prompts, batch, key))
        return self._finish(prompts, out, key, started)

    def generate_batches(self, batches: Iterable[Sequence[Prompt]], *,
                         key: jax.Array | None = None) -> Iterator[list[Response]]:
        """The responses of each batch in turn, the same as `__call__` gives, with the host's work kept
        off the device's path: the next batch is prepared (tokens, input images) on a thread while this
        one runs, and its text is started once this one's images are, so the device decodes it while the
        host builds these responses and the caller writes them. `timings` are the last yielded batch's;
        its text phase runs from when its text was started, so it overlaps the batch before. A batch that
        cannot be prepared raises after the batches before it are yielded."""
        key = jax.random.key(0) if key is None else key
        batches = iter(batches)

        def submit():
            prompts = next(batches, None)
            return None if prompts is None else (prompts, _prompt_preparer().submit(self._prepared, prompts))

        def start(submitted):
            """Dispatch the text of a submitted batch: (prompts, output, when, timings), or None."""
            if submitted is None:
                return None
            prompts, future = submitted
            batch, prepare_s = future.result()
            started = time.perf_counter()
            return prompts, generate(self._llm_split, **self._decode_args(prompts, batch, key)), started, \
                {"prepare_s": prepare_s}

        running = start(submit())
        while running is not None:
            following, failed = [None], []
            try:
                submitted = submit()
            except Exception as e:  # noqa: BLE001 - the caller's iterable: raised once this batch is handed out
                submitted = None
                failed.append(e)

            def start_following():
                try:
                    following[0] = start(submitted)
                except Exception as e:  # noqa: BLE001 - raised once this batch is handed out
                    failed.append(e)

            prompts, out, started, self.timings = running
            yield self._finish(prompts, out, key, started, then=start_following)
            if failed:
                raise failed[0]
            running = following[0]

    def stream(self, prompts: Sequence[Prompt], *, key: jax.Array | None = None,
               chunk_steps: int = 8) -> Iterator[tuple[int, str] | list[Response]]:
        """Yield `(row, new text)` as tokens are generated, then the list of finished responses."""
        key = jax.random.key(0) if key is None else key
        ids_so_far: list[list[int]] = [[] for _ in prompts]
        text_so_far = [""] * len(prompts)
        batch, prepare_s = self._prepared(prompts)
        self.timings = {"prepare_s": prepare_s}
        started = time.perf_counter()
        for chunk in generate_stream(self._llm_split, **self._decode_args(prompts, batch, key),
                                     chunk_steps=chunk_steps):
            for row, ids in enumerate(chunk.new_ids):
                if len(ids):
                    # the whole row decoded each time: a chunk decoded alone loses the space SentencePiece
                    # encodes at its start
                    ids_so_far[row].extend(int(i) for i in ids)
                    text = self.tokenizer.decode(ids_so_far[row])
                    done = text_so_far[row]
                    new = text[len(done):] if text.startswith(done) else text
                    text_so_far[row] = text
                    if new:
                        yield row, new
            if chunk.output is not None:
                yield self._finish(prompts, chunk.output, key, started)

    def finish(self, prompts: Sequence[Prompt], out: GenerationOutput, key: jax.Array) -> list[Response]:
        """Map every voken window to conditioning, render the images, split the text around them."""
        self.timings = {}
        return self._finish(prompts, out, key, None)

    def _finish(self, prompts: Sequence[Prompt], out: GenerationOutput, key: jax.Array,
                started: float | None, *, then: Callable[[], None] | None = None) -> list[Response]:
        """`finish`, timing the text phase from `started` (when its splice was dispatched) if given. With
        `then`, the sampler calls are not waited on one by one: `then()` runs once all are dispatched, and
        the images are waited on after it (`timings` then have no "sampler_s", and "images_s" leaves out
        the time `then()` took)."""
        counts = np.asarray(out.insertion_counts)
        images_start = time.perf_counter()
        if started is not None:
            self.timings["text_s"] = images_start - started
        windows = out.insertion_hidden  # [B, K, W, D]
        b, k = counts.shape[0], windows.shape[1]
        rows = [(r, j) for r in range(b) for j in range(int(counts[r]))]
        flat = np.asarray(windows).reshape(b * k, *windows.shape[2:])
        key = jax.random.fold_in(key, 1)
        wait = then is None

        calls = self._render(lambda x: _conditioning_program(*self._mapper_split, x),
                             np.stack([flat[r * k + j] for r, j in rows]) if rows else None,
                             [image_seed(prompts[r].seed, j) for r, j in rows], key, wait=wait)
        with_caption, baseline_calls = [], []
        if self.settings.sd_baseline:  # as the original's predict_step: when an image was made and a caption exists
            with_caption = [r for r in range(b) if counts[r] and prompts[r].caption]
            if with_caption:  # the same initial noise as the row's first image
                encode = self.sd_pipeline.encode_prompt
                baseline_calls = self._render(lambda texts: (encode(list(texts)), encode([""] * len(texts))),
                                              np.asarray([prompts[r].caption for r in with_caption]),
                                              [image_seed(prompts[r].seed, 0) for r in with_caption], key, wait=wait)
        then_s = 0.0
        if then is not None:
            then_start = time.perf_counter()
            then()
            then_s = time.perf_counter() - then_start
        images = dict(zip(rows, _uint8_images(calls)))
        baselines = dict(zip(with_caption, _uint8_images(baseline_calls)))
        respond_start = time.perf_counter()
        self.timings["images_s"] = respond_start - images_start - then_s
        ids, lengths = np.asarray(out.ids), np.asarray(out.lengths)
        positions = np.asarray(out.insertion_positions)
        responses = [self._response(prompts[r], ids[r, : lengths[r]].tolist(), positions[r, : counts[r]].tolist(),
                                    [images[(r, j)] for j in range(int(counts[r]))], baselines.get(r))
                     for r in range(b)]
        self.timings["respond_s"] = time.perf_counter() - respond_start
        return responses

    def _render(self, conditioning, inputs: np.ndarray | None, seeds: list[int], key: jax.Array, *,
                wait: bool = True) -> list[tuple[jax.Array, int]]:
        """Sampler calls for `inputs` (`conditioning(x) -> (cond, uncond)`): at most `render_batch` images
        each, padded to a power of two (few compiled shapes); per call, its images `[n, H, W, 3]` in
        [0, 1] and how many of them are not padding. `wait`: each call is waited on (and timed)."""
        calls = []
        per_call = self.settings.render_batch
        for i in range(0, len(seeds), per_call):
            chunk = inputs[i : i + per_call]
            n = render_call_size(len(chunk), per_call)
            cond, uncond = conditioning(np.concatenate([chunk, np.repeat(chunk[:1], n - len(chunk), axis=0)]))
            pixels = self.sampler(self.scheduler, self.settings.num_inference_steps, cond, uncond,
                                  self.settings.guidance_scale,
                                  seeds=np.asarray(seeds[i : i + per_call] + [0] * (n - len(chunk)), np.uint32),
                                  key=key, latent_size=self.latent_size, wait=wait)
            calls.append((pixels, len(chunk)))
            if wait:
                self.timings["sampler_s"] = self.timings.get("sampler_s", 0.0) + self.sampler.timings["run_s"]
            log.info("sampler call for %d images (%s)", len(chunk), self.sampler.timings)
        return calls

    def _response(self, prompt: Prompt, ids: list[int], positions: list[int], images: list[np.ndarray],
                  baseline: np.ndarray | None) -> Response:
        window = len(self.tokenizer.ids.voken_ids)
        segments: list[str | int] = []
        start = 0
        for j, pos in enumerate(positions):
            segments.append(self._text(ids[start:pos]))
            segments.append(j)
            start = pos + window
        segments.append(self._text(ids[start:]))
        segments = [s for s in segments if s != ""]
        return Response(prompt, segments, images, ids, self.tokenizer.decode(ids), baseline)

    def _text(self, ids: list[int]) -> str:
        """Readable text of some ids: stop sequences, EOS and vokens removed."""
        for seq in self.sampling.stop_sequences:
            if len(ids) >= len(seq) and tuple(ids[-len(seq):]) == seq:
                ids = ids[: -len(seq)]
        drop = set(self.sampling.eos_ids) | set(self.tokenizer.ids.voken_ids)
        return self.tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False).strip()
