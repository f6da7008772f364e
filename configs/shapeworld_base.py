"""Pretraining of the ShapeWorld base model (``python -m customjax.shapeworld.pretrain``).

Variants: ``cpu`` (completes on a 2-core CPU), ``gpu`` (the same architecture, longer: minutes on
one GPU), ``test`` (micro models and a few steps of every stage, for the tests).

    python -m customjax.shapeworld.pretrain --config configs/shapeworld_base.py:cpu --workdir runs/base
    python -m customjax.shapeworld.pretrain --config configs/shapeworld_base.py:cpu --config.init=runs/base/model ...  # train on
"""

import ml_collections


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
    if variant not in ("cpu", "gpu", "test"):
        raise ValueError(f"unknown variant {variant!r}; choose cpu, gpu or test")
    gpu = variant == "gpu"
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 0
    c.size = 64
    # init: a model folder written by this command (e.g. customjax/shapeworld/assets/shapeworld_base) to continue from:
    # its tokenizer, VAE and CLIP are kept, its UNet trains on for unet.steps more steps (customjax/shapeworld/pretrain/lineage.py).
    c.init = ""
    c.pool = 60_000 if gpu else 40_000   # training scenes rendered once
    c.tokenizer = dict(captions=20_000, max_merges=2000, model_max_length=32)
    c.vae = ml_collections.ConfigDict(dict(
        # 8 latent channels: at 1000 steps, reconstructions of held-out scenes had their category right
        # 0.73 of the time against 0.68 with 4 channels, and their colour 0.83 against 0.69.
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=8,
        kl_weight=1e-4, object_weight=4.0, steps=12_000 if gpu else 5000, batch=8, lr=1e-3, warmup=100))
    c.clip = ml_collections.ConfigDict(dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, patch_size=8,
        projection_dim=64, steps=6000 if gpu else 2000, batch=64, lr=1e-3, warmup=100,
        # hard_negatives (NegCLIP: each caption with one category or position changed) did not teach this
        # CLIP those words in 2000 steps (held-out renders: the true caption beat the category-swapped one
        # 0.63 of the time, 0.64 without), so it is off.
        hard_negatives=False,
        # token_weight: each word's final state names its own token beside InfoNCE (pretrain/clip.py). Without
        # it the tower's layers erased category and position words (a swapped word moved the last hidden state
        # by 0.23 / 0.14 of its norm; with it 1.30 / 1.18), and the whole cpu run drew positions at 0.985
        # instead of 0.22 (sizes 0.93 vs 0.645, colours 0.595 vs 0.385; categories still at chance).
        token_weight=1.0))
    c.unet = ml_collections.ConfigDict(dict(
        block_out_channels=(32, 64, 64), layers_per_block=1, heads=(2, 4, 4), norm_num_groups=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        # Cross-attention also at 16 x 16 (SD's placement) did not draw shapes either in a 2000-step probe
        # (category 0.14 vs 0.11, position 0.12 vs 0.16) and trained 1.6x slower, so it stays at 8 x 8 and 4 x 4.
        # The first CPU run (SD's scaled-linear betas, epsilon, 3000 steps) learnt little at high noise.
        # At 16 x 16 latents SD's terminal SNR leaks the image mean (the background) through the noise
        # (Lin et al. 2024): a cosine schedule (zero terminal SNR) with v prediction and "trailing"
        # timesteps (sampling starts at t = 999) removes the leak; EMA weights are sampled.
        prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing",
        # object_weight w: the squared error on latent pixels that objects cover counts 1 + w times. In a
        # 2000-step probe on 4-channel latents w = 4 did worse than w = 0 on 100 held-out prompts
        # (background 0.56 vs 0.95, category 0.22 vs 0.26, colour 0.09 vs 0.16), so it is off.
        # train_text trains the text tower, from the CLIP's, with the UNet, as LDM's tau_theta (Eq. 3): the
        # contrastive CLIP's tower keeps little of the category and position words. A whole cpu run with it
        # drew colours better (0.48 vs 0.385) but category no better (0.135 vs 0.145), so it is off.
        train_text=False,
        # Outlines are learnt late: a class-only probe (README ShapeWorld > Status, training_budget_probe) drew
        # categories at chance up to ~200k training samples and 0.505 at 960k, still rising. The cpu preset's
        # 288k samples are below that onset (category 0.14); the shipped base is this run continued twice with
        # init=the previous folder, unet.decay=1.0, unet.steps=20000 then 22000 (768k samples: category 0.645;
        # 1296k: 0.86; README ShapeWorld > Status).
        # The gpu preset trains on 2.9M (batch 96), its learning rate scaled
        # with the square root of the batch (the probe's 2e-3 trained this UNet at batch 96 without trouble for
        # 600 steps: docs/shapeworld/base_experiments.json, gpu_preset_learning_rate).
        p_uncond=0.1, object_weight=0.0, steps=30_000 if gpu else 12_000, batch=96 if gpu else 24,
        lr=1e-3 if gpu else 5e-4,
        warmup=200, ema=0.999,
        decay=0.1))     # the learning rate falls (cosine) to decay x lr by the last step; 1.0 keeps it constant
    c.eval = ml_collections.ConfigDict(dict(prompts=200, steps=25, guidance=5.0, sampler="ddim", batch=50, grid=16))
    if variant == "test":
        c.size, c.pool = 32, 64
        c.tokenizer.captions = 200
        c.vae.update(dict(block_out_channels=(8, 16, 16), norm_num_groups=4, steps=4, batch=4))
        c.clip.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           projection_dim=16, steps=4, batch=4, hard_negatives=True, token_weight=1.0))
        c.unet.update(dict(block_out_channels=(16, 32), heads=(2, 2), norm_num_groups=8,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), object_weight=1.0, train_text=True,
                           ground_weight=1.0, steps=4, batch=4))
        c.eval.update(dict(prompts=4, steps=2, batch=4, grid=4))
    return c
