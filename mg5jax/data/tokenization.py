"""LLaMA tokenization of MiniGPT-5 prompts, reproducing the original's tokenizer behaviour.

The original tokenizes with the transformers 4.31 *slow* ``LlamaTokenizer`` (``legacy=True``). That
tokenizer splits the text on special tokens, strips the whitespace immediately left and right of each
added special token (``[IMGk]``, ``<ImageHere>``), and encodes every remaining chunk with SentencePiece,
each chunk getting its own dummy prefix "▁". Newer transformers versions no longer strip, so the ids
are rebuilt here from the SentencePiece model directly, independent of the installed transformers.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence

import sentencepiece as spm
from transformers import PreTrainedTokenizerBase

# The class itself, not AutoTokenizer: transformers' auto classes import torch (about 230 MiB and 1 s)
# whenever it is installed, and a JAX process has no use for it.
from transformers.models.llama.tokenization_llama import LlamaTokenizer

from mg5jax.convert.sources import CheckpointError, check_not_lfs_pointer, error_summary

log = logging.getLogger(__name__)

NUM_VOKENS = 8
IMAGE_PLACEHOLDER = "<ImageHere>"
IGNORE_INDEX = -100


def voken_tokens(num_vokens: int = NUM_VOKENS) -> tuple[str, ...]:
    """The generative voken strings ``[IMG0]`` … ``[IMG{n-1}]``."""
    return tuple(f"[IMG{i}]" for i in range(num_vokens))


VOKEN_TOKENS = voken_tokens()
ALL_VOKENS_STR = "".join(VOKEN_TOKENS)  # the 8 vokens concatenated with no spaces, as in every target


@dataclasses.dataclass(frozen=True)
class VokenIds:
    """Ids of the tokens MiniGPT-5 relies on, after the vokens and the image placeholder were added."""

    voken_ids: tuple[int, ...]  # [IMG0] … [IMG{n-1}]
    image_placeholder_id: int  # <ImageHere>
    bos_id: int
    eos_id: int
    pad_id: int  # the original sets pad_token = eos_token
    vocab_size: int  # len(tokenizer) after adding; the LLM embedding is resized to this


def add_voken_tokens(tokenizer: PreTrainedTokenizerBase, num_vokens: int = NUM_VOKENS) -> VokenIds:
    """Add ``[IMG0]…[IMG{n-1}]`` and ``<ImageHere>`` as additional special tokens, in that order.

    Also sets ``pad_token = eos_token`` as the original does. With a 32000-entry LLaMA tokenizer the
    new ids are [IMG0]=32000 … [IMG7]=32007 and <ImageHere>=32008. Tokens already present keep their ids.
    """
    vokens = list(voken_tokens(num_vokens))
    tokenizer.add_special_tokens({"additional_special_tokens": [*vokens, IMAGE_PLACEHOLDER]})
    if tokenizer.eos_token is None or tokenizer.bos_token is None:
        name = type(tokenizer).__name__
        raise ValueError(f"tokenizer {name} defines no bos/eos token; a LLaMA tokenizer is expected")
    tokenizer.pad_token = tokenizer.eos_token
    voken_ids = tuple(int(i) for i in tokenizer.convert_tokens_to_ids(vokens))
    return VokenIds(
        voken_ids=voken_ids,
        image_placeholder_id=int(tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)),
        bos_id=int(tokenizer.bos_token_id),
        eos_id=int(tokenizer.eos_token_id),
        pad_id=int(tokenizer.pad_token_id),
        vocab_size=len(tokenizer),
    )


def encode(
    encode_chunk: Callable[[str], Sequence[int]],
    text: str,
    special_tokens: Mapping[str, int],
    unstripped_tokens: Mapping[str, int] | None = None,
) -> list[int]:
    """Token ids of ``text`` exactly as the transformers 4.31 slow legacy LLaMA tokenizer gives them.

    ``special_tokens`` (the vokens and ``<ImageHere>``) split the text and swallow the whitespace on
    both sides; ``unstripped_tokens`` (``<s>``, ``</s>``, ``<unk>``: AddedTokens without lstrip/rstrip
    in LLaMA tokenizers) split it without stripping. Each non-empty remaining chunk goes through
    ``encode_chunk``, which must add SentencePiece's dummy prefix "▁" (``SentencePieceProcessor.encode``
    does). No BOS/EOS is added.
    """
    unstripped = dict(unstripped_tokens or {})
    all_tokens = {**unstripped, **special_tokens}
    if not all_tokens:
        return list(encode_chunk(text)) if text else []
    pattern = "|".join(re.escape(t) for t in sorted(all_tokens, key=len, reverse=True))
    parts = re.split(f"({pattern})", text)  # odd positions hold the matched tokens
    for k in range(1, len(parts), 2):
        if parts[k] in special_tokens:
            parts[k - 1] = parts[k - 1].rstrip()
            parts[k + 1] = parts[k + 1].lstrip()
    ids: list[int] = []
    for k, part in enumerate(parts):
        if k % 2:
            ids.append(all_tokens[part])
        elif part:
            ids.extend(int(i) for i in encode_chunk(part))
    return ids


@dataclasses.dataclass(frozen=True)
class LabelledIds:
    """One tokenized training example: source and target concatenated, with the original's labels. All [T]."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX (-100) where no loss is taken
    attention_mask: tuple[int, ...]


def build_labels(
    source_ids: Sequence[int],
    target_ids: Sequence[int],
    voken_ids: Sequence[int],
    fix_img7_mask: bool = False,
) -> LabelledIds:
    """Concatenate source and target ids and build the language-model labels (REFERENCE §6.1).

    labels = [-100] * len(source) + target. Original behaviour (``fix_img7_mask=False``): at the
    *first* ``[IMG0]`` (position i) set labels[i+1 : i+n-1] = -100, i.e. mask [IMG1]…[IMG6] only, so
    [IMG0] *and* [IMG7] (an off-by-one in the original) stay supervised. ``fix_img7_mask=True`` masks
    [IMG1]…[IMG{n-1}] after *every* [IMG0], so only [IMG0] of each voken group is a text target.
    The attention mask is all ones (padding is the batcher's job).
    """
    labels = [IGNORE_INDEX] * len(source_ids) + [int(t) for t in target_ids]
    first_voken, n = voken_ids[0], len(voken_ids)
    starts = [i for i, t in enumerate(labels) if t == first_voken]
    if fix_img7_mask:
        for i in starts:
            labels[i + 1 : i + n] = [IGNORE_INDEX] * len(labels[i + 1 : i + n])
    elif starts:
        i = starts[0]
        labels[i + 1 : i + n - 1] = [IGNORE_INDEX] * len(labels[i + 1 : i + n - 1])
    input_ids = tuple(int(t) for t in source_ids) + tuple(int(t) for t in target_ids)
    return LabelledIds(input_ids=input_ids, labels=tuple(labels), attention_mask=(1,) * len(input_ids))


def load_hf_tokenizer(tokenizer_class, directory: str | pathlib.Path, what: str):
    """`tokenizer_class.from_pretrained(directory)`, its files checked for git-lfs pointers first and its
    errors naming `directory` (tokenizers and sentencepiece raise many kinds, some naming no file)."""
    directory = pathlib.Path(directory)
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            if path.is_file() and path.suffix in (".model", ".json", ".txt"):
                check_not_lfs_pointer(path)
    try:
        return tokenizer_class.from_pretrained(str(directory))
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise CheckpointError(f"{directory}: cannot load the {what} tokenizer ({error_summary(e)})") from e


class MiniGPT5Tokenizer:
    """The LLM tokenizer as MiniGPT-5 uses it: original-exact ``encode``, HF ``decode``, the special ids.

    Encoding uses the directory's SentencePiece ``tokenizer.model`` when present, otherwise the HF
    tokenizer chunk by chunk (``add_special_tokens=False``); either way the special-token splitting and
    whitespace stripping of the original are applied here.
    """

    def __init__(
        self,
        hf_tokenizer: PreTrainedTokenizerBase,
        ids: VokenIds,
        sp_model: spm.SentencePieceProcessor | None = None,
    ):
        self.hf_tokenizer = hf_tokenizer
        self.ids = ids
        self.sp_model = sp_model
        vokens = voken_tokens(len(ids.voken_ids))
        self._special = {**dict(zip(vokens, ids.voken_ids, strict=True)), IMAGE_PLACEHOLDER: ids.image_placeholder_id}
        self._unstripped = {
            tok: int(hf_tokenizer.convert_tokens_to_ids(tok))
            for tok in (hf_tokenizer.bos_token, hf_tokenizer.eos_token, hf_tokenizer.unk_token)
            if tok is not None
        }

    @classmethod
    def from_pretrained(cls, llm_dir: str | pathlib.Path, num_vokens: int = NUM_VOKENS) -> MiniGPT5Tokenizer:
        """Load the LLaMA tokenizer of ``llm_dir`` and add the vokens and ``<ImageHere>``."""
        llm_dir = pathlib.Path(llm_dir)
        if llm_dir.is_dir() and not any((llm_dir / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
            # transformers would build an all-defaults tokenizer of a dozen tokens, and the vocabulary with it
            raise CheckpointError(f"{llm_dir}: no tokenizer.model or tokenizer.json: put the LLM's tokenizer files "
                                  "beside its weights (model.llm_path)")
        hf_tokenizer = load_hf_tokenizer(LlamaTokenizer, llm_dir, "LLaMA")
        ids = add_voken_tokens(hf_tokenizer, num_vokens)
        spm_file = llm_dir / "tokenizer.model"
        sp_model = None
        if spm_file.is_file():
            try:
                sp_model = spm.SentencePieceProcessor(model_file=str(spm_file))
            except (OSError, RuntimeError) as e:
                raise CheckpointError(f"{spm_file}: not a readable SentencePiece model ({e})") from e
        else:
            log.warning("%s has no tokenizer.model: encoding with tokenizer.json, whose ids differ from the original's "
                        "SentencePiece ids where a text begins with whitespace", llm_dir)
        return cls(hf_tokenizer, ids, sp_model)

    def _encode_chunk(self, chunk: str) -> list[int]:
        if self.sp_model is not None:
            return self.sp_model.encode(chunk)
        return list(self.hf_tokenizer(chunk, add_special_tokens=False)["input_ids"])

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` as the original produces them (no BOS/EOS)."""
        return encode(self._encode_chunk, text, self._special, self._unstripped)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` through the HF tokenizer (the original decodes with skip_special_tokens=False)."""
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def count_tokens(self, text: str) -> int:
        """Number of ids of ``text`` (no BOS); a ``tokenizer_len_fn`` for the MMDialog 50-token rule."""
        return len(self.encode(text))

    def encode_example(self, source: str, target: str, fix_img7_mask: bool = False) -> LabelledIds:
        """Tokenize a source/target pair and build its labels (see ``build_labels``)."""
        return build_labels(self.encode(source), self.encode(target), self.ids.voken_ids, fix_img7_mask)

    def __len__(self) -> int:
        return self.ids.vocab_size
