"""Stage 2 on MMDialog conversations: same trainable set as stage 2 on VIST (REFERENCE §5.1, §6.5).

    python train.py --config configs/stage2_mmdialog.py --config.model.init_from=runs/stage1_cc3m
"""

from configs import stage2_vist


def get_config():
    c = stage2_vist.get_config()
    c.data.kind = "mmdialog"
    c.data.train_path = "datasets/MMDialog/train/train_conversations.txt"
    c.data.val_path = "datasets/MMDialog/test/test_conversations.txt"
    c.trainer.workdir = "runs/stage2_mmdialog"
    return c
