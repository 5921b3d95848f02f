"""A tiny LLaMA-style SentencePiece tokenizer directory, trained offline for the data tests.

Same recipe as a real LLaMA ``tokenizer.model`` (BPE, byte fallback, dummy prefix, identity
normalization, whitespace kept, unk/bos/eos = 0/1/2), trained in well under a second on
MiniGPT-5-like text so that "▁###" is a single piece as in LLaMA (id 835 there).
"""

import pathlib
import random
import shutil

import pytest
import sentencepiece as spm

_SENTENCES = """my sister arrived early to help me with the family bar bq .
every one else arrived soon after .
dad manned the grill .
there was so much food and it was all delicious .
we ended the day shooting off some fireworks .
burning candle on the background of the aquarium with small fish .
shot of the full tree .
a caption of a photo of the city skyline at night .
Give the following images in <Img>ImageContent</Img> format.
You will be able to see the images once I provide it to you. Please understanding images and generate story.
###Human: Generate an image with the scene description: ###Assistant:
Tell me the next scene with image. What should happen then?""".split("\n")

VOCAB_SIZE = 500


def _corpus(seed: int = 0) -> list[str]:
    """A few hundred MiniGPT-5-style prompt lines, with "###" frequent enough for "▁###" to be learned."""
    rng = random.Random(seed)
    words = " ".join(_SENTENCES).split()
    lines = []
    for _ in range(400):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        lines.append(f"###Human: {body} ###Assistant: {rng.choice(words)} ###")
    return lines + _SENTENCES * 5


def build_tiny_llama_tokenizer_dir(directory: pathlib.Path) -> pathlib.Path:
    """Train the SentencePiece model and save it as ``tokenizer.model`` plus the HF files in ``directory``."""
    from transformers import LlamaTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(_corpus()), encoding="utf-8")
    prefix = directory / "spm"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=VOCAB_SIZE, model_type="bpe", byte_fallback=True,
        split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2,
    )  # fmt: skip
    shutil.copy(f"{prefix}.model", directory / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(str(directory), add_bos_token=True, add_eos_token=False, legacy=False)
    tokenizer.save_pretrained(str(directory))
    for leftover in (corpus, pathlib.Path(f"{prefix}.model"), pathlib.Path(f"{prefix}.vocab")):
        leftover.unlink()
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Directory with ``tokenizer.model``, ``tokenizer.json`` and ``tokenizer_config.json`` (vocab 500)."""
    return build_tiny_llama_tokenizer_dir(tmp_path_factory.mktemp("tiny_llama_tokenizer"))
