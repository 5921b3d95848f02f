"""Key maps between diffusers checkpoints (`diffusion_pytorch_model.safetensors`) and mg5jax's
U-Net (`mg5jax.models.unet`) and VAE (`mg5jax.models.vae`).

Our module trees mirror diffusers' names, so most rules only rename the leaf (`weight` -> `kernel`
or `scale`) and transpose (torch Linear / Conv2d -> flax Dense / Conv). The differences:
  `downsamplers.0.conv` / `upsamplers.0.conv`   <-> `downsampler.conv` / `upsampler.conv`
  `attn.to_out.0`                               <-> `attn.to_out`
  `ff.net.0.proj` (GEGLU, [2F, D]: value ‖ gate) <-> `ff.proj_value` + `ff.proj_gate` (split on load)
  `ff.net.2`                                    <-> `ff.proj_out`
  VAE `mid_block.attentions.N.to_q` …           <-> `mid_block.attentions.N.attention.to_q` …
SD 1.x U-Nets store `proj_in` / `proj_out` as 1x1 convs, SD 2.x as linears; ours are always linears.
"""

from __future__ import annotations

from mg5jax.convert.keymap import CONV, CONV1X1_AS_LINEAR, LINEAR, KeyMap, Rule, Transform


def _norm(theirs: str, ours: str) -> list[Rule]:
    return [Rule(theirs + ".weight", ours + ".scale"), Rule(theirs + ".bias", ours + ".bias")]


def _dense(theirs: str, ours: str, transform: Transform = LINEAR) -> list[Rule]:
    return [Rule(theirs + ".weight", ours + ".kernel", transform), Rule(theirs + ".bias", ours + ".bias")]


def _conv(theirs: str, ours: str) -> list[Rule]:
    return _dense(theirs, ours, CONV)


def _resnet(prefix: str) -> list[Rule]:
    """ResnetBlock2D: norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut."""
    p = prefix + "."
    return [
        *_norm(p + "norm1", p + "norm1"), *_conv(p + "conv1", p + "conv1"),
        *_dense(p + "time_emb_proj", p + "time_emb_proj"),
        *_norm(p + "norm2", p + "norm2"), *_conv(p + "conv2", p + "conv2"),
        *_conv(p + "conv_shortcut", p + "conv_shortcut"),
    ]  # fmt: skip


def _attention(theirs: str, ours: str, names=("to_q", "to_k", "to_v", "to_out.0")) -> list[Rule]:
    """diffusers `Attention`: q/k/v projections (biases only where the model has them) and to_out."""
    rules = []
    for name, our_name in zip(names, ("to_q", "to_k", "to_v", "to_out")):
        rules += _dense(f"{theirs}.{name}", f"{ours}.{our_name}")
    return rules


def _spatial_transformer(prefix: str, proj: Transform) -> list[Rule]:
    """Transformer2DModel (continuous input): GroupNorm, proj_in, BasicTransformerBlocks, proj_out."""
    p = prefix + "."
    t = p + "transformer_blocks.{t}."
    return [
        *_norm(p + "norm", p + "norm"),
        *_dense(p + "proj_in", p + "proj_in", proj),
        *_dense(p + "proj_out", p + "proj_out", proj),
        *_norm(t + "norm1", t + "norm1"), *_attention(t + "attn1", t + "attn1"),
        *_norm(t + "norm2", t + "norm2"), *_attention(t + "attn2", t + "attn2"),
        *_norm(t + "norm3", t + "norm3"),
        Rule(t + "ff.net.0.proj.weight", (t + "ff.proj_value.kernel", t + "ff.proj_gate.kernel"), LINEAR),
        Rule(t + "ff.net.0.proj.bias", (t + "ff.proj_value.bias", t + "ff.proj_gate.bias")),
        *_dense(t + "ff.net.2", t + "ff.proj_out"),
    ]  # fmt: skip


def unet_keymap(use_linear_projection: bool) -> KeyMap:
    """diffusers `UNet2DConditionModel` <-> `mg5jax.models.unet.UNet2DConditionModel`."""
    proj = LINEAR if use_linear_projection else CONV1X1_AS_LINEAR
    rules = [
        *_conv("conv_in", "conv_in"),
        *_dense("time_embedding.linear_{n}", "time_embedding.linear_{n}"),
        *_norm("conv_norm_out", "conv_norm_out"),
        *_conv("conv_out", "conv_out"),
    ]
    for block in ("down_blocks.{b}", "mid_block", "up_blocks.{b}"):
        rules += _resnet(block + ".resnets.{r}")
        rules += _spatial_transformer(block + ".attentions.{a}", proj)
    rules += _conv("down_blocks.{b}.downsamplers.0.conv", "down_blocks.{b}.downsampler.conv")
    rules += _conv("up_blocks.{b}.upsamplers.0.conv", "up_blocks.{b}.upsampler.conv")
    return KeyMap(rules)


# diffusers < 0.15 saved the VAE's mid-block attention as query/key/value/proj_attn (older hub VAE
# files still carry these names); diffusers renames them on load, and so do we.
VAE_ATTENTION_NAMES = ("to_q", "to_k", "to_v", "to_out.0")
VAE_DEPRECATED_ATTENTION_NAMES = ("query", "key", "value", "proj_attn")


def vae_keymap(deprecated_attention_names: bool = False) -> KeyMap:
    """diffusers `AutoencoderKL` <-> `mg5jax.models.vae.AutoencoderKL`."""
    names = VAE_DEPRECATED_ATTENTION_NAMES if deprecated_attention_names else VAE_ATTENTION_NAMES
    rules = [*_conv("quant_conv", "quant_conv"), *_conv("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        p = part + "."
        a = p + "mid_block.attentions.{a}"
        rules += [
            *_conv(p + "conv_in", p + "conv_in"),
            *_resnet(p + "mid_block.resnets.{r}"),
            *_norm(a + ".group_norm", a + ".group_norm"),
            *_attention(a, a + ".attention", names),
            *_norm(p + "conv_norm_out", p + "conv_norm_out"),
            *_conv(p + "conv_out", p + "conv_out"),
        ]  # fmt: skip
    rules += _resnet("encoder.down_blocks.{b}.resnets.{r}")
    rules += _conv("encoder.down_blocks.{b}.downsamplers.0.conv", "encoder.down_blocks.{b}.downsampler.conv")
    rules += _resnet("decoder.up_blocks.{b}.resnets.{r}")
    rules += _conv("decoder.up_blocks.{b}.upsamplers.0.conv", "decoder.up_blocks.{b}.upsampler.conv")
    return KeyMap(rules)
