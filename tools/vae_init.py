"""Start an SD-layout `AutoencoderKL` as the plainest autoencoder there is: 8x8 block averages.

Trained from random weights on this CPU, builtin:tiny's VAE reached only 15 dB in 1,600 steps
and lost most colours, while averaging each 8x8 block and scaling back up (nearest) already
gives 22.6 dB on the same drawings. These weights make the VAE compute exactly that before
training starts, so training only has to add what averaging loses (edges, the 4th latent).

How, inside the stock architecture (nothing here changes a layer, so diffusers loads the
result as any AutoencoderKL):
- Every residual block starts as the identity (its last conv zeroed); 1x1 shortcuts and
  resampling convs pass channels through; each encoder downsampler averages 2x2.
- The colour travels in channels 0-2, its negative in 3-5, and channel 6 holds a large
  constant, the carrier. GroupNorm normalizes over the whole image, which would otherwise make
  each pixel's colour depend on the rest of the picture; with the negated copy the channel
  mean is the carrier's alone, and the carrier dominates the variance, so the two GroupNorms on
  the main path (before each `conv_out`) become fixed affine maps, which `conv_out` undoes.
- Those norms' shift puts SiLU's input near 8, where SiLU is the identity within 0.2 %.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn

CARRIER = 20.0
SILU_SHIFT = 8.0
COLOURS = 3
CARRIER_CHANNEL = 2 * COLOURS
USED_CHANNELS = CARRIER_CHANNEL + 1

Pairs = list[tuple[int, int, float]]  # (output channel, input channel, weight)


def _copy_channels(conv: nn.Conv2d, pairs: Pairs, bias: dict[int, float] | None = None) -> None:
    """A conv that only copies input channels to output channels (its centre tap)."""
    conv.weight.zero_()
    centre = conv.kernel_size[0] // 2
    for output, input_, weight in pairs:
        conv.weight[output, input_, centre, centre] = weight
    if conv.bias is not None:
        conv.bias.zero_()
        for channel, value in (bias or {}).items():
            conv.bias[channel] = value


def _identity(channels: int) -> Pairs:
    return [(channel, channel, 1.0) for channel in range(channels)]


# Colour in 0-2, its negative in 3-5.
_COLOUR_AND_NEGATIVE = _identity(COLOURS) + [(COLOURS + c, c, -1.0) for c in range(COLOURS)]


def _pass_through(block: nn.Module) -> None:
    """Residual blocks that add nothing (conv2 zeroed: the branch learns from zero, as in
    zero-initialized residual nets) and shortcuts that keep the channels in use."""
    for resnet in block.resnets:
        resnet.conv2.weight.zero_()
        resnet.conv2.bias.zero_()
        if resnet.conv_shortcut is not None:
            _copy_channels(resnet.conv_shortcut, _identity(USED_CHANNELS))


def _undo_norm(norm: nn.GroupNorm, conv_out: nn.Conv2d, outputs: int) -> None:
    """The closing GroupNorm + SiLU + conv_out give back channels 0..outputs-1 unchanged:
    with the carrier, the norm's mean is CARRIER / width and its std fixed to within 0.1 %."""
    width = norm.num_channels
    mean = CARRIER / width
    std = (CARRIER**2 / width - mean**2) ** 0.5
    norm.weight.fill_(1.0)
    norm.bias.zero_()
    norm.bias[:outputs] = SILU_SHIFT
    _copy_channels(
        conv_out,
        [(c, c, std) for c in range(outputs)],
        dict.fromkeys(range(outputs), mean - SILU_SHIFT * std),
    )


@torch.no_grad()
def start_as_block_average(vae: AutoencoderKL, log_std: float = -8.0) -> None:
    """Encode to the 8x8 block averages of R, G, B (latent 4 zero), decode by nearest
    upscaling; the posterior's std starts at exp(log_std / 2) (narrow: a wide one would drown
    the means in noise, and the decoder would learn to ignore them)."""
    encoder, decoder = vae.encoder, vae.decoder
    _copy_channels(encoder.conv_in, _COLOUR_AND_NEGATIVE, {CARRIER_CHANNEL: CARRIER})
    for block in encoder.down_blocks:
        _pass_through(block)
        for downsampler in block.downsamplers or []:
            conv = downsampler.conv  # stride 2 over rows/columns 2i..2i+2: average 2i, 2i+1
            conv.weight.zero_()
            conv.bias.zero_()
            for channel in range(conv.in_channels):
                conv.weight[channel, channel, :2, :2] = 0.25
    _pass_through(encoder.mid_block)
    _undo_norm(encoder.conv_norm_out, encoder.conv_out, COLOURS)
    encoder.conv_out.bias[vae.config.latent_channels :] = log_std
    _copy_channels(vae.quant_conv, _identity(vae.quant_conv.in_channels))
    _copy_channels(vae.post_quant_conv, _identity(vae.post_quant_conv.in_channels))

    _copy_channels(decoder.conv_in, _COLOUR_AND_NEGATIVE, {CARRIER_CHANNEL: CARRIER})
    _pass_through(decoder.mid_block)
    for block in decoder.up_blocks:
        _pass_through(block)
        for upsampler in block.upsamplers or []:
            _copy_channels(upsampler.conv, _identity(upsampler.conv.in_channels))
    _undo_norm(decoder.conv_norm_out, decoder.conv_out, COLOURS)
