"""Settings shared by every MiniGPT-5 run; each stage config starts from `get_config()` here.

Values are the original's (REFERENCE §1, §4, §5) unless a comment says otherwise.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42  # data order, template choice, initialisation and per-step rng

    # --- the model: where the pretrained parts live and how they are held -------------------------
    c.model = ml_collections.ConfigDict()
    c.model.llm_path = "weights/vicuna-7b"  # hub-layout LLaMA dir (config.json, safetensors/.bin, tokenizer.model)
    c.model.sd_path = "weights/stable-diffusion-2-1-base"  # diffusers dir: unet/ vae/ text_encoder/ tokenizer/ scheduler/
    c.model.vision = ml_collections.ConfigDict()
    c.model.vision.kind = "lavis"  # "lavis" (the three .pth files), "blip2" (transformers dir) or "none" (features only)
    c.model.vision.vit_path = "weights/eva_vit_g.pth"  # LAVIS EVA ViT-g state dict
    c.model.vision.qformer_path = "weights/blip2_pretrained_flant5xxl.pth"  # BLIP-2 stage checkpoint (ln_vision, Q-Former)
    # MiniGPT-4 checkpoint (llama_proj); with kind="blip2", "" keeps the BLIP-2 directory's language_projection
    c.model.vision.proj_path = "weights/prerained_minigpt4_7b.pth"
    c.model.vision.blip2_dir = ""  # transformers BLIP-2 directory, for kind="blip2"
    c.model.num_vokens = 8  # generative vokens [IMG0]…[IMG7]
    c.model.frozen_dtype = "bfloat16"  # storage dtype of frozen weights (LLM body, U-Net, VAE, ViT, CLIP text)
    c.model.compute_dtype = "bfloat16"  # matmul/conv dtype of the frozen parts; norms and softmax stay fp32
    # the LLM's residual stream: fp32 as under the original's autocast; "bfloat16" would let stage 2 take
    # 6 samples per v5e chip (13.2 instead of 14.0 GiB of 16; python -m mg5jax.plan)
    c.model.residual_dtype = "float32"
    c.model.attn_impl = "reference"  # "reference" (einsum) or "fused" (jax.nn.dot_product_attention)
    c.model.int8_weights = False  # inference: the LLM's and the ViT's layer projections in int8 with per-column
    #                               scales (half of bf16; lets generation fit one 16 GiB chip); training ignores it
    c.model.remat_llm = True  # recompute LLM layers in the backward pass (saves activation memory)
    c.model.remat_llm_policy = ""  # with remat_llm: a jax.checkpoint_policies name whose saved values are kept
    c.model.remat_unet = True  # recompute U-Net blocks in the backward pass
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.enabled = False  # stage 2 turns LoRA on
    c.model.lora.targets = r"(^|\.)(q_proj|v_proj)$"  # LLM projections that get adapters
    c.model.lora.rank = 8  # r
    c.model.lora.alpha = 16  # scale = alpha / r
    c.model.lora.dropout = 0.05  # dropout on the adapter input during training
    c.model.mapper = ml_collections.ConfigDict()
    c.model.mapper.enc_layers = 4  # nn.Transformer encoder layers
    c.model.mapper.dec_layers = 4  # nn.Transformer decoder layers
    c.model.mapper.heads = 8  # attention heads (torch default)
    c.model.mapper.ff = 4096  # feed-forward width
    c.model.train_new_rows_only = True  # embed_tokens / lm_head: only the added voken rows change (and hold Adam state)
    c.model.init_from = ""  # seeds the trainable params (stage 2): our stage-1 run dir or the official stage1_cc3m.ckpt

    # --- the objective -----------------------------------------------------------------------------
    c.loss = ml_collections.ConfigDict()
    c.loss.text_weight = 0.01  # × LLM cross-entropy
    c.loss.image_weight = 1.0  # × latent-diffusion loss
    c.loss.caption_weight = 0.1  # × caption MSE (stage 1 only; 0 disables it)
    c.loss.cfg_drop = 0.1  # probability of zeroing a voken group (classifier-free guidance)
    c.loss.snr_gamma = 5.0  # min-SNR-γ weighting of the latent loss (None: plain MSE)
    c.loss.groups_per_sample = 1  # voken groups read per sample (the original uses one)
    c.loss.group_rows = 2  # rows averaged as one loss, then averaged over such groups: the original's per-GPU
    #                        batch of 2 under DDP (0 = one mean over the whole batch)

    # --- data --------------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.kind = "vist"  # "cc3m", "vist" or "mmdialog"
    c.data.train_path = ""  # the reader's file: cc3m *.tsv, VIST *_cleaned.json, MMDialog *.jsonl / .txt
    c.data.val_path = ""  # same format; "" = no validation
    c.data.per_device_batch_size = 6  # examples per device per micro-step: 6 x 8 v5e chips = 48, the original's
    #                                   effective batch with no accumulation (stage 1; stage 2 takes 2 × 3 steps;
    #                                   `python -m mg5jax.plan` checks the fit)
    c.data.effective_batch_size = 48  # per_device × devices × accumulation (accumulation is derived)
    c.data.length_buckets = (256, 512, 1024)  # text-token buckets (source + target, no BOS)
    c.data.max_input_images = 5  # <ImageHere> slots per example
    c.data.input_image_size = 224  # ViT input
    c.data.output_image_size = 512  # SD target images
    c.data.shuffle = True  # the original does not shuffle; set False to reproduce its order
    c.data.strict = False  # True: a bad row or image is an error instead of a logged skip
    c.data.fix_img7_mask = False  # True: also mask [IMG7] from the text loss (the original supervises it)
    c.data.input_features_dir = ""  # precomputed [32, D_llm] .npy per input image, used instead of the ViT
    #                                 (python -m mg5jax.encode_images --blip2-dir …; model.vision.kind="none"
    #                                 then skips loading it)
    c.data.output_moments_dir = ""  # precomputed VAE moments [8, 64, 64] .npy per target image, used instead
    #                                 of the VAE encoder (python -m mg5jax.encode_images --vae …)
    c.data.val_input_features_dir = ""  # the same for the validation images ("" = input_features_dir)
    c.data.val_output_moments_dir = ""  # the same for the validation targets ("" = output_moments_dir)

    # --- the loop ----------------------------------------------------------------------------------
    c.trainer = ml_collections.ConfigDict()
    c.trainer.workdir = "runs/minigpt5"  # checkpoints/, best/, samples/, metrics.jsonl, tensorboard/ go here
    c.trainer.seed = c.get_ref("seed")  # per-step rngs (noise, timesteps, CFG drops, dropout)
    c.trainer.num_steps = ml_collections.config_dict.placeholder(int)  # micro-steps; None = num_epochs passes
    c.trainer.log_every = 10  # steps per metrics line
    c.trainer.save_every = 500  # steps between checkpoints
    c.trainer.keep_checkpoints = 2  # newest checkpoints kept
    c.trainer.async_checkpointing = True  # write checkpoints in the background
    c.trainer.eval_every = 500  # steps between validation passes (0 = never); evals_per_epoch overrides it
    c.trainer.sample_every = 0  # steps between sample generations into <workdir>/samples/ (0 = never)
    c.trainer.tensorboard = True  # metrics also as TensorBoard events in <workdir>/tensorboard/
    c.trainer.deterministic = True  # GPU: deterministic XLA ops, so a resume is bit-exact (False: faster steps)
    # -1 takes the remaining devices. FSDP over all of them: the 7B LLM, SD and the ViT-g do not fit replicated
    # in a 16 GiB chip; sharded 8 ways they take 2.3 GiB per chip
    c.trainer.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.trainer.optimizer = ml_collections.ConfigDict()
    c.trainer.optimizer.learning_rate = 2e-5  # base lr
    c.trainer.optimizer.b1 = 0.9  # AdamW first-moment decay
    c.trainer.optimizer.b2 = 0.999  # AdamW second-moment decay
    c.trainer.optimizer.eps = 1e-8  # AdamW denominator epsilon (the original's torch default)
    c.trainer.optimizer.weight_decay = 0.01  # on trainable params only (never on the old vocab rows)
    c.trainer.optimizer.warmup_steps = 1000  # linear warmup from 0, then linear decay to 0
    # optimizer steps of the lr schedule; None = what the run makes (from num_steps if set, else num_epochs)
    c.trainer.optimizer.total_steps = ml_collections.config_dict.placeholder(int)
    c.trainer.optimizer.grad_clip_norm = ml_collections.config_dict.placeholder(float)  # None = no clipping
    c.trainer.optimizer.grad_accum_steps = ml_collections.config_dict.placeholder(int)  # None = derived
    c.trainer.optimizer.trainable = ()  # ordered (regex over param paths, lr multiplier | None)
    c.num_epochs = 2  # passes over the training data when num_steps is None
    c.evals_per_epoch = ml_collections.config_dict.placeholder(int)  # set: trainer.eval_every from the data
    c.val_batches = ml_collections.FieldReference(8, field_type=int)  # batches per validation pass; None = all
    c.sample_prompts = 2  # validation prompts generated every trainer.sample_every steps
    return c
