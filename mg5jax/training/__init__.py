"""Training: `optimizer` (trainable rules, AdamW, schedule), `checkpoint` (orbax), `trainer` (the loop)."""
