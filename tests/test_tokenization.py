"""Tokenization reproduces the original's transformers-4.31 slow LLaMA behaviour; labels mask as the original."""

import pathlib
import shutil

import pytest
import sentencepiece as spm
from fixtures_tokenizer import VOCAB_SIZE, tiny_tokenizer_dir  # noqa: F401  (session fixture)
from transformers import AutoTokenizer

from mg5jax.convert.sources import CheckpointError
from mg5jax.data.tokenization import (
    ALL_VOKENS_STR,
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    VOKEN_TOKENS,
    MiniGPT5Tokenizer,
    add_voken_tokens,
    build_labels,
    encode,
    voken_tokens,
)

S1 = (
    "Give the following images in <Img>ImageContent</Img> format. You will be able to see the images once I "
    "provide it to you. Please understanding images and generate story."
)
VOKEN_IDS = tuple(range(VOCAB_SIZE, VOCAB_SIZE + 8))
PLACEHOLDER_ID = VOCAB_SIZE + 8


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: pathlib.Path) -> MiniGPT5Tokenizer:  # noqa: F811
    return MiniGPT5Tokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def sp(tiny_tokenizer_dir: pathlib.Path) -> spm.SentencePieceProcessor:  # noqa: F811
    return spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))


def test_voken_constants():
    assert VOKEN_TOKENS == tuple(f"[IMG{i}]" for i in range(8))
    assert voken_tokens(3) == ("[IMG0]", "[IMG1]", "[IMG2]")
    assert ALL_VOKENS_STR == "[IMG0][IMG1][IMG2][IMG3][IMG4][IMG5][IMG6][IMG7]"
    assert IMAGE_PLACEHOLDER == "<ImageHere>"


def test_add_voken_tokens_ids(tiny_tokenizer_dir):  # noqa: F811
    hf = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert len(hf) == VOCAB_SIZE
    ids = add_voken_tokens(hf)
    assert ids.voken_ids == VOKEN_IDS  # the original: [IMG0]=32000 … [IMG7]=32007 on a 32000 vocab
    assert ids.image_placeholder_id == PLACEHOLDER_ID
    assert (ids.bos_id, ids.eos_id, ids.pad_id) == (1, 2, 2)  # pad = eos as in the original
    assert ids.vocab_size == len(hf) == VOCAB_SIZE + 9
    assert add_voken_tokens(hf) == ids  # adding again changes nothing


def test_hash_hash_hash_is_one_piece(tok, sp):
    assert sp.encode("###", out_type=str) == ["▁###"]
    ids = tok.encode(f"{ALL_VOKENS_STR} ###")
    assert ids == [*VOKEN_IDS, sp.piece_to_id("▁###")]


def test_whitespace_around_special_tokens_is_stripped(tok, sp):
    assert tok.encode("caption [IMG0]") == [*sp.encode("caption"), VOKEN_IDS[0]]
    assert tok.encode("a  \n [IMG0] \t b") == [*sp.encode("a"), VOKEN_IDS[0], *sp.encode("b")]
    assert tok.encode(" [IMG0] [IMG1] ") == list(VOKEN_IDS[:2])  # whitespace-only chunks vanish
    assert tok.encode("x <ImageHere> y") == [*sp.encode("x"), PLACEHOLDER_ID, *sp.encode("y")]
    # the installed transformers keeps a "▁" before [IMG0]: the reason encode() exists
    assert tok.hf_tokenizer("caption [IMG0]", add_special_tokens=False)["input_ids"] != tok.encode("caption [IMG0]")


def test_eos_text_splits_without_stripping(tok, sp):
    assert tok.encode("a </s> b") == [*sp.encode("a "), 2, *sp.encode(" b")]


def test_source_target_ids_match_hand_built(tok, sp):
    prompt = "my sister arrived early to help me with the family bar bq .<Img><ImageHere></Img>\n"
    source = S1 + f"###Human:{prompt} What happen in the next scene image: <Img><ImageHere></Img> ###Assistant:"
    target = f"every one else arrived soon after . {ALL_VOKENS_STR} ###"
    expected_source = [
        *sp.encode(S1 + "###Human:my sister arrived early to help me with the family bar bq .<Img>"),
        PLACEHOLDER_ID,
        *sp.encode("</Img>\n What happen in the next scene image: <Img>"),
        PLACEHOLDER_ID,
        *sp.encode("</Img> ###Assistant:"),
    ]
    expected_target = [*sp.encode("every one else arrived soon after ."), *VOKEN_IDS, *sp.encode("###")]
    assert tok.encode(source) == expected_source
    assert tok.encode(target) == expected_target
    example = tok.encode_example(source, target)
    assert example.input_ids == tuple(expected_source + expected_target)
    assert example.attention_mask == (1,) * len(example.input_ids)


def test_hf_fallback_without_spm_model(tiny_tokenizer_dir, tok, tmp_path, caplog):  # noqa: F811
    no_spm = tmp_path / "no_spm"
    shutil.copytree(tiny_tokenizer_dir, no_spm)
    (no_spm / "tokenizer.model").unlink()
    fallback = MiniGPT5Tokenizer.from_pretrained(no_spm)
    assert fallback.sp_model is None
    # not silent: where a text begins with whitespace, tokenizer.json gives other ids than SentencePiece
    assert "has no tokenizer.model: encoding with tokenizer.json" in caplog.text
    for text in (f"caption  {ALL_VOKENS_STR} ###", S1 + "###Human:x.<Img><ImageHere></Img>\n Tell me ###Assistant:"):
        assert fallback.encode(text) == tok.encode(text)
    # without either file transformers would make a dozen-token tokenizer (and the LLM's vocabulary with it)
    (no_spm / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"no_spm: no tokenizer.model or tokenizer.json"):
        MiniGPT5Tokenizer.from_pretrained(no_spm)


def test_decode(tok):
    ids = tok.encode(f"dad manned the grill . {ALL_VOKENS_STR} ###")
    assert tok.decode(ids).startswith("dad manned the grill .")
    assert ALL_VOKENS_STR in tok.decode(ids)
    assert len(tok) == VOCAB_SIZE + 9


def test_encode_function_with_plain_chunk_encoder():
    chunk = lambda s: [len(s)]  # noqa: E731
    assert encode(chunk, "ab [X] cde", {"[X]": 7}) == [2, 7, 3]
    assert encode(chunk, "ab [X] cde", {}, {"[X]": 7}) == [3, 7, 4]
    assert encode(chunk, "", {"[X]": 7}) == []


SRC = [11, 12, 13]
VOK = list(VOKEN_IDS)


def test_labels_original_masks_img1_to_img6_of_first_group():
    target = [21, 22, *VOK, 23]
    out = build_labels(SRC, target, VOKEN_IDS)
    assert out.input_ids == tuple(SRC + target)
    assert out.labels == (*[IGNORE_INDEX] * 3, 21, 22, VOK[0], *[IGNORE_INDEX] * 6, VOK[7], 23)
    assert out.attention_mask == (1,) * len(target + SRC)


def test_labels_original_touches_only_the_first_group():
    target = [*VOK, 23, *VOK]
    labels = build_labels(SRC, target, VOKEN_IDS).labels
    assert labels[3:] == (VOK[0], *[IGNORE_INDEX] * 6, VOK[7], 23, *VOK)


def test_labels_fixed_masks_img1_to_img7_of_every_group():
    target = [21, *VOK, 23, *VOK]
    labels = build_labels(SRC, target, VOKEN_IDS, fix_img7_mask=True).labels
    group = (VOK[0], *[IGNORE_INDEX] * 7)
    assert labels == (*[IGNORE_INDEX] * 3, 21, *group, 23, *group)


def test_labels_without_vokens_and_truncated_group():
    assert build_labels(SRC, [5, 6], VOKEN_IDS).labels == (IGNORE_INDEX,) * 3 + (5, 6)
    assert build_labels([], [VOK[0], VOK[1]], VOKEN_IDS).labels == (VOK[0], IGNORE_INDEX)
    assert build_labels([], [VOK[0], VOK[1]], VOKEN_IDS, fix_img7_mask=True).labels == (VOK[0], IGNORE_INDEX)
