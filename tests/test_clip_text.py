"""CLIP text encoder: `last_hidden_state` parity with transformers' CLIPTextModel, both checkpoint layouts,
and the SD prompt tokenization path."""

import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from _fixtures_sd import perturb_norms, write_clip_tokenizer

from mg5jax.convert import keymap as km
from mg5jax.convert.clip import CLIP_TEXT_HUB_KEYMAP, CLIP_TEXT_KEYMAP
from mg5jax.convert.sources import CheckpointError, write_safetensors
from mg5jax.models.clip_text import CLIPTextConfig, CLIPTextModel, encode_prompts

TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, layer_norm_eps=1e-5, projection_dim=32, bos_token_id=0, eos_token_id=2,
            pad_token_id=1)  # fmt: skip


# a second layout: odd width and head size, three layers, another LayerNorm eps
ODD = dict(TINY, hidden_size=36, intermediate_size=100, num_hidden_layers=3, num_attention_heads=3,
           layer_norm_eps=1e-6, projection_dim=36)
CONFIGS = {"gelu": dict(TINY, hidden_act="gelu"), "quick_gelu": dict(ODD, hidden_act="quick_gelu")}


def _torch_text_encoder(tmp_path_factory, act: str, seed: int):
    import torch
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFModel

    torch.manual_seed(seed)
    model = perturb_norms(HFModel(HFConfig(**CONFIGS[act])), seed).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp(f"clip_text_{act}")
    model.save_pretrained(str(directory), safe_serialization=True)
    return model, directory


@pytest.fixture(scope="module", params=["gelu", "quick_gelu"])
def text_pair(request, tmp_path_factory):
    model, directory = _torch_text_encoder(tmp_path_factory, request.param, seed=3)
    return model, directory, CLIPTextModel.from_pretrained(directory)


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path_factory.mktemp("clip_tok"))))


def _torch_hidden(model, ids, mask=None):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(),
                    attention_mask=None if mask is None else torch.from_numpy(mask).long())
    return out.last_hidden_state.numpy()


def test_last_hidden_state_parity(text_pair, clip_tokenizer):
    torch_model, _, model = text_pair
    assert model.config.hidden_act == torch_model.config.hidden_act
    ids, mask = encode_prompts(clip_tokenizer, ["a photo of a cat", "two dogs running across a green field"])
    chex.assert_shape((ids, mask), (2, 77))
    n = mask.sum(1)
    assert (ids[:, 0] == 998).all() and (ids[[0, 1], n - 1] == 999).all() and (ids[0, n[0]:] == 0).all() and n[0] < n[1]
    for attention_mask in (None, mask):
        ours = np.asarray(model(jnp.asarray(ids), None if attention_mask is None else jnp.asarray(attention_mask)))
        chex.assert_shape(ours, (2, 77, torch_model.config.hidden_size))
        ref = _torch_hidden(torch_model, ids, attention_mask)
        err = np.abs(ours - ref).max()
        print(f"{model.config.hidden_act} mask={attention_mask is not None}: max-abs {err:.2e}")
        assert err <= 1e-5
    # the mask matters (pad queries no longer see pad keys), so the masked test is not vacuous
    masked = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(masked - np.asarray(model(jnp.asarray(ids))))[0, n[0]:].max() > 1e-3


def test_hub_layout_and_strict_errors(text_pair, tmp_path):
    torch_model, directory, model = text_pair
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    hub = {"text_model." + k: v for k, v in sd.items()}
    hub["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    write_safetensors(tmp_path / "model.safetensors", hub)
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    again = CLIPTextModel.from_pretrained(tmp_path)
    ids = np.arange(1, 78, dtype=np.int32)[None] % 1000
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids))), np.asarray(model(jnp.asarray(ids))))
    exported = dict(km.export_params(nnx.state(model), CLIP_TEXT_HUB_KEYMAP))
    assert exported.keys() == {k for k in hub if not k.endswith("position_ids")}
    assert len(CLIP_TEXT_KEYMAP.rules) == len(CLIP_TEXT_HUB_KEYMAP.rules)
    del hub["text_model.final_layer_norm.bias"]
    write_safetensors(tmp_path / "model.safetensors", hub)
    with pytest.raises(CheckpointError, match=r"missing key 'text_model.final_layer_norm.bias'"):
        CLIPTextModel.from_pretrained(tmp_path)


def test_config_rejects_unknown_activation():
    with pytest.raises(ValueError, match="hidden_act='relu6'"):
        CLIPTextConfig.from_hf(dict(TINY, hidden_act="relu6"))
    cfg = CLIPTextConfig.from_hf(json.loads(json.dumps(dict(TINY, hidden_act="gelu", model_type="clip_text_model"))))
    assert cfg.num_hidden_layers == 2 and cfg.head_dim == 8
