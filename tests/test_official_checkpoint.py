"""Official Lightning checkpoints (REFERENCE §8.2): state dicts written here with the original's key
names import into `MiniGPT5` and give the PyTorch composition's logits and conditioning; export →
import is lossless; unknown keys are errors naming the key."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _fixtures_llama import build_torch_llama
from flax import nnx
from test_mapper import TorchMapper

from mg5jax.convert import keymap as km
from mg5jax.convert.minigpt5 import export_official, import_official, load_official
from mg5jax.convert.sources import CheckpointError
from mg5jax.diffusion import schedulers
from mg5jax.models import lora
from mg5jax.models.llama import LlamaForCausalLM, prepare_for_decoding
from mg5jax.models.mapper import MapperConfig, VokenMapper
from mg5jax.models.minigpt5 import MiniGPT5, MiniGPT5Config

D = 48
LLAMA = dict(vocab_size=109, hidden_size=D, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False)
MAPPER = MapperConfig(llm_dim=D, num_vokens=8, hidden=32, num_queries=77, enc_layers=2, dec_layers=2, heads=4, ff=64)
PNDM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _perturbed_mapper(seed):
    torch.manual_seed(seed)
    m = TorchMapper(MAPPER).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """Base LLM dir + stage-1/stage-2 .ckpt files + the torch models they describe."""
    from peft import LoraConfig, get_peft_model

    d = tmp_path_factory.mktemp("official")
    base = build_torch_llama(LLAMA, seed=5)
    base.save_pretrained(d / "llm")
    # stage 1: trained voken rows (whole matrices are saved), fc, mapper, prompt
    stage1_llm = build_torch_llama(LLAMA, seed=5)
    with torch.no_grad():
        stage1_llm.model.embed_tokens.weight[-9:] += 0.5
        stage1_llm.lm_head.weight[-9:] -= 0.5
    mapper1 = _perturbed_mapper(6)
    sd1 = {"model.llama_model.model.embed_tokens.weight": stage1_llm.model.embed_tokens.weight.detach().clone(),
           "model.llama_model.lm_head.weight": stage1_llm.lm_head.weight.detach().clone()}
    sd1.update({k: v.clone() for k, v in mapper1.state_dict().items()})
    torch.save({"state_dict": sd1}, d / "stage1_cc3m.ckpt")
    # stage 2: peft with modules_to_save on top of the stage-1 LLM, a retrained mapper transformer
    peft_llm = get_peft_model(stage1_llm, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                     target_modules=["q_proj", "v_proj"],
                                                     modules_to_save=["lm_head", "embed_tokens"]))
    with torch.no_grad():
        for name, p in peft_llm.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    mapper2 = _perturbed_mapper(7)
    sd2 = {f"model.llama_model.{k}": v.detach().clone() for k, v in peft_llm.state_dict().items()
           if "lora_" in k or "modules_to_save" in k}
    sd2.update({k: v.clone() for k, v in mapper2.state_dict().items() if k.startswith("llm_to_t2i_mapping.")})
    torch.save({"state_dict": sd2}, d / "stage2_vist.ckpt")
    # the original's inference model: stage-1 fc and prompt, stage-2 transformer
    with torch.no_grad():
        mapper1.llm_to_t2i_mapping.load_state_dict(mapper2.llm_to_t2i_mapping.state_dict())
    return d, peft_llm.eval(), mapper1


def build_ours(llm_dir, with_lora: bool) -> MiniGPT5:
    llm = LlamaForCausalLM.from_pretrained(llm_dir, param_dtype=jnp.float32)
    if with_lora:
        lora.apply_lora(llm, rank=8, alpha=16, dropout=0.0, rngs=nnx.Rngs(0))
    config = MiniGPT5Config(voken_ids=tuple(range(100, 108)), image_placeholder_id=108)
    return MiniGPT5(config, llm=llm, mapper=VokenMapper(MAPPER, rngs=nnx.Rngs(1)), unet=None, vae=None,
                    noise_schedule=schedulers.NoiseSchedule.from_config(PNDM))


def test_import_matches_the_pytorch_composition(official):
    d, peft_llm, torch_mapper = official
    model = build_ours(d / "llm", with_lora=True)
    import_official(model, d / "stage1_cc3m.ckpt", d / "stage2_vist.ckpt")
    ids = np.array([[1, 5, 9, 100, 101, 102, 103, 104, 105, 106, 107, 30]], np.int64)
    ours = model.llm(jnp.asarray(ids, jnp.int32))
    with torch.no_grad():
        ref = peft_llm(input_ids=torch.tensor(ids), output_hidden_states=True)
    err_logits = np.abs(np.asarray(ours.logits) - ref.logits.numpy()).max()
    assert err_logits <= 1e-4, err_logits
    window = np.asarray(ours.hidden_states)[:, 2:10]
    cond = model.conditioning(jnp.asarray(window))
    with torch.no_grad():
        ref_cond = torch_mapper(torch.tensor(window)).numpy()
    err_cond = np.abs(np.asarray(cond) - ref_cond).max()
    assert err_cond <= 1e-4, err_cond
    print(f"official import: logits max-abs {err_logits:.2e}, conditioning max-abs {err_cond:.2e}")


def test_export_import_round_trip(official, tmp_path, monkeypatch):
    d, _, _ = official
    model = build_ours(d / "llm", with_lora=True)
    import_official(model, d / "stage1_cc3m.ckpt", d / "stage2_vist.ckpt")
    keys1 = export_official(model, tmp_path / "s1.ckpt", stage=1)
    keys2 = export_official(model, tmp_path / "s2.ckpt", stage=2)
    assert set(keys2) == set(torch.load(d / "stage2_vist.ckpt")["state_dict"])
    assert set(keys1) == set(torch.load(d / "stage1_cc3m.ckpt")["state_dict"])
    assert torch.load(tmp_path / "s2.ckpt")["pytorch-lightning_version"] == "2.0.2"  # Lightning's loader needs it
    again = build_ours(d / "llm", with_lora=True)
    import_official(again, tmp_path / "s1.ckpt", tmp_path / "s2.ckpt")
    a, b = km.flat_params(nnx.state(model, nnx.Param)), km.flat_params(nnx.state(again, nnx.Param))
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path].get_value()), np.asarray(b[path].get_value()), path)

    # a run that trained what the file cannot hold, or an LLM re-laid for inference, is refused; a failed
    # export leaves the file it would have replaced as it was
    body = "llm.model.layers.0.mlp.down_proj.kernel"
    with pytest.raises(CheckpointError, match=rf"stage-1 file has no place for 5 of .* e.g. {body}"):
        export_official(model, tmp_path / "s1.ckpt", stage=1, trained=[body, *[p for p in a if "lora" in p][:4]])
    stage1 = [p for p in a if p.startswith(("llm.model.embed_tokens.", "llm.lm_head.", "mapper."))]
    assert export_official(model, tmp_path / "s1.ckpt", stage=1, trained=stage1) == keys1
    before = (tmp_path / "s2.ckpt").read_bytes()

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        export_official(model, tmp_path / "s2.ckpt", stage=2)
    monkeypatch.undo()
    assert (tmp_path / "s2.ckpt").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "s1.ckpt", "s2.ckpt"]
    prepare_for_decoding(model.llm)
    with pytest.raises(CheckpointError, match=r"re-laid for inference .* export before preparing it"):
        export_official(model, tmp_path / "s2.ckpt", stage=2)


def test_errors_name_the_culprit(official, tmp_path):
    d, _, _ = official
    with pytest.raises(CheckpointError, match="LoRA"):
        load_official(build_ours(d / "llm", with_lora=False), d / "stage2_vist.ckpt", stage=2)
    sd = torch.load(d / "stage1_cc3m.ckpt")["state_dict"]
    sd["model.llama_model.model.extra.weight"] = torch.zeros(2)
    torch.save({"state_dict": sd}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"unexpected key 'model\.llama_model\.model\.extra\.weight'.*bad\.ckpt"):
        load_official(build_ours(d / "llm", with_lora=False), tmp_path / "bad.ckpt", stage=1)
    other_scale = build_ours(d / "llm", with_lora=False)
    lora.apply_lora(other_scale.llm, rank=8, alpha=32, dropout=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match=r"alpha / r = 2\.0; this model's LoRA scales by \[4\.0\]"):
        load_official(other_scale, d / "stage2_vist.ckpt", stage=2)
    with pytest.raises(CheckpointError, match=r"stage2_vist.ckpt: a stage-2 file \(it holds LoRA adapters\), "
                                              r"given as the stage-1 one"):
        load_official(build_ours(d / "llm", with_lora=True), d / "stage2_vist.ckpt", stage=1)
    with pytest.raises(CheckpointError, match=r"stage1_cc3m.ckpt: a stage-1 file \(fc, no LoRA\), given as the "
                                              r"stage-2"):
        load_official(build_ours(d / "llm", with_lora=True), d / "stage1_cc3m.ckpt", stage=2)
    torch.save({"model": sd}, tmp_path / "nested.ckpt")
    with pytest.raises(CheckpointError, match="state_dict"):
        load_official(build_ours(d / "llm", with_lora=False), tmp_path / "nested.ckpt", stage=1)
