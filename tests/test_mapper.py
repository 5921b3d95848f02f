"""VokenMapper: parity with torch nn.Transformer(norm_first) + the fc MLP under the original's key
names, key errors, export round trip, and torch-like init."""

import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mg5jax.convert import keymap as km
from mg5jax.convert.mapper import export_mapper_params, mapper_keymap
from mg5jax.convert.sources import CheckpointError, DictSource
from mg5jax.models.mapper import MapperConfig, VokenMapper

SMALL = MapperConfig(llm_dim=48, num_vokens=8, hidden=32, num_queries=7, enc_layers=2, dec_layers=2,
                     heads=4, ff=64)
ODD = MapperConfig(llm_dim=24, num_vokens=3, hidden=12, num_queries=5, enc_layers=1, dec_layers=3,
                   heads=2, ff=40, layer_norm_eps=1e-6)


class TorchMapper(torch.nn.Module):
    """The original's mapper, with its attribute names (so state_dict keys match its checkpoints)."""

    def __init__(self, cfg: MapperConfig):
        super().__init__()
        self.fc = torch.nn.Sequential(torch.nn.Linear(cfg.llm_dim, cfg.hidden), torch.nn.GELU(),
                                      torch.nn.Linear(cfg.hidden, cfg.hidden))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # enable_nested_tensor is off with norm_first
            self.llm_to_t2i_mapping = torch.nn.Transformer(
                d_model=cfg.hidden, nhead=cfg.heads, num_encoder_layers=cfg.enc_layers,
                num_decoder_layers=cfg.dec_layers, dim_feedforward=cfg.ff, dropout=0.0,
                layer_norm_eps=cfg.layer_norm_eps, batch_first=True, norm_first=True)
        self.t2i_decoder_prompt = torch.nn.Parameter(torch.randn(1, cfg.num_queries, cfg.hidden))

    def forward(self, voken_hidden_states):
        src = self.fc(voken_hidden_states)
        tgt = self.t2i_decoder_prompt.repeat(voken_hidden_states.shape[0], 1, 1)
        return self.llm_to_t2i_mapping(src, tgt)


def torch_reference(cfg: MapperConfig, seed: int) -> tuple[TorchMapper, dict[str, np.ndarray]]:
    """A torch mapper whose zero biases and unit norms are perturbed, and its state dict in numpy."""
    torch.manual_seed(seed)
    ref = TorchMapper(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return ref, {k: v.numpy().copy() for k, v in ref.state_dict().items()}


def load_jax(cfg: MapperConfig, state_dict: dict[str, np.ndarray]) -> VokenMapper:
    gd, abstract = km.abstract_model(lambda: VokenMapper(cfg, rngs=nnx.Rngs(0)))
    return km.materialize(gd, km.load_params(abstract, DictSource(state_dict, "mapper.ckpt"), mapper_keymap()))


@nnx.jit
def run(mapper, x):
    return mapper(x)


@pytest.fixture(scope="module", params=[SMALL, ODD], ids=["small", "odd"])
def pair(request):
    cfg = request.param
    ref, sd = torch_reference(cfg, seed=0)
    return cfg, ref, sd, load_jax(cfg, sd)


def test_parity_with_torch(pair):
    cfg, ref, _, mapper = pair
    x = np.random.default_rng(1).normal(size=(3, cfg.num_vokens, cfg.llm_dim)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    got = run(mapper, jnp.asarray(x))
    chex.assert_shape(got, (3, cfg.num_queries, cfg.hidden))
    chex.assert_type(got, jnp.float32)
    err = float(np.max(np.abs(np.asarray(got) - want)))
    print(f"mapper parity {cfg.heads}h {cfg.enc_layers}+{cfg.dec_layers}: max-abs {err:.2e}")
    assert err <= 1e-5


def test_export_round_trip(pair):
    _, _, sd, mapper = pair
    out = export_mapper_params(nnx.state(mapper))
    assert out.keys() == sd.keys()
    for k, v in sd.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype, k
        np.testing.assert_array_equal(out[k], v, err_msg=k)


def test_missing_and_unexpected_keys_are_named():
    cfg = SMALL
    _, sd = torch_reference(cfg, seed=0)
    _, abstract = km.abstract_model(lambda: VokenMapper(cfg, rngs=nnx.Rngs(0)))
    stage2 = {k: v for k, v in sd.items() if k.startswith("llm_to_t2i_mapping.")}  # no fc, no queries
    with pytest.raises(CheckpointError, match=r"missing key 'fc.0.bias' in stage2.ckpt"):
        km.load_params(abstract, DictSource(stage2, "stage2.ckpt"), mapper_keymap())
    extra = dict(sd, **{"llm_to_t2i_mapping.encoder.layers.5.linear1.bias": sd["fc.0.bias"]})
    with pytest.raises(CheckpointError, match=r"unexpected key 'llm_to_t2i_mapping.encoder.layers.5.linear1.bias'"):
        km.load_params(abstract, DictSource(extra, "big.ckpt"), mapper_keymap())


def test_torch_like_init_and_config():
    cfg = SMALL
    mapper = nnx.jit(lambda: VokenMapper(cfg, rngs=nnx.Rngs(3)))()
    attn = mapper.encoder.layers[0].self_attn
    fused_bound = math.sqrt(6 / (cfg.hidden + 3 * cfg.hidden))
    q = np.asarray(attn.q_proj.kernel[...])
    assert np.abs(q).max() <= fused_bound and np.abs(q).max() > 0.8 * fused_bound
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
        np.testing.assert_array_equal(np.asarray(lin.bias[...]), 0.0)
    lin1 = mapper.decoder.layers[1].linear1
    assert np.abs(np.asarray(lin1.kernel[...])).max() <= math.sqrt(6 / (cfg.hidden + cfg.ff))
    assert 0 < np.abs(np.asarray(lin1.bias[...])).max() <= 1 / math.sqrt(cfg.hidden)
    fc = np.asarray(mapper.fc_in.kernel[...])
    assert np.abs(fc).max() <= 1 / math.sqrt(cfg.llm_dim)
    np.testing.assert_array_equal(np.asarray(mapper.decoder.norm.scale[...]), 1.0)
    queries = np.asarray(mapper.decoder_queries[...])
    assert queries.shape == (cfg.num_queries, cfg.hidden) and 0.8 < queries.std() < 1.2
    assert mapper.decoder_queries.get_metadata()["out_sharding"] == ("queries", "embed")
    full = nnx.state(nnx.eval_shape(lambda: VokenMapper(MapperConfig(), rngs=nnx.Rngs(0))))
    counts = {part: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(full[part]))
              for part in ("fc_in", "fc_out", "encoder", "decoder", "decoder_queries")}
    assert counts["fc_in"] + counts["fc_out"] == 5_244_928  # REFERENCE §2 parameter counts
    assert counts["encoder"] + counts["decoder"] == 117_575_680
    assert counts["decoder_queries"] == 78_848
    with pytest.raises(ValueError, match="hidden=30 is not divisible by heads=4"):
        MapperConfig(hidden=30, heads=4)
    with pytest.raises(ValueError, match="unknown key 'd_model'"):
        MapperConfig.from_dict({"d_model": 8})
