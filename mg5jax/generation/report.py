"""Writing generated responses to disk: PNGs, one JSON record per prompt, and an `index.html` that
shows each story as a person reads it (input images marked, generated images in place), with the
dataset's image and the SD baseline beside it when the prompt has them."""

from __future__ import annotations

import html
import json
import os
import pathlib
import re
import shutil
from collections.abc import Sequence

from PIL import Image

from mg5jax.data import images as image_ops
from mg5jax.generation.interleaved import Response

_SLOT = re.compile(r"<Img><ImageHere></Img>|<ImageHere>")

_STYLE = """
body { font-family: Georgia, serif; max-width: 52rem; margin: 2rem auto; color: #222; background: #fafafa; }
article { background: white; border: 1px solid #ddd; border-radius: 6px; padding: 1rem 1.5rem; margin-bottom: 2rem; }
h2 { font-size: 1rem; color: #666; font-family: sans-serif; }
.prompt { color: #555; white-space: pre-wrap; }
.response { font-size: 1.1rem; white-space: pre-wrap; }
figure { display: inline-block; margin: 0.5rem; vertical-align: top; text-align: center; }
figure img { width: 192px; height: 192px; object-fit: contain; image-rendering: pixelated; border: 1px solid #ccc; }
figure.input img { border: 3px dashed #4a7; }
figure.generated img { border: 3px solid #47a; }
figure.reference img { border: 3px dotted #999; }
.compare { border-top: 1px solid #eee; margin-top: 0.5rem; }
figcaption { font-family: sans-serif; font-size: 0.8rem; color: #666; }
"""


def _figure(src: str, caption: str, kind: str) -> str:
    return (f'<figure class="{kind}"><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


# the files `ReportWriter` writes in a response folder
_RESPONSE_FILE = re.compile(r"record\.json|(input|image)_\d+\.png|reference\.png|sd_baseline\.png")


def _is_response_folder(d: pathlib.Path) -> bool:
    """`d` is a response folder a report wrote: named `NNN`, holding only files it writes (a crash may
    have left it without its record), at least one."""
    if not (d.is_dir() and len(d.name) >= 3 and d.name.isdigit()):
        return False
    entries = list(d.iterdir())
    return bool(entries) and all(e.is_file() and _RESPONSE_FILE.fullmatch(e.name) for e in entries)


def earlier_results(out_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """What an earlier report left in `out_dir`: its `index.html`, `run.json` and response folders. A
    folder that holds anything else is not one of them (a user's `2024/` of photos stays)."""
    out = pathlib.Path(out_dir)
    if not out.is_dir():
        return []
    found = [out / name for name in ("index.html", "run.json") if (out / name).is_file()]
    return found + sorted(d for d in out.iterdir() if _is_response_folder(d))


def replaceable(earlier: Sequence[pathlib.Path]) -> bool:
    """`earlier` (from `earlier_results`) is only the `run.json` of a run of ours that stopped before its
    first response: the next run may write over it."""
    if [p.name for p in earlier] != ["run.json"]:
        return False
    try:
        return "command" in dict(json.loads(earlier[0].read_text()))
    except (OSError, ValueError, TypeError):
        return False


class ReportWriter:
    """Writes responses under `out_dir/NNN/` as they come (`add`), rewriting `index.html` after each
    addition: what is written survives an error in a later batch. `run` (flags, checkpoint: what the
    responses were made with) goes to `run.json`. A folder that holds an earlier report is refused,
    or with `overwrite` emptied of it first (other files stay), so two runs never mix; the `run.json` of
    a run that stopped before its first response is replaced (`replaceable`)."""

    def __init__(self, out_dir: str | pathlib.Path, *, title: str = "MiniGPT-5", run: dict | None = None,
                 overwrite: bool = False):
        self.out = pathlib.Path(out_dir)
        if earlier := earlier_results(self.out):
            if not (overwrite or replaceable(earlier)):
                raise FileExistsError(f"{self.out}: holds an earlier report ({len(earlier)} entries, e.g. "
                                      f"{earlier[0].name}); replace it or choose another folder")
            for path in earlier:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        if run is not None:
            (self.out / "run.json").write_text(json.dumps(run, indent=2, ensure_ascii=False))
        self.title = title
        self.articles: list[str] = []

    @property
    def index(self) -> pathlib.Path:
        return self.out / "index.html"

    @property
    def written(self) -> int:
        """Responses written so far (each one's folder whole, and in the index)."""
        return len(self.articles)

    def add(self, responses: Sequence[Response]) -> pathlib.Path:
        """Write these responses after the ones added before; returns the index path. One that fails to
        write raises after the index shows those written before it."""
        try:
            for r in responses:
                self.articles.append(self._write(r, len(self.articles)))
        finally:
            self._write_index()
        return self.index

    def _write_index(self) -> None:
        self.index.write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>{''.join(self.articles)}"
            "</body></html>", encoding="utf-8")

    def _write(self, r: Response, n: int) -> str:
        """Response `n`'s folder (images, record.json, no files of an earlier run); returns its article."""
        d = self.out / f"{n:03d}"
        d.mkdir(exist_ok=True)
        for old in d.iterdir():
            if old.is_file() and _RESPONSE_FILE.fullmatch(old.name):
                old.unlink()
        inputs = []
        for k, path in enumerate(r.prompt.images):
            name = f"input_{k + 1}.png"
            image_ops.load_image(path).save(d / name)
            inputs.append(name)
        generated = []
        for k, img in enumerate(r.images):
            name = f"image_{k + 1}.png"
            Image.fromarray(img).save(d / name)
            generated.append(name)
        compare = []  # (file, caption) shown under the response
        if r.prompt.reference_image is not None:
            image_ops.load_image(r.prompt.reference_image).save(d / "reference.png")
            compare.append(("reference.png", "the dataset's image"))
        if r.baseline is not None:
            Image.fromarray(r.baseline).save(d / "sd_baseline.png")
            compare.append(("sd_baseline.png", "Stable Diffusion from the caption"))
        # input files by absolute path: the record reproduces the response from any working directory
        record = {"prompt": r.prompt.text, "input_images": [os.path.abspath(p) for p in r.prompt.images],
                  "seed": r.prompt.seed, "text": r.text, "raw_text": r.raw_text, "images": generated,
                  "token_ids": r.token_ids, "task": r.prompt.task, "caption": r.prompt.caption,
                  "reference_text": r.prompt.reference_text,
                  "reference_image": r.prompt.reference_image and os.path.abspath(r.prompt.reference_image),
                  "sd_baseline": "sd_baseline.png" if r.baseline is not None else None}
        (d / "record.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))

        pieces, slots = _SLOT.split(r.prompt.text), iter(range(len(inputs)))
        prompt_html = html.escape(pieces[0])
        for piece in pieces[1:]:
            k = next(slots)
            prompt_html += _figure(f"{d.name}/{inputs[k]}", f"input image {k + 1}", "input") + html.escape(piece)
        response_html = "".join(
            html.escape(s) if isinstance(s, str) else _figure(f"{d.name}/{generated[s]}", f"generated image {s + 1}",
                                                               "generated")
            for s in r.segments)
        compare_html = "".join(_figure(f"{d.name}/{name}", caption, "reference") for name, caption in compare)
        caption = f"<p>caption: {html.escape(r.prompt.caption)}</p>" if r.prompt.caption else ""
        if r.prompt.reference_text:
            caption += f"<p>the dataset's text: {html.escape(r.prompt.reference_text)}</p>"
        if compare_html or caption:
            compare_html = f'<div class="compare"><h2>for comparison</h2>{caption}{compare_html}</div>'
        task = f" · task {html.escape(r.prompt.task)}" if r.prompt.task else ""
        return (f'<article id="r{n:03d}"><h2>prompt {n + 1}{task} · seed {r.prompt.seed}</h2>'
                f'<div class="prompt">{prompt_html}</div><h2>response</h2>'
                f'<div class="response">{response_html}</div>{compare_html}</article>')


def write_outputs(responses: Sequence[Response], out_dir: str | pathlib.Path, *, title: str = "MiniGPT-5",
                  overwrite: bool = False) -> pathlib.Path:
    """Write every response under `out_dir/NNN/` and the `index.html` that shows them; returns its path."""
    return ReportWriter(out_dir, title=title, overwrite=overwrite).add(responses)
