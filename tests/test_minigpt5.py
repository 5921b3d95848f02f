"""MiniGPT-5's objective against a PyTorch composition written here from REFERENCE §1.7, §4:
transformers Llama + diffusers U-Net/VAE + transformers CLIP text + the torch mapper, same weights,
same batch, same noise, timesteps and CFG mask → equal loss terms and trainable-param gradients.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _fixtures_llama import build_torch_llama
from _fixtures_sd import tiny_sd_dir  # noqa: F401  (session fixture)
from flax import nnx
from test_mapper import TorchMapper

from mg5jax.convert import keymap as km
from mg5jax.convert.mapper import mapper_keymap
from mg5jax.convert.sources import DictSource
from mg5jax.diffusion import schedulers
from mg5jax.models.clip_text import CLIPTextModel, encode_prompts
from mg5jax.models.llama import LlamaForCausalLM
from mg5jax.models.mapper import MapperConfig, VokenMapper
from mg5jax.models.minigpt5 import MiniGPT5, MiniGPT5Config, PromptEncoder
from mg5jax.models.unet import UNet2DConditionModel
from mg5jax.models.vae import AutoencoderKL

BASE_VOCAB, D, Q = 100, 48, 4
VOKENS = tuple(range(BASE_VOCAB, BASE_VOCAB + 8))
PLACEHOLDER = BASE_VOCAB + 8
LLAMA = dict(vocab_size=BASE_VOCAB + 9, hidden_size=D, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False)
IGNORE = -100


def make_batch(rng: np.random.Generator):
    """Two samples: A has an input image and one voken group, B has two voken groups (T=24, M=1, G=2)."""
    t = 24
    ids = np.full((2, t), 2, np.int32)
    labels = np.full((2, t), IGNORE, np.int32)
    mask = np.zeros((2, t), np.int32)
    a = [5, 6, 7, PLACEHOLDER, 8, 9] + [11, 12] + list(VOKENS) + [13]
    b = [20, 21] + list(VOKENS) + [22, 23] + list(VOKENS) + [24]
    for row, toks, src_len in ((0, a, 6), (1, b, 2)):
        ids[row, : len(toks)] = toks
        mask[row, : len(toks)] = 1
        labels[row, src_len : len(toks)] = toks[src_len:]
    # the original's mask of [IMG1]…[IMG6] after the first [IMG0] of each row
    for row in range(2):
        i = int(np.argmax(labels[row] == VOKENS[0]))
        labels[row, i + 1 : i + 7] = IGNORE
    return {
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "input_image_features": rng.normal(size=(2, 1, Q, D)).astype(np.float32),
        "input_image_mask": np.array([[True], [False]]),
        "output_images": rng.uniform(-1, 1, size=(2, 2, 3, 64, 64)).astype(np.float32),
        "output_image_mask": np.array([[True, False], [True, True]]),
        "caption_ids": rng.integers(3, 900, size=(2, 77)).astype(np.int32),
        "caption_mask": (np.arange(77)[None] < np.array([[9], [14]])).astype(np.int32),
        "has_caption": np.array([True, True]),
    }


@pytest.fixture(scope="module")
def setup(tiny_sd_dir, tmp_path_factory):  # noqa: F811
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import UNet2DConditionModel as TorchUNet
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel as TorchCLIP
    from transformers import CLIPTokenizer

    torch_llm = build_torch_llama(LLAMA, seed=3)
    llm_dir = tmp_path_factory.mktemp("mg5_llm")
    torch_llm.save_pretrained(llm_dir)
    mcfg = MapperConfig(llm_dim=D, num_vokens=8, hidden=32, num_queries=77, enc_layers=2, dec_layers=2,
                        heads=4, ff=64)
    torch.manual_seed(4)
    torch_mapper = TorchMapper(mcfg).eval()
    with torch.no_grad():
        for p in torch_mapper.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    gd, abstract = km.abstract_model(lambda: VokenMapper(mcfg, rngs=nnx.Rngs(0)))
    sd = {k: v.numpy().copy() for k, v in torch_mapper.state_dict().items()}
    mapper = km.materialize(gd, km.load_params(abstract, DictSource(sd, "mapper"), mapper_keymap()))

    text_encoder = CLIPTextModel.from_pretrained(tiny_sd_dir / "text_encoder", param_dtype=jnp.float32)
    torch_text = TorchCLIP.from_pretrained(tiny_sd_dir / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_sd_dir / "tokenizer"))
    # the CFG-dropped caption target: "" through the tokenizer and the encoder, ours as build.py makes it
    # and the original's encode_caption in torch
    empty_ids, empty_mask = encode_prompts(tokenizer, [""])
    empty = np.asarray(text_encoder(jnp.asarray(empty_ids), attention_mask=jnp.asarray(empty_mask)))[0]
    with torch.no_grad():
        torch_empty = torch_text(**tokenizer("", padding="max_length", max_length=77, return_tensors="pt"))[0][0]
    schedule_cfg = json.loads((tiny_sd_dir / "scheduler" / "scheduler_config.json").read_text())
    config = MiniGPT5Config(voken_ids=VOKENS, image_placeholder_id=PLACEHOLDER, bos_id=1, num_query_tokens=Q,
                            groups_per_sample=2)
    model = MiniGPT5(
        config,
        llm=LlamaForCausalLM.from_pretrained(llm_dir, param_dtype=jnp.float32),
        mapper=mapper,
        unet=UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet", param_dtype=jnp.float32),
        vae=AutoencoderKL.from_pretrained(tiny_sd_dir / "vae", param_dtype=jnp.float32),
        noise_schedule=schedulers.NoiseSchedule.from_config(schedule_cfg),
        text_encoder=text_encoder, empty_text_feature=empty)
    torch_parts = dict(
        llm=torch_llm, mapper=torch_mapper, text=torch_text,
        unet=TorchUNet.from_pretrained(tiny_sd_dir / "unet").eval(),
        vae=TorchVAE.from_pretrained(tiny_sd_dir / "vae").eval(),
        alphas_cumprod=DDPMScheduler.from_config(schedule_cfg).alphas_cumprod,
        empty=torch_empty)
    return model, torch_parts


def torch_objective(p, batch, drop, noise, timesteps, posterior_noise):
    """The original's forward (one sample at a time for splicing), in PyTorch, fp32."""
    llm = p["llm"]
    embed = llm.get_input_embeddings()
    batch_size = batch["input_ids"].shape[0]
    rows, row_labels = [], []
    for b in range(batch_size):
        n = int(batch["attention_mask"][b].sum())
        ids = torch.tensor(batch["input_ids"][b, :n]).long()
        lab = torch.tensor(batch["labels"][b, :n]).long()
        parts, labs = [embed(torch.tensor([1]))], [torch.tensor([IGNORE])]
        start, img = 0, 0
        for i in range(n):
            if ids[i] == PLACEHOLDER:
                parts += [embed(ids[start:i]), torch.tensor(batch["input_image_features"][b, img])]
                labs += [lab[start:i], torch.full((Q,), IGNORE)]
                start, img = i + 1, img + 1
        parts.append(embed(ids[start:]))
        labs.append(lab[start:])
        rows.append(torch.cat(parts))
        row_labels.append(torch.cat(labs))
    length = max(r.shape[0] for r in rows)
    embeds = torch.zeros(batch_size, length, D)
    att = torch.zeros(batch_size, length, dtype=torch.long)
    labels = torch.full((batch_size, length), IGNORE)
    for b in range(batch_size):
        embeds[b, : rows[b].shape[0]] = rows[b]
        att[b, : rows[b].shape[0]] = 1
        labels[b, : rows[b].shape[0]] = row_labels[b]
    out = llm(inputs_embeds=embeds, attention_mask=att, output_hidden_states=True)
    logits, hidden = out.logits, out.hidden_states[-1]
    text_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                  labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    windows, images, captions, cap_masks, groups = [], [], [], [], []
    for b in range(batch_size):
        for g, pos in enumerate(torch.nonzero(labels[b] == VOKENS[0])[:, 0].tolist()):
            if batch["output_image_mask"][b, g]:
                groups.append(2 * b + g)  # the draws are per group in place: [B·G]
                windows.append(hidden[b, pos - 1 : pos + 7])
                images.append(torch.tensor(batch["output_images"][b, g]))
                captions.append(torch.tensor(batch["caption_ids"][b]).long())
                cap_masks.append(torch.tensor(batch["caption_mask"][b]).long())
    drop_t = torch.tensor(drop[groups])
    feats = torch.stack(windows)
    feats = torch.where(drop_t[:, None, None], torch.zeros_like(feats), feats)
    cond = p["mapper"](feats)
    dist = p["vae"].encode(torch.stack(images)).latent_dist
    latents = (dist.mean + dist.std * torch.tensor(posterior_noise[groups])) * p["vae"].config.scaling_factor
    t = torch.tensor(timesteps[groups]).long()
    eps = torch.tensor(noise[groups])
    abar = p["alphas_cumprod"][t][:, None, None, None]
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * eps
    pred = p["unet"](noisy, t, encoder_hidden_states=cond).sample
    snr = p["alphas_cumprod"][t] / (1 - p["alphas_cumprod"][t])
    weight = torch.clamp(snr, max=5.0) / snr
    image_loss = (((pred - eps) ** 2).mean(dim=(1, 2, 3)) * weight).mean()
    target = p["text"](input_ids=torch.stack(captions), attention_mask=torch.stack(cap_masks))[0]
    target = torch.where(drop_t[:, None, None], p["empty"][None], target)
    caption_loss = ((cond - target) ** 2).mean()
    loss = 0.01 * text_loss + image_loss + 0.1 * caption_loss
    return {"loss": loss, "text_loss": text_loss, "image_loss": image_loss, "caption_loss": caption_loss}


def test_objective_and_gradients_match_torch(setup):
    model, p = setup
    rng = np.random.default_rng(0)
    batch = make_batch(rng)
    s = 4
    drop = np.array([False, False, True, False])  # per group in place; group 1 has no target image
    noise = rng.normal(size=(s, 4, 8, 8)).astype(np.float32)
    post = rng.normal(size=(s, 4, 8, 8)).astype(np.float32)
    timesteps = np.array([10, 500, 999, 0], np.int32)

    trainable = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("embed_tokens"), nnx.PathContains("lm_head"),
                                           nnx.PathContains("mapper")))

    def loss_fn(m):
        out = m.loss(jax.tree.map(jnp.asarray, batch), jax.random.key(0), cfg_drop=jnp.asarray(drop),
                     noise=jnp.asarray(noise), timesteps=jnp.asarray(timesteps), posterior_noise=jnp.asarray(post))
        return out["loss"], out

    grad_fn = nnx.jit(nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable), has_aux=True))
    (_, ours), grads = grad_fn(model)

    ref = torch_objective(p, batch, drop, noise, timesteps, post)
    ref["loss"].backward()
    for k in ("loss", "text_loss", "image_loss", "caption_loss"):
        want = float(ref[k].detach())
        assert abs(float(ours[k]) - want) <= 1e-4 * abs(want), (k, float(ours[k]), want)
        print(f"{k}: ours {float(ours[k]):.6g} torch {want:.6g} rel {abs(float(ours[k]) - want) / abs(want):.2e}")

    torch_grads = {
        "llm.model.embed_tokens.embedding": p["llm"].model.embed_tokens.weight.grad.numpy(),
        "llm.lm_head.kernel": p["llm"].lm_head.weight.grad.numpy().T,
        "mapper.decoder_queries": p["mapper"].t2i_decoder_prompt.grad.numpy()[0],
        "mapper.fc_in.kernel": p["mapper"].fc[0].weight.grad.numpy().T,
        "mapper.fc_out.bias": p["mapper"].fc[2].bias.grad.numpy(),
        "mapper.encoder.layers.0.linear1.kernel":
            p["mapper"].llm_to_t2i_mapping.encoder.layers[0].linear1.weight.grad.numpy().T,
        "mapper.decoder.layers.1.cross_attn.q_proj.kernel":
            p["mapper"].llm_to_t2i_mapping.decoder.layers[1].multihead_attn.in_proj_weight.grad.numpy()[:32].T,
        "mapper.decoder.norm.scale": p["mapper"].llm_to_t2i_mapping.decoder.norm.weight.grad.numpy(),
    }
    flat = km.flat_params(grads)
    for path, want in torch_grads.items():
        got = np.asarray(flat[path].get_value())
        err = np.abs(got - want).max() / np.abs(want).max()
        print(f"grad {path}: rel {err:.2e}")
        assert err <= 1e-3, (path, err)


def test_samples_without_input_images_need_no_image_slots(setup):
    """`max_input_images = 0` (CC3M: no <ImageHere>): the spliced sequence has no image positions, and the
    loss is the one the same batch gives with an empty slot (whose Q - 1 extra positions are padding)."""
    model, _ = setup
    rng = np.random.default_rng(5)
    batch = make_batch(rng)
    batch["input_ids"] = np.where(batch["input_ids"] == PLACEHOLDER, 10, batch["input_ids"])
    batch["input_image_mask"][:] = False
    none = dict(batch, input_image_features=np.zeros((2, 0, Q, D), np.float32),
                input_image_mask=np.zeros((2, 0), bool))
    draws = dict(cfg_drop=jnp.asarray([False, True, False, False]),
                 noise=jnp.asarray(rng.normal(size=(4, 4, 8, 8)), jnp.float32),
                 timesteps=jnp.asarray([3, 30, 300, 900]),
                 posterior_noise=jnp.asarray(rng.normal(size=(4, 4, 8, 8)), jnp.float32))
    embeds, mask, _ = model.splice(jax.tree.map(jnp.asarray, none))
    slotted, slotted_mask, _ = model.splice(jax.tree.map(jnp.asarray, batch))
    assert embeds.shape[1] == 1 + 24 and slotted.shape[1] == 1 + 24 + Q - 1
    np.testing.assert_array_equal(embeds, slotted[:, : 1 + 24])
    np.testing.assert_array_equal(mask, slotted_mask[:, : 1 + 24])
    assert not np.asarray(slotted_mask[:, 1 + 24 :]).any()
    losses = [model.loss(jax.tree.map(jnp.asarray, b), jax.random.key(0), **draws) for b in (none, batch)]
    for k in ("loss", "text_loss", "image_loss", "caption_loss"):
        np.testing.assert_allclose(float(losses[0][k]), float(losses[1][k]), rtol=1e-5, err_msg=k)


def test_loss_groups_are_the_original_per_device_means(setup):
    """With loss_group_rows=1 every term is the mean over rows of that row's own loss: what the
    original computes on 2 GPUs with one row each (DDP averages the per-GPU losses)."""
    import dataclasses

    model, p = setup
    rng = np.random.default_rng(5)
    batch = make_batch(rng)
    drop = np.array([True, False, False, False])
    noise, post = (rng.normal(size=(4, 4, 8, 8)).astype(np.float32) for _ in range(2))
    timesteps = np.array([300, 20, 999, 150], np.int32)
    config = model.config

    def loss(group_rows):  # the objective on `batch` as it is now, with these draws, in groups of `group_rows`
        model.config = dataclasses.replace(config, loss_group_rows=group_rows)
        try:
            return model.loss(jax.tree.map(jnp.asarray, batch), jax.random.key(0), cfg_drop=jnp.asarray(drop),
                              noise=jnp.asarray(noise), timesteps=jnp.asarray(timesteps),
                              posterior_noise=jnp.asarray(post))
        finally:
            model.config = config

    ours, one_mean = loss(1), loss(0)
    with torch.no_grad():
        per_row = [torch_objective(p, {k: v[r : r + 1] for k, v in batch.items()}, drop[2 * r : 2 * r + 2],
                                   noise[2 * r : 2 * r + 2], timesteps[2 * r : 2 * r + 2], post[2 * r : 2 * r + 2])
                   for r in range(2)]
    for k in ("loss", "text_loss", "image_loss", "caption_loss"):
        want = float(np.mean([float(t[k]) for t in per_row]))
        print(f"{k}: per-row means {float(ours[k]):.6g} torch {want:.6g}, one batch mean {float(one_mean[k]):.6g}")
        assert abs(float(ours[k]) - want) <= 1e-4 * abs(want), (k, float(ours[k]), want)
    assert abs(float(one_mean["text_loss"]) - float(ours["text_loss"])) > 1e-3  # the grouping matters here
    short = loss(3)  # does not divide 2 rows: groups of gcd = 1
    for k in ours:
        np.testing.assert_allclose(float(short[k]), float(ours[k]), rtol=1e-6, err_msg=k)

    # a row without a target image adds only its text term; the image terms are over rows that have one
    batch["output_image_mask"][0] = False
    mixed = loss(1)
    row0_text = float(per_row[0]["text_loss"])
    np.testing.assert_allclose(float(mixed["loss"]), (0.01 * row0_text + float(per_row[1]["loss"])) / 2, rtol=1e-4)
    for k in ("image_loss", "caption_loss"):
        np.testing.assert_allclose(float(mixed[k]), float(per_row[1][k]), rtol=1e-4, err_msg=k)


def test_voken_window_indices(setup):
    model, _ = setup
    labels = np.full((1, 30), IGNORE, np.int32)
    labels[0, 11] = VOKENS[0]
    labels[0, 23] = VOKENS[0]
    hidden = jnp.arange(30, dtype=jnp.float32)[None, :, None] * jnp.ones((1, 30, 3))
    windows, found = model.voken_windows(hidden, jnp.asarray(labels))
    np.testing.assert_array_equal(np.asarray(windows[0, :, :, 0]), [np.arange(10, 18), np.arange(22, 30)])
    np.testing.assert_array_equal(np.asarray(found), [[True, True]])


def test_cfg_drop_extremes(setup):
    model, _ = setup
    batch = jax.tree.map(jnp.asarray, make_batch(np.random.default_rng(1)))
    embeds, att, labels = model.splice(batch)
    hidden = model.llm(inputs_embeds=embeds, attention_mask=att).hidden_states
    windows, _ = model.voken_windows(hidden, labels)
    windows = windows.reshape(-1, *windows.shape[2:])
    uncond = model.uncond_conditioning(windows.shape[0])
    all_dropped = model.conditioning(windows, jnp.ones((windows.shape[0],), bool))
    never = model.conditioning(windows, jnp.zeros((windows.shape[0],), bool))
    np.testing.assert_allclose(np.asarray(all_dropped), np.asarray(uncond), atol=1e-6)
    assert np.abs(np.asarray(never) - np.asarray(uncond)).max() > 1e-3
    # the loss draws its mask with draw_cfg_drop: rate 1.0 drops every group, 0.0 none
    import dataclasses

    config = model.config
    try:
        for rate, want in ((1.0, True), (0.0, False)):
            model.config = dataclasses.replace(config, cfg_drop=rate)
            drop = np.asarray(model.draw_cfg_drop(jax.random.key(3), 64))
            assert np.all(drop == want)
    finally:
        model.config = config


def test_no_voken_batch_is_text_only(setup):
    model, _ = setup
    batch = make_batch(np.random.default_rng(2))
    batch["labels"] = np.where(np.isin(batch["labels"], VOKENS), IGNORE, batch["labels"])
    out = model.loss(jax.tree.map(jnp.asarray, batch), jax.random.key(0))
    np.testing.assert_allclose(float(out["loss"]), 0.01 * float(out["text_loss"]), rtol=1e-6)


def test_stored_moments_give_the_loss_of_the_images(setup):
    """`data.output_moments_dir` (VAE moments precomputed by `encode_images --vae`) trains on exactly what the
    online path computes from the target images."""
    model, _ = setup
    rng = np.random.default_rng(4)
    batch = make_batch(rng)
    kw = dict(cfg_drop=jnp.asarray([False, True, False, False]), timesteps=jnp.asarray([3, 400, 999, 50]),
              noise=jnp.asarray(rng.normal(size=(4, 4, 8, 8)), jnp.float32),
              posterior_noise=jnp.asarray(rng.normal(size=(4, 4, 8, 8)), jnp.float32))
    images = batch["output_images"]
    moments = nnx.jit(lambda vae, x: vae.encode(x).moments)(model.vae, images.reshape(-1, *images.shape[2:]))
    stored = {k: v for k, v in batch.items() if k != "output_images"}
    stored["output_moments"] = np.asarray(moments).reshape(*images.shape[:2], *moments.shape[1:])
    loss = nnx.jit(lambda m, b: m.loss(b, jax.random.key(0), **kw))
    online, offline = loss(model, jax.tree.map(jnp.asarray, batch)), loss(model, jax.tree.map(jnp.asarray, stored))
    for k in ("loss", "image_loss"):
        np.testing.assert_allclose(float(offline[k]), float(online[k]), rtol=1e-5, err_msg=k)
    assert float(online["image_loss"]) > 0


def test_generation_programs_compute_what_the_model_does(setup):
    """The generator's splice and conditioning programs take parts of the model (a `PromptEncoder`, the
    mapper), not all of it: the same embeddings, conditioning and CFG negative."""
    from mg5jax.generation.interleaved import _conditioning, _splice

    model, _ = setup
    batch = jax.tree.map(jnp.asarray, make_batch(np.random.default_rng(2)))
    embeds, att, labels = model.splice(batch)
    out_embeds, out_mask = _splice(*nnx.split(PromptEncoder(model)), batch)
    np.testing.assert_array_equal(out_embeds, embeds)
    np.testing.assert_array_equal(out_mask, att.astype(bool))
    windows = jax.random.normal(jax.random.key(0), (3, 8, D))
    cond, uncond = _conditioning(*nnx.split(model.mapper), windows)
    np.testing.assert_array_equal(cond, model.conditioning(windows))
    np.testing.assert_array_equal(uncond, model.uncond_conditioning(3))
