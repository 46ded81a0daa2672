"""A tiny Stable-Diffusion-3-architecture pipeline with seeded random weights, built in about a
second: what the tests run batchgen's SD3 loop on, against diffusers'
`StableDiffusion3Img2ImgPipeline`. Not shipped: its pixels mean nothing, only that batchgen's
are diffusers'.

It has SD3's whole structure at tiny widths: two CLIP text encoders with projections, of
different widths (their pooled embeddings concatenated), a T5 encoder whose width the CLIP
embeddings are padded to, an MMDiT (`SD3Transformer2DModel`), a 16-channel VAE with SD3's
scaling and shift factors and its 8x downsampling, and flow-matching Euler with SD3's shift of
3. The CLIP tokenizer is builtin:tiny's; the T5 tokenizer is built here over a small vocabulary.
Run as a script it writes the folder: `python tools/tiny_sd3.py OUT`.
"""

from __future__ import annotations

import argparse
import shutil
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from batchgen.models.source import BUILTIN_DIR

SEED = 0
TINY = BUILTIN_DIR / "tiny"
# Unequal widths, as SD3's 768 and 1280 (the same as tiny_sdxl.py's).
CLIP_WIDTHS = (32, 48)
# Wider than the CLIP embeddings together (80), as T5-XXL's 4096 is than 2048: the pipeline
# zero-pads the CLIP embeddings to T5's width, and a narrower T5 would crop them instead.
T5_WIDTH = 128
HEADS, HEAD_DIM = 4, 8  # the transformer's inner width, 32 (SD3 medium: 24 x 64)
# Words of the tests' prompts, whole in the T5 vocabulary; any other word falls back to letters.
T5_WORDS = (
    "fire",
    "cheery",
    "open",
    "photograph",
    "smoke",
    "blurry",
    "oil",
    "painting",
    "of",
    "a",
    "red",
    "square",
)


def _clip_text_encoder(width: int) -> CLIPTextModelWithProjection:
    tokenizer = CLIPTokenizer.from_pretrained(TINY, subfolder="tokenizer")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=3,  # clip_skip 1 reaches the first layer's output
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=width,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config)


def _t5_tokenizer() -> T5TokenizerFast:
    """T5's own construction (Unigram, Metaspace, `</s>` appended) over a small vocabulary."""
    # T5's layout: <pad> 0, </s> 1, <unk> 2. Whole words score above their spellings, so the
    # Unigram model picks them; letters, digits and punctuation, with and without the word-start
    # marker, let every other ASCII word tokenize to something other than <unk>.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + word, -1.0) for word in T5_WORDS]
    vocab += [(char, -3.0) for char in string.ascii_letters + string.digits + string.punctuation]
    vocab += [("▁" + char, -3.5) for char in string.ascii_letters + string.digits]
    # No sentinel tokens: nothing here decodes. 512 as T5's, above max_sequence_length's 256.
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def _t5_text_encoder(vocab_size: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=T5_WIDTH,
        d_ff=2 * T5_WIDTH,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1's, as SD3's T5-XXL
        dropout_rate=0.0,  # T5's 0.1 would make a model left in training mode random
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def tiny_sd3() -> StableDiffusion3Img2ImgPipeline:
    """The pipeline, the same weights on every call."""
    torch.manual_seed(SEED)
    text_encoder = _clip_text_encoder(CLIP_WIDTHS[0])
    text_encoder_2 = _clip_text_encoder(CLIP_WIDTHS[1])
    tokenizer_3 = _t5_tokenizer()
    text_encoder_3 = _t5_text_encoder(len(tokenizer_3))
    transformer = SD3Transformer2DModel(
        # The pipeline's default size is sample_size x the VAE's 8: 64 pixels.
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=HEADS * HEAD_DIM,  # the context joins the image tokens' attention
        pooled_projection_dim=sum(CLIP_WIDTHS),
        pos_embed_max_size=32,  # patches a side: images up to 512 pixels
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # Four blocks downsample three times: 8x, as SD3's VAE.
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=16,
        sample_size=64,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    tokenizer = CLIPTokenizer.from_pretrained(TINY, subfolder="tokenizer")
    pipeline = StableDiffusion3Img2ImgPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        image_encoder=None,
        feature_extractor=None,
    )
    # Inference mode, as `from_pretrained` leaves them: built models start in training mode,
    # where T5-style dropout would make this pipeline's output differ from the saved folder's.
    for module in (text_encoder, text_encoder_2, text_encoder_3, transformer, vae):
        module.eval()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def write_tiny_sd3(folder: Path) -> Path:
    """The pipeline saved as a diffusers folder (safetensors), as `save_pretrained` writes it."""
    if folder.exists():
        shutil.rmtree(folder)
    tiny_sd3().save_pretrained(folder, safe_serialization=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    print(write_tiny_sd3(args.output))


if __name__ == "__main__":
    main()
