"""The CC3M / VIST / MMDialog readers rebuild the original's samples exactly and refuse bad data loudly.

Expected strings are written out from REFERENCE §6.3–6.5, character for character.
"""

import json
import logging
import pathlib
import random
import shutil

import pytest
from fixtures_tokenizer import tiny_tokenizer_dir  # noqa: F401  (session fixture)
from PIL import Image

from mg5jax.data.datasets import (
    DataError,
    Sample,
    pre_caption,
    read_cc3m,
    read_mmdialog,
    read_vist,
)
from mg5jax.data.tokenization import MiniGPT5Tokenizer

VOKENS = "[IMG0][IMG1][IMG2][IMG3][IMG4][IMG5][IMG6][IMG7]"
CC3M_PROMPTS = [
    "generate image with caption:",
    "can you give me the image with caption:",
    "help me to generate this image:",
    "generate image with according to caption:",
    "according to caption, generate image:",
    "an image with caption:",
    "can you visualize this caption:",
]
S1 = (
    "Give the following images in <Img>ImageContent</Img> format. You will be able to see the images once I "
    "provide it to you. Please understanding images and generate story."
)
S_MM = (
    "Give the following images in <Img>ImageContent</Img> format. You will be able to see the images once I "
    "provide it to you. Please generate conversations with appropriate images."
)
SLOT = "<Img><ImageHere></Img>"
CAPTIONS = [
    "my sister arrived early to help me with the family bar bq .",
    "every one else arrived soon after .",
    "dad manned the grill .",
    "there was so much food and it was all delicious .",
    "we ended the day shooting off some fireworks .",
]
MM_TEXT = [
    "Happy JAchat day, traveltribe! Today's all-day topic is GORGEOUS CITY SKYLINES. Post your pic, tell us where "
    "it's from, then tag a few friends to join the fun (and don't forget our ). :camera_with_flash: Here's my former "
    "hometown Chicago - I can't think of a city with better skyscrapers. :smiling_face_with_heart-eyes:",
    "Stunning photo Pola. One day... I have one from my second home Melbourne, Oz. Please show us one of your "
    "favourite skylines for jachat",
    "Lovely photo Doro! Here's my favourite skyline. :smiling_face_with_smiling_eyes: HongKong I tag",
]
MM_MEDIA = ["2682085160072908899", "-5632896413199993329", "3433276376275926389", "-5763052819421198282"]


def _assert_slots_match_images(samples: list[Sample]) -> None:
    for s in samples:
        n_slots = s.source.count("<ImageHere>")
        if n_slots == 0:
            assert s.input_images == (None,), s.task_name
        else:
            assert len(s.input_images) == n_slots and all(pathlib.Path(p).is_absolute() for p in s.input_images)
            assert all(pathlib.Path(p).is_file() for p in s.input_images), s.task_name


def _tiny_jpg(path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    return path


# ---------------------------------------------------------------- CC3M


def test_pre_caption():
    assert pre_caption("burning candle on the background of the aquarium with small fish .") == (
        "burning candle on the background of the aquarium with small fish"
    )
    assert pre_caption('  A "Big" (Red) dog: wow!!  ~ok; *x* #tag\n') == "a big red dog wow ok x tag"


def test_cc3m_train_samples(samples_dir):
    samples, report = read_cc3m(samples_dir / "CC3M" / "cc3m_val.tsv")
    assert [s.task_name for s in samples] == ["cc3m_0", "cc3m_0_instruction", "cc3m_1"]
    assert (report.records, report.samples, report.skipped) == (2, 3, 0)
    caption = "burning candle on the background of the aquarium with small fish"
    first, instruction, second = samples
    assert first == Sample(
        caption, f"{VOKENS} ###", caption, "cc3m_0", (None,), str(samples_dir / "CC3M" / "val" / "000007775.jpg")
    )
    prompt = random.Random(42).choice(CC3M_PROMPTS)
    assert prompt == "an image with caption:"
    assert instruction.source == (
        "You will be able to generate image according to command.###Human: an image with caption: "
        "burning candle on the background of the aquarium with small fish ###Assistant:"
    )
    assert (instruction.target, instruction.caption, instruction.output_image) == (
        f"{VOKENS} ###",
        caption,
        first.output_image,
    )
    assert (second.source, second.caption) == ("shot of the full tree", "shot of the full tree")
    _assert_slots_match_images(samples)


def test_cc3m_test_samples_target_captions(samples_dir):
    samples, _ = read_cc3m(samples_dir / "CC3M" / "cc3m_val.tsv", test=True)
    assert [s.task_name for s in samples] == ["cc3m_0", "cc3m_1"]
    assert [s.target for s in samples] == [s.caption for s in samples] == [s.source for s in samples]


def test_cc3m_instruction_every_100_rows_lf(tmp_path):
    _tiny_jpg(tmp_path / "img" / "a.jpg")
    rows = [f"caption number {i} .\timg/a.jpg" for i in range(101)]
    tsv = tmp_path / "many.tsv"
    tsv.write_text("caption\timage_path\n" + "\n".join(rows) + "\n\n", encoding="utf-8")
    samples, report = read_cc3m(tsv, seed=7)
    names = [s.task_name for s in samples]
    assert len(samples) == 103 and report.records == 101
    assert names[:2] == ["cc3m_0", "cc3m_0_instruction"] and names[-2:] == ["cc3m_100", "cc3m_100_instruction"]
    rng = random.Random(7)
    expected = [rng.choice(CC3M_PROMPTS) for _ in range(2)]
    for s, p in zip([samples[1], samples[-1]], expected, strict=True):
        assert s.source.startswith(f"You will be able to generate image according to command.###Human: {p} caption")


def _bad_cc3m(tmp_path: pathlib.Path) -> pathlib.Path:
    _tiny_jpg(tmp_path / "ok.jpg")
    tsv = tmp_path / "bad.tsv"
    tsv.write_text(
        "caption\timage_path\r\n"
        "good one .\tok.jpg\r\n"  # line 2
        "too\tmany\tcolumns\r\n"  # line 3
        "no image column\r\n"  # line 4
        "\tok.jpg\r\n"  # line 5: empty caption
        "missing image .\tgone.jpg\r\n"  # line 6
        "good two .\tok.jpg\r\n",  # line 7
        encoding="utf-8",
    )
    return tsv


def test_cc3m_malformed_rows_lenient(tmp_path, caplog):
    tsv = _bad_cc3m(tmp_path)
    with caplog.at_level(logging.WARNING):
        samples, report = read_cc3m(tsv)
    # the row index i keeps counting skipped rows, so names follow the file
    assert [s.task_name for s in samples] == ["cc3m_0", "cc3m_0_instruction", "cc3m_5"]
    assert [(p.row, p.reason.split(":")[0]) for p in report.problems] == [
        (3, "expected 2 tab-separated columns, got 3"),
        (4, "expected 2 tab-separated columns, got 1"),
        (5, "empty caption or image_path"),
        (6, "image file not found"),
    ]
    assert all(p.file == str(tsv) for p in report.problems) and report.skipped == 4 and report.records == 6
    assert "bad.tsv, row 6: image file not found" in caplog.text


def test_a_file_of_bad_records_logs_the_first_ones(tmp_path, caplog):
    """Every bad record is counted; the first LOGGED_PROBLEMS are logged, then one line says the rest are not."""
    from mg5jax.data.datasets import LOGGED_PROBLEMS

    tsv = tmp_path / "wrong.tsv"
    tsv.write_text("caption\timage_path\n" + "one column\n" * (LOGGED_PROBLEMS + 5))
    with caplog.at_level(logging.WARNING):
        _, report = read_cc3m(tsv)
    assert report.skipped == LOGGED_PROBLEMS + 5
    assert caplog.text.count("expected 2 tab-separated columns") == LOGGED_PROBLEMS
    assert caplog.text.count(f"more than {LOGGED_PROBLEMS} bad records; the rest are counted") == 1


def test_cc3m_strict_raises_with_file_and_row(tmp_path):
    tsv = _bad_cc3m(tmp_path)
    with pytest.raises(DataError, match=r"bad\.tsv, row 3: expected 2 tab-separated columns"):
        read_cc3m(tsv, strict=True)


def test_rows_that_are_not_utf8_are_skipped_by_row(tmp_path):
    """A line that does not decode is one bad row (named, counted, skipped; strict: an error); a JSON
    document that does not decode is an error naming the file."""
    _tiny_jpg(tmp_path / "ok.jpg")
    tsv = tmp_path / "latin1.tsv"
    tsv.write_bytes("caption\timage_path\ngood one .\tok.jpg\ncaf\u00e9 .\tok.jpg\ngood two .\tok.jpg\n"
                    .replace("\u00e9", "\x00").encode().replace(b"\x00", b"\xe9"))
    samples, report = read_cc3m(tsv)
    assert [s.task_name for s in samples] == ["cc3m_0", "cc3m_0_instruction", "cc3m_2"]
    assert [(p.row, p.reason) for p in report.problems] == [(3, "not UTF-8 text (invalid continuation byte at byte 3)")]
    with pytest.raises(DataError, match=r"latin1\.tsv, row 3: not UTF-8"):
        read_cc3m(tsv, strict=True)
    jsonl = tmp_path / "conv.jsonl"
    jsonl.write_bytes(b"\xff\n")
    samples, report = read_mmdialog(jsonl, test=True)
    assert samples == [] and [(p.row, p.reason.split(" (")[0]) for p in report.problems] == [(1, "not UTF-8 text")]
    story = tmp_path / "train_cleaned.json"
    story.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(DataError, match=r"train_cleaned\.json: not UTF-8 text"):
        read_vist(story)


def test_cc3m_bad_header_always_raises(tmp_path):
    tsv = tmp_path / "h.tsv"
    tsv.write_text("text\tpath\nx\ty.jpg\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"h\.tsv, row 1: header"):
        read_cc3m(tsv)
    # another kind's file (an MMDialog conversation per line): its first line, shortened, and the likely cause
    tsv.write_text(json.dumps({"conversation": [{"turn": "word " * 10_000}]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"got '\{\"conversation.*… \(50\d{3} characters\)' \(a CC3M file is a "
                                        r"TSV: is data.kind right for this file\?\)") as e:
        read_cc3m(tsv)
    assert len(str(e.value)) < 400


# ---------------------------------------------------------------- VIST


def test_vist_train_samples(samples_dir):
    samples, report = read_vist(samples_dir / "VIST" / "val_cleaned.json")
    assert len(samples) == 13 and (report.records, report.skipped) == (1, 0)
    kinds = ["gen"] + ["gen", "multimodal", "understanding"] * 4
    steps = [0] + [k for k in range(1, 5) for _ in range(3)]
    assert [s.task_name for s in samples] == [f"40470_{k}-{kind}" for k, kind in zip(steps, kinds, strict=True)]
    images = [str(samples_dir / "VIST" / "val_images" / f"00000000{n}.jpg") for n in (5, 7, 3, 4, 0)]
    by_name = {s.task_name: s for s in samples}

    gen0 = by_name["40470_0-gen"]  # step 0: empty history, hence "###Human: Generate" with a space
    assert gen0 == Sample(
        S1 + f"###Human: Generate an image with the scene description: {CAPTIONS[0]} ###Assistant:",
        f"{VOKENS} ###",
        None,
        "40470_0-gen",
        (None,),
        images[0],
    )
    history2 = f"{CAPTIONS[0]}{SLOT}{CAPTIONS[1]}{SLOT}\n"
    mm2 = by_name["40470_2-multimodal"]
    assert mm2.source == S1 + f"###Human:{history2} Tell me the next scene with image. ###Assistant:"
    assert mm2.target == f"dad manned the grill . {VOKENS} ###"
    assert (mm2.input_images, mm2.output_image) == (tuple(images[:2]), images[2])
    und2 = by_name["40470_2-understanding"]
    assert und2.source == S1 + (
        f"###Human:{history2} Tell me the next scene description by this image: {SLOT} ###Assistant:"
    )
    assert und2.target == "dad manned the grill . ###"
    assert (und2.input_images, und2.output_image) == (tuple(images[:3]), None)
    gen4 = by_name["40470_4-gen"]
    assert gen4.source == S1 + (
        f"###Human:{''.join(c + SLOT for c in CAPTIONS[:4])}\n the scene description: {CAPTIONS[4]} ###Assistant:"
    )
    assert gen4.input_images == tuple(images[:4]) and gen4.output_image == images[4]
    assert all(s.caption is None for s in samples)
    _assert_slots_match_images(samples)


def test_vist_test_keeps_gen_with_voken_targets(samples_dir):
    samples, _ = read_vist(samples_dir / "VIST" / "val_cleaned.json", test=True)
    assert [s.task_name for s in samples] == [f"40470_{k}-gen" for k in range(5)]
    assert all(s.target == f"{VOKENS} ###" for s in samples)  # not replaced by captions (unlike CC3M)


def test_vist_seed_changes_template_choice_reproducibly(samples_dir):
    path = samples_dir / "VIST" / "val_cleaned.json"
    sources = {seed: [s.source for s in read_vist(path, seed=seed)[0]] for seed in range(6)}
    assert [s.source for s in read_vist(path, seed=3)[0]] == sources[3]
    assert len({tuple(v) for v in sources.values()}) > 1


def _vist_copy(samples_dir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    target = tmp_path / "VIST"
    shutil.copytree(samples_dir / "VIST", target)
    target.chmod(0o755)
    for p in target.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return target / "val_cleaned.json"


def test_vist_missing_image_cuts_story(samples_dir, tmp_path, caplog):
    cleaned = _vist_copy(samples_dir, tmp_path)
    (cleaned.parent / "val_images" / "000000003.jpg").unlink()  # step 2's image
    with caplog.at_level(logging.WARNING):
        samples, report = read_vist(cleaned)
    expected = ["40470_0-gen", "40470_1-gen", "40470_1-multimodal", "40470_1-understanding"]
    assert [s.task_name for s in samples] == expected
    assert [p.row for p in report.problems] == ["story 40470 step 2"]
    assert "image file not found" in report.problems[0].reason and "000000003.jpg" in caplog.text
    with pytest.raises(DataError, match=r"val_cleaned\.json, row story 40470 step 2: image file not found"):
        read_vist(cleaned, strict=True)


def test_vist_missing_keys_and_bad_json(samples_dir, tmp_path):
    cleaned = _vist_copy(samples_dir, tmp_path)
    stories = json.loads(cleaned.read_text())
    del stories["40470"][1]["caption"]
    stories["extra"] = "not a list"
    cleaned.write_text(json.dumps(stories))
    samples, report = read_vist(cleaned)
    assert [s.task_name for s in samples] == ["40470_0-gen"]
    assert [(p.row, p.reason[:22]) for p in report.problems] == [
        ("story 40470 step 1", "missing key(s) ['capti"),
        ("story extra", "expected a list of ste"),
    ]
    with pytest.raises(DataError, match="step 1: missing key"):
        read_vist(cleaned, strict=True)
    cleaned.write_text('{"40470": [')
    with pytest.raises(DataError, match=r"val_cleaned\.json, line 1: invalid JSON"):
        read_vist(cleaned)
    cleaned.write_text("{}")
    (cleaned.parent / "val_image_mapping.json").unlink()
    with pytest.raises(DataError, match=r"val_image_mapping\.json: file not found"):
        read_vist(cleaned)


# ---------------------------------------------------------------- MMDialog


def _words(text: str) -> int:
    return len(text.split())


def test_mmdialog_test_samples(samples_dir):
    folder = samples_dir / "MMDialog" / "test"
    samples, report = read_mmdialog(folder / "test_conversations.txt", test=True)
    assert [s.task_name for s in samples] == [f"0_{i}-mm" for i in range(1, 9)]
    assert [s.task_name for s in samples if s.output_image] == ["0_1-mm", "0_2-mm", "0_3-mm"]
    assert (report.records, report.samples, report.skipped) == (1, 8, 0)
    images = [str(folder / f"{m}.jpg") for m in MM_MEDIA]
    h0, a1 = f"###Human: {MM_TEXT[0]}{SLOT}", f"###Assistant: {MM_TEXT[1]}{SLOT}"
    assert samples[0] == Sample(
        f"{S_MM} {h0} ###Assistant:", f"{MM_TEXT[1]} {VOKENS} ###", None, "0_1-mm", (images[0],), images[1]
    )
    assert samples[1] == Sample(
        f"{S_MM} {h0} {a1} ###Human:", f"{MM_TEXT[2]} {VOKENS} ###", None, "0_2-mm", tuple(images[:2]), images[2]
    )
    assert samples[2].source.endswith(f"{MM_TEXT[2]}{SLOT} ###Assistant:") and samples[2].input_images == tuple(
        images[:3]
    )
    # after Assistant turn 3 the history restarts at Human turn 2: context = last exchange + current turn
    sample4 = samples[3]
    assert sample4.source.startswith(f"{S_MM} ###Human: {MM_TEXT[2]}{SLOT} ###Assistant: Thanks so much")
    assert sample4.source.endswith(f"{SLOT} ###Human:")
    assert sample4.input_images == tuple(images[2:4]) and sample4.output_image is None
    assert sample4.target == "Absolutely stunning!! :growing_heart: ###"
    assert samples[7].source == (
        f"{S_MM} ###Human: It certainly is!! It's a beauty :star: ###Assistant: Thanks Sam :sparkling_heart: this is "
        "definitely one I won't be hiding away ever again :raising_hands: ###Human:"
    )
    assert samples[7].input_images == (None,)
    _assert_slots_match_images(samples)


def test_mmdialog_training_length_rule(samples_dir, tiny_tokenizer_dir):  # noqa: F811
    path = samples_dir / "MMDialog" / "test" / "test_conversations.txt"
    with pytest.raises(ValueError, match="tokenizer_len_fn"):
        read_mmdialog(path)
    # turn 0 has exactly 50 whitespace words: not "more than 50", so a word count keeps all 8 samples
    assert _words(MM_TEXT[0]) == 50
    samples, report = read_mmdialog(path, _words)
    assert len(samples) == 8 and not report.stops
    # counted in subword tokens (~4 characters each for LLaMA) turn 0 is far over 50: nothing survives
    samples, report = read_mmdialog(path, MiniGPT5Tokenizer.from_pretrained(tiny_tokenizer_dir).count_tokens)
    assert samples == [] and report.stops == {"text_too_long": 1}


def _conversation(cid: int, turns: list[tuple[str, str | None]]) -> str:
    conv = [{"turn": [{"__TEXT__": t}] + ([{"__MEDIA__": m}] if m else [])} for t, m in turns]
    return json.dumps({"conversation_id": cid, "conversation": conv, "negative_candidate_media_keys": []})


def _bad_mmdialog(tmp_path: pathlib.Path) -> pathlib.Path:
    _tiny_jpg(tmp_path / "111.jpg")
    lines = [
        _conversation(1, [("hi", "111"), ("hello", None), ("bye", None)]),  # line 1: 2 samples
        "{not json",  # line 2
        json.dumps({"conversation": []}),  # line 3: no conversation_id
        _conversation(4, [("only one", None)]),  # line 4: < 2 turns
        _conversation(5, [("a", None), ("b", "222"), ("c", None)]),  # line 5: 222.jpg missing -> stop at turn 1
        _conversation(6, [("a", None), ("b", None), ("look.jpg", None), ("d", None)]),  # line 6: stop at turn 2
        _conversation(7, [("a", None), ("b", "3713630103994725971")]),  # line 7: error-list id
        "",
        json.dumps({"conversation_id": 8, "conversation": [{"turn": []}, {"turn": []}]}),  # line 9: empty turns
    ]
    path = tmp_path / "conv.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_mmdialog_bad_lines_and_stop_rules(tmp_path, caplog):
    path = _bad_mmdialog(tmp_path)
    with caplog.at_level(logging.WARNING):
        samples, report = read_mmdialog(path, test=True)
    assert [s.task_name for s in samples] == ["1_1-mm", "1_2-mm", "6_1-mm"]
    assert samples[0].source == f"{S_MM} ###Human: hi{SLOT} ###Assistant:"
    assert samples[0].input_images == (str(tmp_path / "111.jpg"),) and samples[0].output_image is None
    assert samples[2].input_images == (None,) and samples[2].target == "b ###"
    assert [(p.row, p.reason.split(":")[0]) for p in report.problems] == [
        (2, "invalid JSON"),
        (3, "missing key(s) ['conversation_id']"),
        (5, "turn 1"),
        (9, "conversation[0] has no 'turn' list starting with a '__TEXT__' entry"),
    ]
    assert report.stops == {
        "fewer_than_2_turns": 1,
        "missing_image": 1,
        "empty_or_jpg_text": 1,
        "error_list_image": 1,
    }
    assert report.records == 8 and "conv.txt, row 5: turn 1: image file not found" in caplog.text
    with pytest.raises(DataError, match=r"conv\.txt, row 2: invalid JSON"):
        read_mmdialog(path, test=True, strict=True)
