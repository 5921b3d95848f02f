"""Stage 2 on VIST stories: LoRA on q/v, the voken rows and the mapper transformer; fc and the
decoder queries stay as stage 1 left them (REFERENCE §5.1).

    python train.py --config configs/stage2_vist.py --config.model.init_from=runs/stage1_cc3m
"""

from configs import base


def get_config():
    c = base.get_config()
    c.data.kind = "vist"
    c.data.train_path = "datasets/VIST/train_cleaned.json"
    c.data.val_path = "datasets/VIST/val_cleaned.json"
    c.model.lora.enabled = True
    c.model.init_from = "runs/stage1_cc3m"  # stage-1 run (or stage1_cc3m.ckpt): voken rows, fc, mapper, queries
    c.loss.caption_weight = 0.0  # VIST samples have no caption
    # 2 × 8 v5e chips × 3 accumulation = 48, the original's per-GPU batch of 2 (any device count divides
    # into loss groups of 2): stage 2's 1180 positions with 5 input images plan 7.3 GiB of the 16 (54% free;
    # 6 per chip: 14.0 GiB, 12% free)
    c.data.per_device_batch_size = 2
    c.trainer.workdir = "runs/stage2_vist"
    c.evals_per_epoch = 2  # as the original's val_check_interval = 0.5
    c.val_batches = None  # the whole validation set, as the original
    c.trainer.optimizer.trainable = (
        (r"llm\..*\.lora_[ab]", 1.0),  # LoRA adapters
        (r"llm\.model\.embed_tokens\..*", 1.0),  # only the 9 new rows move (update mask)
        (r"llm\.lm_head\..*", 1.0),
        (r"mapper\.(encoder|decoder)\..*", 1.0),  # llm_to_t2i_mapping at 1× lr
        (r"mapper\..*", None),  # fc and the decoder queries are frozen
    )
    return c
