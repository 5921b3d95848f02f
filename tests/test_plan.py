"""The ahead-of-time planner on tiny part configs and the local CPU devices: the real train step and
the generation programs compile from abstract state, and the report's numbers hang together."""

import json
import pathlib

import numpy as np
import pytest

from mg5jax import plan
from mg5jax.generation import interleaved
from mg5jax.models.unet import UNetConfig
from mg5jax.models.vae import VAEConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 8  # conftest's simulated CPU devices


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> pathlib.Path:
    """config.json files only (no weights), in the layouts `build.build_model` reads."""
    root = tmp_path_factory.mktemp("plan_tiny")
    files = {
        "llm/config.json": {
            "model_type": "llama", "vocab_size": 120, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2},
        "sd/unet/config.json": UNetConfig(
            sample_size=8, block_out_channels=(32, 64, 64, 64), layers_per_block=(1,) * 4,
            num_attention_heads=(2, 4, 4, 4), cross_attention_dim=(32,) * 4).to_hf(),
        "sd/vae/config.json": VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1,
                                        sample_size=64).to_hf(),
        "sd/text_encoder/config.json": {
            "model_type": "clip_text_model", "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
            "hidden_act": "gelu"},
        "sd/scheduler/scheduler_config.json": plan.SD21_SCHEDULER,
        "blip2/config.json": {
            "model_type": "blip-2", "num_query_tokens": 4, "text_config": {"hidden_size": 64},
            "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
            "qformer_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "intermediate_size": 64, "cross_attention_frequency": 2,
                               "encoder_hidden_size": 32}},
    }  # fmt: skip
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
    return root


def tiny_flags(root: pathlib.Path, config: str) -> list[str]:
    return [
        f"--config={ROOT / 'configs' / config}",
        f"--config.model.llm_path={root / 'llm'}",
        f"--config.model.sd_path={root / 'sd'}",
        f"--config.model.vision.blip2_dir={root / 'blip2'}",
        "--config.model.mapper.enc_layers=1", "--config.model.mapper.dec_layers=1",
        "--config.model.mapper.heads=4", "--config.model.mapper.ff=64",
        "--config.data.input_image_size=32", "--config.data.output_image_size=64",
        "--config.data.max_input_images=2",
        "--topology=cpu", "--text_length=16",
    ]


@pytest.fixture(autouse=True)
def configs_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # the stage configs import `configs.base`


def test_stage2_train_step_plan(tiny_dirs, capsys):
    argv = ["plan", *tiny_flags(tiny_dirs, "stage2_vist.py"), "--config.model.vision.kind=blip2",
            "--batch_per_device=1", f"--out={tiny_dirs / 'stage2.json'}"]
    report = plan.cli(argv)
    assert json.loads(capsys.readouterr().out) == report == json.loads((tiny_dirs / "stage2.json").read_text())

    assert report["devices"] == DEVICES and report["hbm_per_device_bytes"] is None
    assert np.prod(list(report["mesh"].values())) == DEVICES
    assert report["sizes_from"]["llm"].endswith("llm/config.json")
    assert report["remat"] == {"llm": True, "unet": True}
    b = report["batch"]
    assert (b["global"], b["text_tokens"], b["llm_length"]) == (DEVICES, 16, 1 + 16 + 3 * 2)
    mem = report["memory"]
    assert mem["total_bytes"] == (mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"]
                                  + mem["temp_bytes"] + mem["code_bytes"]) > 0
    assert mem["alias_bytes"] > 0  # params and optimizer state are donated
    assert report["flops_per_device"] > 0 and report["compile_s"] > 0

    parts = report["parts"]
    assert {"llm", "lora", "voken_rows", "mapper", "unet", "vae", "vision"} <= set(parts)
    assert b["grad_accum_steps"] == 48 // DEVICES  # effective batch 48
    for name in ("lora", "voken_rows", "mapper"):  # fp32, with AdamW's mu and nu and the accumulated gradient
        assert parts[name]["trainable_bytes"] > 0, name
        # the vocab matrices keep optimizer state for their 9 new rows (of 129) only
        rows = 9 / 129 if name == "voken_rows" else 1
        assert parts[name]["optimizer_bytes"] == 3 * parts[name]["trainable_bytes"] * rows, name
    assert parts["lora"]["frozen_bytes"] == parts["voken_rows"]["frozen_bytes"] == 0
    assert parts["mapper"]["frozen_bytes"] > 0  # stage 2 freezes fc and the decoder queries
    for name in ("llm", "unet", "vae", "vision"):  # frozen, bf16
        assert parts[name]["trainable_bytes"] == parts[name]["optimizer_bytes"] == 0, name
        assert parts[name]["frozen_bytes"] > 0, name
    # the LLM's kernels are split over the 8 devices on their `embed` axis (norm scales replicated)
    assert parts["llm"]["frozen_bytes"] < 2 * parts["llm"]["params"] / 4
    # voken rows: embed_tokens + lm_head, 129 rows x 64, fp32 (the tokenizer-less vocab is 120 + 9)
    assert parts["voken_rows"]["params"] == 2 * 129 * 64
    # our per-device accounting against XLA's: the donated buffers are exactly the trainable state and
    # the optimizer's (the frozen weights are arguments too, less the ones the step never reads)
    assert mem["alias_bytes"] == sum(p["trainable_bytes"] + p["optimizer_bytes"] for p in parts.values())
    assert mem["argument_bytes"] <= sum(p["frozen_bytes"] + p["trainable_bytes"] + p["optimizer_bytes"]
                                        for p in parts.values()) + 64 * 1024  # + the batch


def test_generation_plan(tiny_dirs):
    from absl import flags
    from ml_collections import config_flags

    argv = ["plan", *[f for f in tiny_flags(tiny_dirs, "stage1_cc3m.py") if f.startswith("--config")],
            "--config.model.int8_weights=True"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    cfg = fv.config
    report = plan.plan(cfg, "cpu", generate=True, prompts=DEVICES, text_length=16)

    s = report["settings"]
    assert (s["prompts"], s["max_new_tokens"], s["steps"], s["scheduler"]) == (DEVICES, 256, 50, "pndm")
    assert s["images_per_render_call"] == min(DEVICES * s["max_images_per_prompt"], 8)  # render_batch
    assert s["prompt_length"] == 1 + 16 + 31 * 2  # stage 1 has no vision encoder: 32 feature tokens per slot
    assert set(report["programs"]) == {"splice", "prefill", "decode", "render"}
    for name, p in report["programs"].items():
        assert p["memory"]["total_bytes"] > 0 and p["flops_per_device"] > 0, name
        assert p["resident_bytes"] == report["weights_bytes"] + p["memory"]["total_bytes"] - p["weights_bytes"]
    assert report["resident_peak_bytes"] == max(p["resident_bytes"] for p in report["programs"].values())
    # the KV cache: 2 x layers x (prompts / devices) x slots x hidden, bf16 per device
    assert report["kv_cache_bytes"] == 2 * 2 * 1 * s["kv_cache_slots"] * 64 * 2
    assert s["kv_cache_slots"] == s["prompt_length"] + 256 + s["max_images_per_prompt"] * 7
    llm = report["parts"]["llm"]  # int8 projections: under 1 byte per parameter and device, not bf16's 2
    assert llm["frozen_bytes"] < 2 * llm["params"] / DEVICES
    assert "text_encoder" not in report["parts"] and "vision" not in report["parts"]  # stage 1 has no ViT


def test_generation_plan_with_the_vision_encoder_and_a_batch_that_does_not_split(tiny_dirs):
    """Stage 2's splice runs the (int8) ViT; 3 prompts do not split over 8 devices (replicated, as the
    generator's host inputs are), and the sampler call is padded to a power of two as the generator pads it."""
    argv = ["plan", *tiny_flags(tiny_dirs, "stage2_vist.py"), "--config.model.vision.kind=blip2",
            "--config.model.int8_weights=True", "--generate", "--prompts=3"]
    report = plan.cli(argv)
    s = report["settings"]
    assert s["prompt_length"] == 1 + 16 + 3 * 2  # 4 query tokens per image slot
    assert s["max_images_per_prompt"] == 2  # 6 images: one sampler call of 8
    assert s["images_per_render_call"] == interleaved.render_call_size(6, 8) == 8
    assert "vision" in report["parts"] and "text_encoder" not in report["parts"]
    assert report["programs"]["splice"]["flops_per_device"] > 0
    # the KV cache is replicated: every device holds all 3 rows
    assert report["kv_cache_bytes"] == 2 * 2 * 3 * s["kv_cache_slots"] * 64 * 2


def test_part_of():
    assert plan.part_of("llm.model.layers.3.self_attn.q_proj.lora_a") == "lora"
    assert plan.part_of("opt_state.1.0.mu.llm.lm_head.kernel") == "voken_rows"
    assert plan.part_of("llm.model.embed_tokens.embedding.value") == "voken_rows"
    assert plan.part_of("llm.model.layers.0.mlp.up_proj.kernel") == "llm"
    assert plan.part_of("vae.decoder.up_blocks.0.resnets.0.conv1.kernel") == "vae"
    assert plan.part_of("step") == "other"


def test_bad_topology():
    with pytest.raises(ValueError, match="--topology='v9x:3x3'"):
        plan.topology_devices("v9x:3x3")


def test_a_training_mesh_the_trainer_refuses_is_refused_before_compiling(tiny_dirs):
    with pytest.raises(ValueError, match="data, fsdp and tensor all > 1 is not supported"):
        plan.cli(["plan", *tiny_flags(tiny_dirs, "stage2_vist.py"), "--config.trainer.mesh.data=2",
                  "--config.trainer.mesh.fsdp=2", "--config.trainer.mesh.tensor=2"])
