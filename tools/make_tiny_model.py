"""The architecture of the built-in model `builtin:tiny` and the writer of its folder.

A Stable Diffusion 1.x-shaped img2img pipeline (UNet, VAE, CLIP text encoder and tokenizer,
PNDM scheduler) with tiny widths: it runs in milliseconds on a CPU, so tests and examples
exercise the real diffusers code paths without downloading a checkpoint. The tokenizer is
trained here by a deterministic BPE on a fixed word list; the text encoder keeps its seeded
random weights; the VAE and UNet are trained by tools/train_tiny.py (`make tiny-model`), which
builds them from here and writes the folder with `write_model`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "batchgen" / "builtin" / "tiny"

SEED = 0
TEXT_HIDDEN_SIZE = 32  # also the UNet's cross-attention width
MAX_PROMPT_TOKENS = 77  # CLIP's context length, as in every SD 1.x checkpoint
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# Words the tokenizer learns whole, so prompts tokenize into words rather than letters: the
# vocabulary of typical img2img prompts (subjects, colours, shapes, media, styles, lighting).
TOKENIZER_CORPUS = """
a an the of and with in on at by for to from over under near into
fire open cheery flame flames smoke ember burning campfire fireplace candle torch
photograph photo picture painting drawing sketch illustration render portrait landscape
oil watercolor watercolour acrylic pencil charcoal ink pastel digital canvas paper
red orange yellow green blue purple violet pink brown black white gray grey gold silver
cyan magenta teal beige dark light bright pale deep vivid colorful colourful
circle square triangle rectangle star heart hexagon sphere cube cone cylinder pyramid
line lines dot dots stripe stripes shape shapes pattern grid spiral wave waves
cat dog bird horse fish tree trees flower flowers forest mountain mountains river lake
sea ocean sky cloud clouds sun moon rain snow city street house castle garden field beach
man woman child girl boy person people face eyes hand robot car ship boat train
sunset sunrise night day morning evening winter summer autumn spring storm fog mist
detailed highly realistic photorealistic cinematic dramatic lighting soft sharp focus
beautiful epic fantasy surreal abstract minimalist vintage retro modern futuristic
style art artwork artist trending masterpiece quality best high resolution hd
warm cold cozy glowing glow shadow shadows reflection texture rough smooth
small large big tiny huge old new wooden stone metal glass water
blurry lowres ugly bad worst deformed noise noisy jpeg artifacts
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters, in CLIP's order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shifted)
            shifted += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def train_bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE on the word list until every word is one symbol.

    Ties go to the alphabetically first pair, so the merges never depend on dict or hash
    order. Symbols are byte-level characters, the last one of a word carrying `</w>`, exactly
    as CLIP's pre-tokenizer and BPE model will see them.
    """
    byte_chars = bytes_to_unicode()
    spelled: list[list[str]] = []
    for word in dict.fromkeys(words):  # dedupe, keep order
        symbols = [byte_chars[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        spelled.append(symbols)

    merges: list[tuple[str, str]] = []
    while True:
        pair_counts = Counter(
            pair for symbols in spelled for pair in zip(symbols, symbols[1:], strict=False)
        )
        if not pair_counts:
            return merges
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        for symbols in spelled:
            i = 0
            while i < len(symbols) - 1:
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
                i += 1


def build_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer: any text tokenizes (bytes are the fallback)."""
    merges = train_bpe_merges(TOKENIZER_CORPUS.split())
    # CLIP's layout: the 256 byte characters, the same with `</w>`, one token per merge,
    # then the two special tokens.
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [char + END_OF_WORD for char in byte_chars]
    tokens += [left + right for left, right in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    # tokenizers 0.23 takes merges as (left, right) tuples only, whatever the annotation says.
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MAX_PROMPT_TOKENS,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    torch.manual_seed(SEED)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        hidden_act="quick_gelu",  # as OpenAI's CLIP ViT-L/14 in SD 1.x
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # the pooled output is taken at this token
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_vae() -> AutoencoderKL:
    torch.manual_seed(SEED)
    # Four blocks give SD's 8x downsampling (each block but the last halves the size). No
    # attention in the mid block: the VAE is all convolutions, so it trains on crops and
    # works at any size. `scaling_factor` is measured on the training data when it is saved.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 48, 64, 64),
        layers_per_block=1,
        # One group: GroupNorm over all channels keeps the colour of a flat region (as the
        # pattern across channels); SD's 32 groups of a few channels would normalize it away.
        norm_num_groups=1,
        latent_channels=4,
        sample_size=256,
        scaling_factor=0.18215,
        mid_block_add_attention=False,
    )


def build_unet() -> UNet2DConditionModel:
    torch.manual_seed(SEED)
    return UNet2DConditionModel(
        sample_size=8,  # latent size: the pipeline's default output is 64 px
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=8,
    )


def build_scheduler() -> PNDMScheduler:
    # Stable Diffusion 1.x's scheduler_config.json.
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )


def build_pipeline(
    vae: AutoencoderKL | None = None, unet: UNet2DConditionModel | None = None
) -> StableDiffusionImg2ImgPipeline:
    """The pipeline around the given (trained) VAE and UNet; random ones where not given."""
    tokenizer = build_tokenizer()
    return StableDiffusionImg2ImgPipeline(
        vae=vae if vae is not None else build_vae(),
        text_encoder=build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=unet if unet is not None else build_unet(),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_model(output: Path, pipeline: StableDiffusionImg2ImgPipeline, model_card: str) -> None:
    """Write the folder next to `output` first, then swap it in: no half-written model."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".tiny-") as staging:
        staged = Path(staging) / output.name
        pipeline.save_pretrained(staged, safe_serialization=True)
        (staged / "README.md").write_text(model_card, encoding="utf-8")
        # safetensors files come out 0600 (written via a private temp file); package data
        # must be readable by everyone who installs it.
        for path in staged.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        if output.exists():
            shutil.rmtree(output)
        staged.rename(output)
