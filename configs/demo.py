"""The built-in demo: a tiny MiniGPT-5 trained from scratch on synthetic VIST stories, on a CPU.

`make demo` first builds the tiny hub-layout weights and the data under outputs/demo
(`python -m mg5jax.tiny --root outputs/demo`), then runs
`python train.py --config configs/demo.py`, then `python infer.py --config configs/demo.py` on a prompts
file it writes (`mg5jax/demo.py` has the exact flags).
The models are random and tiny, so the pictures only show that every stage runs end to end.
"""

from configs import base

ROOT = "outputs/demo"


def get_config():
    c = base.get_config()
    c.model.llm_path = f"{ROOT}/weights/llm"
    c.model.sd_path = f"{ROOT}/weights/sd"
    c.model.vision.kind = "blip2"  # tiny transformers BLIP-2 directory (4 query tokens, 32 px input)
    c.model.vision.blip2_dir = f"{ROOT}/weights/blip2"
    c.model.vision.proj_path = ""
    c.model.frozen_dtype = "float32"  # tiny models: no reason to round them
    c.model.compute_dtype = "float32"
    c.model.remat_llm = False
    c.model.remat_unet = False
    c.model.mapper.enc_layers = 2
    c.model.mapper.dec_layers = 2
    c.model.mapper.heads = 4
    c.model.mapper.ff = 128
    c.loss.caption_weight = 0.0  # VIST has no captions
    c.loss.cfg_drop = 0.1
    c.data.kind = "vist"
    c.data.train_path = f"{ROOT}/data/VIST/train_cleaned.json"
    c.data.val_path = f"{ROOT}/data/VIST/val_cleaned.json"
    c.data.per_device_batch_size = 8
    c.data.effective_batch_size = 8
    c.data.length_buckets = (64, 128, 160)
    c.data.input_image_size = 32
    c.data.output_image_size = 64
    c.trainer.workdir = f"{ROOT}/run"
    c.trainer.num_steps = 300  # micro-steps (a few minutes on 2 cores)
    c.trainer.log_every = 10
    c.trainer.save_every = 150
    c.trainer.eval_every = 150
    c.trainer.sample_every = 150  # stories from the current weights in run/samples/step_<NNNNNN>/
    c.trainer.mesh.data = -1
    c.trainer.mesh.fsdp = 1  # tiny models: plain data parallelism
    c.trainer.optimizer.learning_rate = 3e-3  # tiny models learn fast; the original uses 2e-5
    c.trainer.optimizer.warmup_steps = 20
    c.trainer.optimizer.total_steps = 300
    # The demo's LLM is random, not a pretrained Vicuna: train all of it (and the whole mapper, as
    # no stage-1 run precedes the demo) so the tiny model learns to tell stories with vokens.
    c.model.lora.enabled = False
    c.model.train_new_rows_only = False
    c.trainer.optimizer.trainable = (
        (r"llm\..*", 1.0),
        (r"mapper\..*", 1.0),
    )
    c.val_batches = 2
    return c
