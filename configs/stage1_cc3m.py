"""Stage 1 on CC3M captions: train the new voken rows, fc, the mapper and its queries (REFERENCE §5.1).

    python train.py --config configs/stage1_cc3m.py --config.data.train_path=datasets/CC3M/cc3m_train.tsv
"""

from configs import base


def get_config():
    c = base.get_config()
    c.data.kind = "cc3m"
    c.data.train_path = "datasets/CC3M/cc3m_train.tsv"
    c.data.val_path = "datasets/CC3M/cc3m_val.tsv"
    c.data.length_buckets = (64, 128)  # captions and the instruction template are short
    c.data.max_input_images = 0  # CC3M has no input images: no image slots, no padding positions for them
    c.model.vision.kind = "none"  # no <ImageHere> in CC3M: the ViT is never needed
    c.loss.caption_weight = 0.1  # CC3M samples all have captions
    c.trainer.workdir = "runs/stage1_cc3m"
    c.evals_per_epoch = 4  # as the original's val_check_interval = 0.25
    c.val_batches = None  # the whole validation set, as the original
    c.trainer.optimizer.trainable = (
        (r"llm\.model\.embed_tokens\..*", 1.0),  # only the 9 new rows move (update mask)
        (r"llm\.lm_head\..*", 1.0),
        (r"mapper\.(fc_in|fc_out)\..*", 10.0),  # fc at 10× lr
        (r"mapper\.(encoder|decoder)\..*", 10.0),  # llm_to_t2i_mapping at 10× lr
        (r"mapper\.decoder_queries", 10.0),  # t2i_decoder_prompt at 10× lr
    )
    return c
