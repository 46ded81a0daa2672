"""Generate the weightless SD 1.5, 2.x and SDXL configs in batchgen/builtin/configs/.

`from_single_file` needs a local diffusers folder to know each component's architecture
(offline it would otherwise ask the hub). These folders are that: model_index.json, the
UNet/VAE/text-encoder/scheduler configs and the CLIP tokenizer, no weights. The component
configs are diffusers'/transformers' own classes saved with SD's published architecture values,
so every default is the library's.

The CLIP BPE tokenizer files are not downloadable here, so they are rebuilt from the BPE merges
file that OpenAI's CLIP ships (MIT) and open_clip redistributes in its wheel (MIT), exactly as
CLIP's `SimpleTokenizer` builds its vocabulary:

    pip download --no-deps open_clip_torch -d /tmp/oc
    python tools/make_sd_configs.py --bpe /tmp/oc/open_clip_torch-*.whl

`--bpe` takes the wheel or the extracted `bpe_simple_vocab_16e6.txt.gz`. Re-running writes
identical files for the same diffusers/transformers versions.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from make_tiny_model import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, bytes_to_unicode
from transformers import CLIPTextConfig

from batchgen.models.source import CLIP_BPE_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "batchgen" / "builtin" / "configs"
BPE_IN_WHEEL = "open_clip/bpe_simple_vocab_16e6.txt.gz"

VOCAB_SIZE = 49408  # 256 bytes + 256 bytes with </w> + 48894 merges + 2 special tokens
MERGES = VOCAB_SIZE - 256 * 2 - 2
MAX_PROMPT_TOKENS = 77

# Both SD generations share the VAE and the UNet's outer geometry.
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}
SD_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def sd15() -> dict[str, Any]:
    """runwayml/stable-diffusion-v1-5: OpenAI CLIP ViT-L/14 text encoder, PNDM, epsilon."""
    return {
        "unet": {**SD_UNET, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
        "vae": {**SD_VAE, "sample_size": 512},
        "text_encoder": CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=MAX_PROMPT_TOKENS,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=VOCAB_SIZE - 2,
            eos_token_id=VOCAB_SIZE - 1,
            pad_token_id=VOCAB_SIZE - 1,
        ),
        "scheduler": PNDMScheduler(**SD_SCHEDULER, skip_prk_steps=True, prediction_type="epsilon"),
        "pad_token": EOS_TOKEN,
    }


def sd2() -> dict[str, Any]:
    """stabilityai/stable-diffusion-2 (768-v): OpenCLIP ViT-H/14 text encoder without its last
    layer (23 of 24), linear attention projections, DDIM with v-prediction. SD 2.1 needs the
    attention upcast to fp32 (NaNs in fp16 otherwise); for 2.0 the upcast only costs time."""
    return {
        "unet": {
            **SD_UNET,
            "sample_size": 96,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        "vae": {**SD_VAE, "sample_size": 768},
        "text_encoder": CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=MAX_PROMPT_TOKENS,
            hidden_act="gelu",
            projection_dim=512,
            bos_token_id=VOCAB_SIZE - 2,
            eos_token_id=VOCAB_SIZE - 1,
            pad_token_id=0,
        ),
        "scheduler": DDIMScheduler(
            **SD_SCHEDULER, clip_sample=False, prediction_type="v_prediction"
        ),
        # OpenCLIP pads with token 0 ("!"), not with <|endoftext|>: SD 2's tokenizer does too.
        "pad_token": "!",
    }


def sd2_base() -> dict[str, Any]:
    """stabilityai/stable-diffusion-2-base and 2.1-base: the 2.x architecture at 512 px with
    epsilon prediction. Its tensors have the shapes of 768-v's, so a checkpoint cannot say which
    it is: the recipe's `config: sd2-base` does."""
    spec = sd2()
    return {
        **spec,
        "unet": {**spec["unet"], "sample_size": 64},
        "vae": {**spec["vae"], "sample_size": 512},
        # Its scheduler config is SD 1.x's (PNDM, epsilon): a recipe's sampler is built from
        # it, so only the betas and the prediction type matter.
        "scheduler": PNDMScheduler(**SD_SCHEDULER, skip_prk_steps=True, prediction_type="epsilon"),
    }


def _open_clip_big_g() -> CLIPTextConfig:
    """SDXL's second text encoder: OpenCLIP ViT-bigG/14, all 32 layers, with its projection."""
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        hidden_act="gelu",
        projection_dim=1280,
        bos_token_id=VOCAB_SIZE - 2,
        eos_token_id=VOCAB_SIZE - 1,
        pad_token_id=0,
    )


SDXL_UNET = {
    **SD_UNET,
    "sample_size": 128,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
}


def sdxl_base() -> dict[str, Any]:
    """stabilityai/stable-diffusion-xl-base-1.0: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14,
    a three-level UNet conditioned on both (768 + 1280) plus the pooled bigG embedding and six
    time ids (1280 + 6 × 256 = 2816), Euler, epsilon, 1024 px; its VAE's scaling 0.13025."""
    clip_l = sd15()["text_encoder"]
    return {
        "unet": {
            **SDXL_UNET,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [320, 640, 1280],
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "projection_class_embeddings_input_dim": 2816,
        },
        "vae": {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoders": {"text_encoder": clip_l, "text_encoder_2": _open_clip_big_g()},
        "scheduler": EulerDiscreteScheduler(
            **{k: v for k, v in SD_SCHEDULER.items() if k != "set_alpha_to_one"},
            prediction_type="epsilon",
        ),
        "pad_tokens": {"tokenizer": EOS_TOKEN, "tokenizer_2": "!"},
        "pipeline": {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False},
    }


def sdxl_refiner() -> dict[str, Any]:
    """stabilityai/stable-diffusion-xl-refiner-1.0: OpenCLIP ViT-bigG/14 only, a four-level
    UNet 384 wide conditioned on it (1280), the pooled embedding and five time ids with the
    aesthetic score (1280 + 5 × 256 = 2560)."""
    base = sdxl_base()
    return {
        **base,
        "unet": {
            **SDXL_UNET,
            "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"],
            "block_out_channels": [384, 768, 1536, 1536],
            "transformer_layers_per_block": 4,
            "attention_head_dim": [6, 12, 24, 24],
            "cross_attention_dim": 1280,
            "projection_class_embeddings_input_dim": 2560,
        },
        "text_encoders": {"text_encoder_2": base["text_encoders"]["text_encoder_2"]},
        "pad_tokens": {"tokenizer_2": "!"},
        "pipeline": {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True},
    }


MODEL_INDEX = {
    "_class_name": "StableDiffusionImg2ImgPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", None],  # filled with the scheduler's class
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def read_bpe_merges(bpe: Path) -> list[str]:
    """CLIP's merges, "left right" per line, from the wheel or the .txt.gz."""
    if bpe.suffix == ".whl":
        with zipfile.ZipFile(bpe) as wheel:
            data = wheel.read(BPE_IN_WHEEL)
    else:
        data = bpe.read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    return lines[1 : MERGES + 1]  # line 0 is "#version: 0.2"; CLIP keeps the first 48894


def clip_vocab(merges: list[str]) -> dict[str, int]:
    """CLIP's SimpleTokenizer vocabulary, in its order."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [char + END_OF_WORD for char in byte_chars]
    tokens += [merge.replace(" ", "") for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"built {len(vocab)} tokens, CLIP has {VOCAB_SIZE}: wrong BPE file?")
    return vocab


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_clip_bpe(folder: Path, merges: list[str]) -> None:
    """CLIP's vocabulary and merges, once for every config (1.6 MB; batchgen.loading's
    `load_tokenizer` gives them to a shipped config's tokenizer)."""
    folder.mkdir(parents=True)
    write_json(folder / "vocab.json", clip_vocab(merges))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )


def write_tokenizer(folder: Path, pad_token: str) -> None:
    """What differs between the configs' tokenizers: the special tokens."""
    folder.mkdir(parents=True)
    special_tokens = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": pad_token,
        "unk_token": EOS_TOKEN,
    }
    write_json(folder / "special_tokens_map.json", special_tokens)
    write_json(
        folder / "tokenizer_config.json",
        {
            **special_tokens,
            "model_max_length": MAX_PROMPT_TOKENS,
            "tokenizer_class": "CLIPTokenizer",
        },
    )


def write_config(folder: Path, spec: dict[str, Any]) -> None:
    # Built on the meta device: the configs come out with every diffusers default filled in,
    # without allocating a billion parameters.
    with init_empty_weights():
        UNet2DConditionModel(**spec["unet"]).save_config(folder / "unet")
        AutoencoderKL(**spec["vae"]).save_config(folder / "vae")
    spec["scheduler"].save_config(folder / "scheduler")
    if "text_encoders" not in spec:  # SD 1.x/2.x: one encoder
        spec["text_encoder"].architectures = ["CLIPTextModel"]
        spec["text_encoder"].save_pretrained(folder / "text_encoder")
        write_tokenizer(folder / "tokenizer", spec["pad_token"])
        model_index = {**MODEL_INDEX, "scheduler": ["diffusers", type(spec["scheduler"]).__name__]}
        write_json(folder / "model_index.json", model_index)
        return
    model_index = {
        **XL_MODEL_INDEX,
        **spec["pipeline"],
        "scheduler": ["diffusers", type(spec["scheduler"]).__name__],
    }
    for name, config in spec["text_encoders"].items():
        architecture = XL_TEXT_ENCODERS[name]
        config.architectures = [architecture]
        config.save_pretrained(folder / name)
        tokenizer = name.replace("text_encoder", "tokenizer")
        write_tokenizer(folder / tokenizer, spec["pad_tokens"][tokenizer])
        model_index[name] = ["transformers", architecture]
        model_index[tokenizer] = ["transformers", "CLIPTokenizer"]
    write_json(folder / "model_index.json", model_index)


XL_TEXT_ENCODERS = {
    "text_encoder": "CLIPTextModel",
    "text_encoder_2": "CLIPTextModelWithProjection",
}
XL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLImg2ImgPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "text_encoder": [None, None],
    "text_encoder_2": [None, None],
    "tokenizer": [None, None],
    "tokenizer_2": [None, None],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


README = """\
# Stable Diffusion component configs (no weights)

`sd15/`, `sd2/`, `sd2-base/`, `sdxl-base/` and `sdxl-refiner/` are diffusers pipeline folders
without weights: the architecture of Stable Diffusion 1.x (CLIP ViT-L/14, PNDM, epsilon), 2.x
768-v (OpenCLIP ViT-H/14 with 23 layers, DDIM, v-prediction), 2.x base (the same at 512 px,
epsilon), SDXL 1.0 base (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, Euler) and its refiner
(bigG only, aesthetic-score conditioning).
batchgen hands one of them to diffusers' `from_single_file` as `config=` when `model:` is a
single `.safetensors`/`.ckpt` file, so that diffusers never asks the hub for configs: `sd15` or
`sd2` as the tensor shapes say, `sdxl-base` or `sdxl-refiner` as the text encoders' tensor names
say, or the recipe's `config:` (2.x base and 768-v have the same shapes). Their `tokenizer/`
folders hold only the special tokens: CLIP's vocabulary and merges, the same for all, are in
`clip-bpe/` once. Generated by
`tools/make_sd_configs.py`; do not edit by hand.

## Licences

- The configs are architecture values (numbers and class names) written by batchgen through
  diffusers (Apache-2.0) and transformers (Apache-2.0).
- `clip-bpe/vocab.json` and `merges.txt` are derived from CLIP's BPE file
  `bpe_simple_vocab_16e6.txt.gz`: Copyright (c) 2021 OpenAI, MIT licence
  (https://github.com/openai/CLIP/blob/main/LICENSE), as redistributed in the open_clip_torch
  wheel on PyPI, Copyright (c) 2012-2021 Gabriel Ilharco, Mitchell Wortsman, Nicholas Carlini,
  Rohan Taori, Achal Dave, Vaishaal Shankar, John Miller, Hongseok Namkoong, Hannaneh
  Hajishirzi, Ali Farhadi, Ludwig Schmidt, MIT licence. Both MIT licences ask that the
  copyright notice and this permission notice be included:

  Permission is hereby granted, free of charge, to any person obtaining a copy of this software
  and associated documentation files (the "Software"), to deal in the Software without
  restriction, including without limitation the rights to use, copy, modify, merge, publish,
  distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
  Software is furnished to do so, subject to the following conditions:

  The above copyright notice and this permission notice shall be included in all copies or
  substantial portions of the Software.

  THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
  INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR
  PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR
  ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE,
  ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
  SOFTWARE.
"""


def write_configs(output: Path, bpe: Path) -> None:
    """Write next to `output` first, then swap it in: no half-written configs."""
    merges = read_bpe_merges(bpe)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".configs-") as staging:
        staged = Path(staging) / output.name
        specs = {
            "sd15": sd15(),
            "sd2": sd2(),
            "sd2-base": sd2_base(),
            "sdxl-base": sdxl_base(),
            "sdxl-refiner": sdxl_refiner(),
        }
        for name, spec in specs.items():
            write_config(staged / name, spec)
        write_clip_bpe(staged / CLIP_BPE_DIR.name, merges)
        (staged / "README.md").write_text(README, encoding="utf-8")
        for path in staged.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        if output.exists():
            shutil.rmtree(output)
        staged.rename(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bpe", type=Path, required=True, help="open_clip_torch wheel or bpe_simple_vocab_16e6"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    write_configs(args.output, args.bpe)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
