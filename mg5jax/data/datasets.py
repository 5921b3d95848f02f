"""Readers for the three MiniGPT-5 data formats (CC3M TSV, VIST JSON, MMDialog JSON lines).

Each reader rebuilds the original's sample list exactly (REFERENCE §6.3–6.5: templates, random
template choice, history interleaving, stop rules) and returns ``(samples, report)``. Tokenization,
image decoding and batching happen later, on top of these samples.

Bad data never turns into a silent wrong sample: a malformed record or a missing image file is
logged with its file and row, counted in the ``ReadReport`` and skipped (a VIST story is cut before
the bad step); with ``strict=True`` it raises ``DataError`` instead. Problems that make a whole file
unreadable (bad header, invalid JSON document, missing mapping file) always raise.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import random
import re
from collections.abc import Callable
from typing import Any

from mg5jax.data.tokenization import IMAGE_PLACEHOLDER, NUM_VOKENS, voken_tokens

logger = logging.getLogger(__name__)

IMAGE_SLOT = f"<Img>{IMAGE_PLACEHOLDER}</Img>"  # where one input image's embeddings are spliced in

CC3M_SYSTEM_PROMPT = "You will be able to generate image according to command."
CC3M_GENERATION_PROMPTS = (
    "generate image with caption:",
    "can you give me the image with caption:",
    "help me to generate this image:",
    "generate image with according to caption:",
    "according to caption, generate image:",
    "an image with caption:",
    "can you visualize this caption:",
)

VIST_SYSTEM_PROMPT = (
    "Give the following images in <Img>ImageContent</Img> format. "
    "You will be able to see the images once I provide it to you. Please understanding images and generate story."
)
VIST_GEN_TEMPLATES = (
    "###Human:{prompt} Generate an image with the scene description: {caption} ###Assistant:",
    "###Human:{prompt} the scene description: {caption} ###Assistant:",
)
VIST_MULTIMODAL_TEMPLATES = (
    "###Human:{prompt} Tell me the next scene with image. ###Assistant:",
    "###Human:{prompt} Generate the next scene with image. ###Assistant:",
    "###Human:{prompt} What should happen then? ###Assistant:",
)
VIST_UNDERSTANDING_TEMPLATES = (
    "###Human:{prompt} Tell me the next scene description by this image: <Img><ImageHere></Img> ###Assistant:",
    "###Human:{prompt} What happen in the next scene image: <Img><ImageHere></Img> ###Assistant:",
)

MMDIALOG_SYSTEM_PROMPT = (
    "Give the following images in <Img>ImageContent</Img> format. "
    "You will be able to see the images once I provide it to you. "
    "Please generate conversations with appropriate images."
)
MMDIALOG_ROLE_MARKERS = ("###Human:", "###Assistant:")  # even turns, odd turns
MMDIALOG_ERROR_MEDIA_IDS = frozenset({"-3872362534310063124", "3713630103994725971"})
MMDIALOG_MAX_TEXT_TOKENS = 50


class DataError(Exception):
    """Malformed or unusable data; the message names the file and the row (or key)."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One training/eval example before tokenization.

    ``input_images`` holds one absolute path per ``<ImageHere>`` in ``source``, in order, or ``(None,)``
    when there is none (the original feeds a black placeholder image that is never spliced).
    ``output_image`` is the SD target image (absolute path) or None.
    """

    source: str
    target: str
    caption: str | None
    task_name: str
    input_images: tuple[str | None, ...]
    output_image: str | None


@dataclasses.dataclass(frozen=True)
class Problem:
    """A skipped record: which file, which row (line number, or story/step), and why."""

    file: str
    row: int | str
    reason: str


LOGGED_PROBLEMS = 20  # bad records of a file logged one by one (a wrong data.kind makes every record bad)


@dataclasses.dataclass
class ReadReport:
    """What a reader saw: records read, samples produced, records skipped, and rule-based stops."""

    file: str
    records: int = 0  # non-blank data rows / stories / conversations seen
    samples: int = 0
    problems: list[Problem] = dataclasses.field(default_factory=list)
    stops: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # MMDialog stop rules

    @property
    def skipped(self) -> int:
        """Number of problems (each skipped a record or cut a story/conversation short)."""
        return len(self.problems)

    def add_problem(self, row: int | str, reason: str, strict: bool) -> None:
        """Record a bad record (logging the first `LOGGED_PROBLEMS` of the file), or raise ``DataError``
        when ``strict``."""
        if strict:
            raise DataError(f"{self.file}, row {row}: {reason}")
        if len(self.problems) < LOGGED_PROBLEMS:
            logger.warning("%s, row %s: %s (skipped)", self.file, row, reason)
        elif len(self.problems) == LOGGED_PROBLEMS:
            logger.warning("%s: more than %d bad records; the rest are counted, not logged one by one", self.file,
                           LOGGED_PROBLEMS)
        self.problems.append(Problem(self.file, row, reason))


def _vokens_str(num_vokens: int) -> str:
    return "".join(voken_tokens(num_vokens))


def pre_caption(caption: str) -> str:
    """The original's CC3M caption cleaning: lowercase, punctuation ``.!"()*#:;~`` -> space, squeeze, strip."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    return caption.rstrip("\n").strip(" ")


def _absolute(root: str, relative: str) -> str:
    return os.path.abspath(os.path.join(root, relative))


def read_cc3m(
    tsv_path: str | os.PathLike,
    test: bool = False,
    seed: int = 42,
    *,
    data_root: str | os.PathLike | None = None,
    strict: bool = False,
    num_vokens: int = NUM_VOKENS,
) -> tuple[list[Sample], ReadReport]:
    """Read a CC3M TSV (header ``caption<TAB>image_path``, LF or CRLF) into stage-1 samples.

    Row i gives source = cleaned caption, target = the voken string (the caption in ``test`` mode),
    task ``cc3m_{i}``; when ``i % 100 == 0`` and not ``test`` an instruction sample ``cc3m_{i}_instruction``
    follows, its prompt drawn by ``random.Random(seed)``. Image paths are relative to ``data_root``
    (default: the TSV's directory, the original's DATAFOLDER). Fields are split on tabs with no quote
    handling; i counts non-blank data rows, skipped ones included, so task names follow the file.
    """
    path = os.fspath(tsv_path)
    root = os.fspath(data_root) if data_root is not None else os.path.dirname(os.path.abspath(path))
    report = ReadReport(path)
    rng = random.Random(seed)
    vokens = _vokens_str(num_vokens)
    lines = _read_lines(path)
    if isinstance(lines[0], UnicodeDecodeError):
        raise DataError(f"{path}, row 1: {_not_utf8(lines[0])}")
    header = lines[0].split("\t")
    if "caption" not in header or "image_path" not in header:
        got = lines[0] if len(lines[0]) <= 120 else f"{lines[0][:120]}… ({len(lines[0])} characters)"
        raise DataError(f"{path}, row 1: header must name the columns 'caption' and 'image_path', got {got!r} (a "
                        "CC3M file is a TSV: is data.kind right for this file?)")
    caption_col, image_col = header.index("caption"), header.index("image_path")
    samples: list[Sample] = []
    i = -1
    for line_no, line in enumerate(lines[1:], start=2):
        if isinstance(line, str) and not line.strip():
            continue
        i += 1
        report.records += 1
        if isinstance(line, UnicodeDecodeError):
            report.add_problem(line_no, _not_utf8(line), strict)
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            report.add_problem(line_no, f"expected {len(header)} tab-separated columns, got {len(fields)}", strict)
            continue
        raw_caption, relative_image = fields[caption_col], fields[image_col].strip()
        if not raw_caption.strip() or not relative_image:
            report.add_problem(line_no, "empty caption or image_path", strict)
            continue
        image = _absolute(root, relative_image)
        if not os.path.isfile(image):
            report.add_problem(line_no, f"image file not found: {image}", strict)
            continue
        caption = pre_caption(raw_caption)
        target = caption if test else f"{vokens} ###"
        samples.append(Sample(caption, target, caption, f"cc3m_{i}", (None,), image))
        if i % 100 == 0 and not test:
            source = CC3M_SYSTEM_PROMPT + f"###Human: {rng.choice(CC3M_GENERATION_PROMPTS)} {caption} ###Assistant:"
            samples.append(Sample(source, target, caption, f"cc3m_{i}_instruction", (None,), image))
    report.samples = len(samples)
    return samples, report


def load_json(path: str | os.PathLike) -> Any:
    """The JSON document in `path`; a missing file, bad JSON or non-UTF-8 text is a `DataError` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: invalid JSON: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {_not_utf8(e)}") from e


def _not_utf8(e: UnicodeDecodeError) -> str:
    return f"not UTF-8 text ({e.reason} at byte {e.start})"


def _read_lines(path: str) -> list[str | UnicodeDecodeError]:
    """The lines of a line-based data file (split on "\\n", a trailing "\\r" removed), each decoded as
    UTF-8 on its own: a line that does not decode is its `UnicodeDecodeError`, for the reader to
    report by row. A missing file is a `DataError`."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    lines: list[str | UnicodeDecodeError] = []
    for line in raw.split(b"\n"):
        try:
            lines.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            lines.append(e)
    return lines


def _vist_step(step: Any, mapping: dict[str, Any], root: str) -> tuple[str, int, str]:
    """Validate one VIST step; return (caption, sequence_index, absolute image path) or raise ValueError."""
    if not isinstance(step, dict):
        raise ValueError(f"step is a {type(step).__name__}, expected an object")
    missing = [k for k in ("caption", "image_id", "sequence_index") if k not in step]
    if missing:
        raise ValueError(f"missing key(s) {missing}")
    caption, image_id, sequence_index = step["caption"], str(step["image_id"]), step["sequence_index"]
    if not isinstance(caption, str) or not isinstance(sequence_index, int):
        raise ValueError("'caption' must be a string and 'sequence_index' an integer")
    if image_id not in mapping or not isinstance(mapping[image_id], str):
        raise ValueError(f"image_id {image_id!r} has no path in the image mapping")
    image = _absolute(root, mapping[image_id])
    if not os.path.isfile(image):
        raise ValueError(f"image file not found: {image}")
    return caption, sequence_index, image


def read_vist(
    json_path: str | os.PathLike,
    test: bool = False,
    seed: int = 42,
    *,
    data_root: str | os.PathLike | None = None,
    strict: bool = False,
    num_vokens: int = NUM_VOKENS,
) -> tuple[list[Sample], ReadReport]:
    """Read a VIST ``<split>_cleaned.json`` (+ ``<split>_image_mapping.json`` beside it) into stage-2 samples.

    Step k of a story yields a ``-gen`` sample, and when k > 0 and not ``test`` also ``-multimodal`` and
    ``-understanding`` samples; history = earlier captions each followed by an image slot. Templates are
    drawn by ``random.Random(seed)`` in the original's order (gen, multimodal, understanding per step).
    Test targets stay the voken string (as in the original). Image paths are relative to ``data_root``
    (default: the JSON's directory). A bad step (missing key, unknown image id, missing image file)
    is reported and cuts its story before that step. The mapping file name replaces "cleaned" by
    "image_mapping" in the file name only.
    """
    path = os.fspath(json_path)
    directory, name = os.path.split(os.path.abspath(path))
    if "cleaned" not in name:
        raise DataError(f"{path}: a VIST file name must contain 'cleaned' (its mapping replaces it by 'image_mapping')")
    mapping_path = os.path.join(directory, name.replace("cleaned", "image_mapping"))
    root = os.fspath(data_root) if data_root is not None else directory
    stories, mapping = load_json(path), load_json(mapping_path)
    if not isinstance(stories, dict):
        raise DataError(f"{path}: expected an object {{story_id: [steps]}}, got {type(stories).__name__}")
    if not isinstance(mapping, dict):
        raise DataError(f"{mapping_path}: expected an object {{image_id: path}}, got {type(mapping).__name__}")
    report = ReadReport(path)
    rng = random.Random(seed)
    vokens = _vokens_str(num_vokens)
    samples: list[Sample] = []
    for story_id, steps in stories.items():
        report.records += 1
        if not isinstance(steps, list):
            report.add_problem(f"story {story_id}", f"expected a list of steps, got {type(steps).__name__}", strict)
            continue
        captions: list[str] = []
        images: list[str] = []
        for k, step in enumerate(steps):
            try:
                caption, sequence_index, image = _vist_step(step, mapping, root)
            except ValueError as e:
                report.add_problem(f"story {story_id} step {k}", f"{e}; story cut before this step", strict)
                break
            prompt = IMAGE_SLOT.join(captions)
            if captions:
                prompt = f"{prompt}{IMAGE_SLOT}\n"
            name = f"{story_id}_{sequence_index}"
            history = tuple(images)
            gen_source = VIST_SYSTEM_PROMPT + rng.choice(VIST_GEN_TEMPLATES).format(prompt=prompt, caption=caption)
            samples.append(Sample(gen_source, f"{vokens} ###", None, f"{name}-gen", history or (None,), image))
            if captions and not test:
                mm_source = VIST_SYSTEM_PROMPT + rng.choice(VIST_MULTIMODAL_TEMPLATES).format(prompt=prompt)
                samples.append(Sample(mm_source, f"{caption} {vokens} ###", None, f"{name}-multimodal", history, image))
                und_source = VIST_SYSTEM_PROMPT + rng.choice(VIST_UNDERSTANDING_TEMPLATES).format(prompt=prompt)
                und_images = (*history, image)
                samples.append(Sample(und_source, f"{caption} ###", None, f"{name}-understanding", und_images, None))
            captions.append(caption)
            images.append(image)
    report.samples = len(samples)
    return samples, report


def _mmdialog_turns(record: Any) -> tuple[Any, list[tuple[str, str | None]]]:
    """Validate one MMDialog record; return (conversation_id, [(text, media_id or None)]) or raise ValueError."""
    if not isinstance(record, dict):
        raise ValueError(f"record is a {type(record).__name__}, expected an object")
    missing = [k for k in ("conversation_id", "conversation") if k not in record]
    if missing:
        raise ValueError(f"missing key(s) {missing}")
    if not isinstance(record["conversation"], list):
        raise ValueError("'conversation' must be a list")
    turns = []
    for t, entry in enumerate(record["conversation"]):
        turn = entry.get("turn") if isinstance(entry, dict) else None
        if not isinstance(turn, list) or not turn or not isinstance(turn[0], dict) or "__TEXT__" not in turn[0]:
            raise ValueError(f"conversation[{t}] has no 'turn' list starting with a '__TEXT__' entry")
        text = turn[0]["__TEXT__"]
        if not isinstance(text, str):
            raise ValueError(f"conversation[{t}] '__TEXT__' is not a string")
        media = None
        if len(turn) > 1:
            if not isinstance(turn[1], dict) or "__MEDIA__" not in turn[1]:
                raise ValueError(f"conversation[{t}] second entry has no '__MEDIA__' key")
            media = str(turn[1]["__MEDIA__"])
        turns.append((text, media))
    return record["conversation_id"], turns


def read_mmdialog(
    jsonl_path: str | os.PathLike,
    tokenizer_len_fn: Callable[[str], int] | None = None,
    test: bool = False,
    *,
    strict: bool = False,
    num_vokens: int = NUM_VOKENS,
) -> tuple[list[Sample], ReadReport]:
    """Read MMDialog conversations (JSON lines; images at ``<dir>/<media_id>.jpg``) into stage-2 samples.

    Every turn i > 0 gives a sample ``{conversation_id}_{i}-mm``: source = system prompt + " " + the
    history items and the role marker of turn i joined by spaces; target = "{text} {vokens} ###" when the
    turn has an image (the output image) else "{text} ###". A history item is "{marker} {text}", followed
    directly by "<Img><ImageHere></Img>" when that turn had an image (whose path joins the inputs).
    History window: at each Human turn i >= 2 its position is remembered; after the following Assistant
    turn is added the history is cut to start there (so context = last exchange + current turn).
    A conversation stops at the first turn with empty text or text ending in ".jpg", text longer than
    50 tokens (training only, counted by ``tokenizer_len_fn``, e.g. ``MiniGPT5Tokenizer.count_tokens``),
    an image id on the original's error list, or a missing image file (also reported as a problem).
    Conversations with fewer than 2 turns are skipped. Stops are counted in ``report.stops``.
    """
    if not test and tokenizer_len_fn is None:
        raise ValueError("read_mmdialog: training mode needs tokenizer_len_fn for the 50-token turn limit")
    path = os.fspath(jsonl_path)
    directory = os.path.dirname(os.path.abspath(path))
    report = ReadReport(path)
    vokens = _vokens_str(num_vokens)
    samples: list[Sample] = []
    for line_no, line in enumerate(_read_lines(path), start=1):
        if isinstance(line, str) and not line.strip():
            continue
        report.records += 1
        if isinstance(line, UnicodeDecodeError):
            report.add_problem(line_no, _not_utf8(line), strict)
            continue
        try:
            conversation_id, turns = _mmdialog_turns(json.loads(line))
        except json.JSONDecodeError as e:
            report.add_problem(line_no, f"invalid JSON: {e.msg} (column {e.colno})", strict)
            continue
        except ValueError as e:
            report.add_problem(line_no, str(e), strict)
            continue
        if len(turns) < 2:
            report.stops["fewer_than_2_turns"] += 1
            continue
        history: list[str] = []
        history_images: list[str] = []
        human_start: tuple[int, int] | None = None  # (history index, image index) of the remembered Human turn
        for i, (text, media) in enumerate(turns):
            if text == "" or text.endswith(".jpg"):
                report.stops["empty_or_jpg_text"] += 1
                break
            if not test and tokenizer_len_fn(text) > MMDIALOG_MAX_TEXT_TOKENS:
                report.stops["text_too_long"] += 1
                break
            image = None
            if media is not None:
                if media in MMDIALOG_ERROR_MEDIA_IDS:
                    report.stops["error_list_image"] += 1
                    break
                image = os.path.join(directory, f"{media}.jpg")
                if not os.path.isfile(image):
                    report.stops["missing_image"] += 1
                    reason = f"turn {i}: image file not found: {image}; conversation stopped"
                    report.add_problem(line_no, reason, strict)
                    break
            marker = MMDIALOG_ROLE_MARKERS[i % 2]
            if i > 0:
                source = MMDIALOG_SYSTEM_PROMPT + " " + " ".join([*history, marker])
                target = f"{text} {vokens} ###" if image else f"{text} ###"
                inputs = tuple(history_images) or (None,)
                samples.append(Sample(source, target, None, f"{conversation_id}_{i}-mm", inputs, image))
            history.append(f"{marker} {text}" + (IMAGE_SLOT if image else ""))
            if image:
                history_images.append(image)
            if i % 2 == 0 and i >= 2:
                human_start = (len(history) - 1, len(history_images) - (1 if image else 0))
            elif i % 2 == 1 and human_start is not None:
                history, history_images = history[human_start[0] :], history_images[human_start[1] :]
                human_start = None
    report.samples = len(samples)
    return samples, report
