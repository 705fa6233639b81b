"""Tiny, randomly initialised diffusers pipelines built from configuration, with nothing downloaded.

The tests and notebook 06 run the pipeline tasks on these: the same classes as the real models
(``StableDiffusion3Pipeline``, ``StableDiffusionPipeline``), a few thousand parameters each, images of
16 x 16 pixels (latents ``[C, 8, 8]``: the tiny VAE downsamples by 2, the real ones by 8).

The tokenizers are built offline from a hand-written vocabulary: ``CLIPTokenizer`` with one BPE merge
chain per word of ``WORDS`` (a word outside it falls back to its letters). SD3's third text encoder
(T5) is left out (``text_encoder_3=None``): the pipeline then feeds zeros in its place, as diffusers
documents for running SD3 without T5.
"""
from __future__ import annotations

import torch

WORDS = ("a photo of an the cat dog bird fish red blue green yellow small big on in table grass sky "
         "painting drawing digit one two three four five six seven eight nine zero").split()
TOKENS = 16  # CLIP's context length here (77 in the real models)
RESOLUTION = 16  # pixels


def clip_tokenizer(words=WORDS, max_length: int = TOKENS):
    """A ``CLIPTokenizer`` whose vocabulary is the letters plus ``words`` (merged left to right)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _clip_text(seed: int, vocab_size: int, hidden: int = 16, projection: int | None = None, with_projection: bool = True):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=TOKENS, projection_dim=projection or hidden,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _vae(seed: int, latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8),
                         layers_per_block=1, norm_num_groups=4, sample_size=RESOLUTION,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         **extra).eval()


def tiny_sd3_pipeline(seed: int = 0):
    """A ``StableDiffusion3Pipeline``: one joint block (16 latent channels, patch 2), two tiny CLIP
    text encoders (hidden 16 each, so the pooled projection is 32), no T5, a 2x VAE, SD3.5's scheduler
    config (flow matching, shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=RESOLUTION // 2, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8,
                                        dual_attention_layers=(), qk_norm="rms_norm")
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed + 1, 16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_clip_text(seed + 2, len(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=_clip_text(seed + 3, len(tokenizer)), tokenizer_2=clip_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)


def tiny_sd_pipeline(seed: int = 0):
    """A ``StableDiffusionPipeline`` (SD-v1 layout): a two-level conditional UNet with cross-attention
    (4 latent channels), a tiny CLIP text encoder, a 2x VAE, SD-v1's scheduler betas (scaled_linear,
    0.00085 to 0.012) in a ``DDIMScheduler``; no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=16,
                                attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=_vae(seed + 1, 4, scaling_factor=0.18215), text_encoder=_clip_text(seed + 2, len(tokenizer), with_projection=False),
                                   tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
