"""Model weights written in the original (CompVis / AUTOMATIC1111 / SGM) single-file layout:
the inverse of diffusers' single_file_utils converters, for any SD- or SDXL-shaped block layout,
so that the tests can make single-file checkpoints of the tiny models and check that batchgen
loads them back to the same weights. (The same tables as diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py, which hard-codes SD 1.x's blocks.)"""

from __future__ import annotations

from typing import Any

import torch

UNET_RESNET_PARTS = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
VAE_ATTENTION_PARTS = [
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
]


def _rename(key: str, prefixes: list[tuple[str, str]]) -> tuple[str, str | None]:
    """`key` with its longest matching diffusers prefix swapped for the original one."""
    matches = [(old, new) for old, new in prefixes if key.startswith(old)]
    if not matches:
        return key, None
    old, new = max(matches, key=lambda pair: len(pair[0]))
    return new + key.removeprefix(old), old


def unet_to_original(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    layers = config.layers_per_block
    prefixes = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.resnets.1.", "middle_block.2."),
        # SDXL's added conditioning (pooled text embedding and time ids)
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
    ]
    for i, up_type in enumerate(config.up_block_types):
        for j in range(layers):
            block = (layers + 1) * i + j + 1
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0."))
            prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1."))
        down = f"input_blocks.{(layers + 1) * (i + 1)}.0.op."
        prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", down))
        for j in range(layers + 1):
            block = (layers + 1) * i + j
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0."))
            prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1."))
        upsampler = 2 if "CrossAttn" in up_type else 1
        up = f"output_blocks.{(layers + 1) * i + layers}.{upsampler}."
        prefixes.append((f"up_blocks.{i}.upsamplers.0.", up))
    original = {}
    for key, tensor in state.items():
        new_key, prefix = _rename(key, prefixes)
        if prefix and "resnets" in prefix:
            for old, new in UNET_RESNET_PARTS:
                new_key = new_key.replace(f".{old}.", f".{new}.")
        original["model.diffusion_model." + new_key] = tensor
    return original


def vae_to_original(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    blocks, layers = len(config.block_out_channels), config.layers_per_block
    prefixes = []
    for part in ("encoder", "decoder"):
        prefixes.append((f"{part}.conv_norm_out.", f"{part}.norm_out."))
        prefixes.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
        for j in range(2):
            prefixes.append((f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}."))
    for i in range(blocks):
        for j in range(layers):
            prefixes.append(
                (f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.")
            )
        for j in range(layers + 1):
            up = f"decoder.up.{blocks - 1 - i}.block.{j}."
            prefixes.append((f"decoder.up_blocks.{i}.resnets.{j}.", up))
        downsample = f"encoder.down.{i}.downsample."
        prefixes.append((f"encoder.down_blocks.{i}.downsamplers.0.", downsample))
        upsample = f"decoder.up.{blocks - 1 - i}.upsample."
        prefixes.append((f"decoder.up_blocks.{i}.upsamplers.0.", upsample))
    original = {}
    for key, tensor in state.items():
        new_key, prefix = _rename(key, prefixes)
        new_key = new_key.replace(".conv_shortcut.", ".nin_shortcut.")
        if prefix and prefix.endswith("attentions.0."):
            for old, new in VAE_ATTENTION_PARTS:
                new_key = new_key.replace(f".{old}", f".{new}")
            if tensor.ndim == 2:  # the original attention projections are 1x1 convolutions
                tensor = tensor[:, :, None, None]
        original[new_key] = tensor
    return original


def text_encoder_to_original(
    state: dict[str, torch.Tensor], prefix: str = "cond_stage_model.transformer."
) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model as the original files keep it (SD 1.x; SDXL's first)."""
    return {
        prefix + (key if key.startswith("text_model.") else "text_model." + key): tensor
        for key, tensor in state.items()
    }


OPEN_CLIP_LAYER_PARTS = [
    ("text_model.encoder.layers.", "transformer.resblocks."),
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
    (".self_attn.out_proj.", ".attn.out_proj."),
]
OPEN_CLIP_OUTSIDE_LAYERS = {
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def open_clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection as OpenCLIP keeps it (SDXL's bigG encoder): q, k and v in
    one `in_proj`, the projection as a matrix applied on the right."""
    state = {
        (key if key.startswith(("text_model.", "text_projection")) else "text_model." + key): t
        for key, t in state.items()
    }
    original = {prefix + "text_projection": state.pop("text_projection.weight").T}
    for key, ldm_key in OPEN_CLIP_OUTSIDE_LAYERS.items():
        original[prefix + ldm_key] = state.pop(key)
    for key in [key for key in state if ".self_attn.q_proj." in key]:
        kind = key.rsplit(".", 1)[-1]  # weight or bias
        parts = [state.pop(key.replace(".q_proj.", f".{name}_proj.")) for name in "qkv"]
        layer = key.split(".self_attn.")[0] + ".self_attn."
        state[layer + f"in_proj_{kind}"] = torch.cat(parts)
    for key, tensor in state.items():
        for old, new in OPEN_CLIP_LAYER_PARTS:
            key = key.replace(old, new)
        original[prefix + key.replace(".self_attn.in_proj_", ".attn.in_proj_")] = tensor
    return original
