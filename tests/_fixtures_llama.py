"""Tiny random transformers `LlamaForCausalLM` references saved in the hub layout (built offline).

Two shapes: `llama_gqa` (grouped-query attention, untied lm_head) and `llama_odd` (3 heads of 32, 3 layers,
widths that are no powers of two: 96 / 200 / vocab 150, rope_theta 5e5, tied embeddings). RMSNorm weights are random (not torch's ones) and the
init scale is large enough for attention to be far from uniform, so layout or RoPE mistakes show.
Artifacts are memoised per session so that every test module importing these fixtures shares them.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil

import jax.numpy as jnp
import pytest

GQA = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False)
ODD = dict(vocab_size=150, hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=3,
           num_key_value_heads=3, rope_theta=500000.0, tie_word_embeddings=True)


@dataclasses.dataclass
class TinyLlama:
    """A saved reference: its directory, the torch model (eval mode) and our fp32 load of it."""

    path: pathlib.Path
    torch_model: object
    model: object


_CACHE: dict[str, object] = {}


def _memo(name, build):
    if name not in _CACHE:
        _CACHE[name] = build()
    return _CACHE[name]


def build_torch_llama(shape: dict, seed: int):
    """A random transformers LlamaForCausalLM (fp32, eval mode) with random norm weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**shape, max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.15,
                      bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _saved(tmp_path_factory, name: str, shape: dict, seed: int) -> TinyLlama:
    from mg5jax.models.llama import LlamaForCausalLM

    def build():
        torch_model = build_torch_llama(shape, seed)
        path = tmp_path_factory.mktemp(name)
        torch_model.save_pretrained(path)
        return TinyLlama(path, torch_model, LlamaForCausalLM.from_pretrained(path, param_dtype=jnp.float32))

    return _memo(name, build)


@pytest.fixture(scope="session")
def llama_gqa(tmp_path_factory) -> TinyLlama:
    return _saved(tmp_path_factory, "llama_gqa", GQA, seed=0)


@pytest.fixture(scope="session")
def llama_odd(tmp_path_factory) -> TinyLlama:
    return _saved(tmp_path_factory, "llama_odd", ODD, seed=1)


@pytest.fixture(scope="session")
def llama_gqa_sharded_dir(tmp_path_factory, llama_gqa) -> pathlib.Path:
    """The GQA reference saved by transformers as several safetensors shards plus an index."""

    def build():
        path = tmp_path_factory.mktemp("llama_gqa_sharded")
        llama_gqa.torch_model.save_pretrained(path, max_shard_size="40KB")
        return path

    return _memo("llama_gqa_sharded", build)


@pytest.fixture(scope="session")
def llama_gqa_bin_dir(tmp_path_factory, llama_gqa) -> pathlib.Path:
    """The GQA reference as config.json + a torch-pickled pytorch_model.bin."""
    import torch

    def build():
        path = tmp_path_factory.mktemp("llama_gqa_bin")
        shutil.copy(llama_gqa.path / "config.json", path / "config.json")
        torch.save(llama_gqa.torch_model.state_dict(), path / "pytorch_model.bin")
        return path

    return _memo("llama_gqa_bin", build)
