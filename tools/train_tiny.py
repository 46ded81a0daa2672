"""Train `builtin:tiny`'s VAE and a small denoising UNet on this CPU, then write the model.

The training pictures are drawn here, seeded: flat-coloured shapes with outlines, gradients,
brick-like line patterns, strokes and text in Pillow's built-in font (Aileron, CC0), the kind
of drawing in recipes/pictures/. Nothing is downloaded.

Phases, each seeded, each resuming from its own checkpoint under --work-dir:
  vae    AutoencoderKL (SD layout: 4 latent channels, 8x down), starting as 8x8 block
         averages (vae_init.py), on 64 px crops of 256 px drawings (the drawings at their
         real scale); loss MSE + 0.1 x (L1 + L1 on image gradients) + 1e-6 KL; AdamW, warm-up
         then cosine decay. Every `eval_every` steps: PSNR of the
         decoded posterior mean on held-out 256 px drawings (another seed) and on
         recipes/pictures/fire-drawing.png, into vae-psnr.csv.
  unet   UNet2DConditionModel as an epsilon predictor on the VAE's latents of 256 px drawings,
         conditioned through the (frozen, untrained) CLIP text encoder on captions such as
         "red circle" (10% empty, for classifier-free guidance).
  write  the pipeline folder (tools/make_tiny_model.py's layout) with the trained weights, the
         VAE's scaling_factor measured on the data as SD does (1 / std of the latents), the
         model card, and the training curve as docs/tiny-model/vae-psnr.png.

    python tools/train_tiny.py [--phase all|vae|unet|write] [--output DIR]

One torch thread (results change in the last bits with the thread count). On a 2-core machine
shared with other work, the default settings take about 35 minutes.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import make_tiny_model as tiny
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image, ImageDraw, ImageFont
from vae_init import start_as_block_average

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORK_DIR = REPO_ROOT / "build" / "tiny-training"
DOCS_DIR = REPO_ROOT / "docs" / "tiny-model"
FIRE_DRAWING = REPO_ROOT / "recipes" / "pictures" / "fire-drawing.png"

PICTURE_SIZE = 256
THREADS = 1  # also the fastest on a shared machine: no OpenMP threads spinning on each other
TRAIN_SEED = 1
HELD_OUT_SEED = 2  # held-out pictures come from another stream of the same generator
HELD_OUT_COUNT = 8


@dataclass(frozen=True)
class VaeSettings:
    steps: int = 2000  # the length of the learning-rate schedule
    stop: int = 2000  # where training stops
    batch: int = 8  # crops per step, 2 from each of batch/2 fresh pictures
    crop: int = 64
    # Low: training starts from block averages (22.5 dB, see vae_init.py) and a high rate
    # first undoes what they give (trial runs, 100 steps in: 17.8 dB at 1.5e-3, 21.0 at 2e-4).
    lr: float = 2e-4
    min_lr: float = 1e-5
    warmup: int = 100
    # MSE (what PSNR measures) leads; a little L1 on pixels and their gradients keeps
    # outlines sharp.
    detail_weight: float = 0.1
    kl_weight: float = 1e-6
    eval_every: int = 50


@dataclass(frozen=True)
class UnetSettings:
    steps: int = 700
    batch: int = 24
    crop: int = 16  # latent crops: 128 px of a 256 px drawing
    pool: int = 256  # pictures encoded once, then cropped and flipped at random
    lr: float = 2e-3
    min_lr: float = 5e-5
    warmup: int = 50
    caption_dropout: float = 0.1
    log_every: int = 50


# Named colours, so that a picture's caption can say what it shows.
COLOURS = {
    "red": (200, 40, 35),
    "orange": (240, 130, 30),
    "yellow": (245, 210, 50),
    "green": (50, 150, 60),
    "blue": (40, 80, 200),
    "purple": (120, 50, 160),
    "pink": (240, 140, 180),
    "brown": (120, 70, 40),
    "black": (25, 25, 25),
    "white": (245, 245, 240),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star")
WORDS = tiny.TOKENIZER_CORPUS.split()


def jitter(colour: tuple[int, int, int], rng: np.random.Generator, amount: int = 30) -> tuple:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    if rng.random() < 0.5:
        return jitter(COLOURS[rng.choice(list(COLOURS))], rng, 45)
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def star_points(cx: float, cy: float, radius: float, turn: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        angle = turn + k * math.pi / 5
        points.append((cx + r * math.sin(angle), cy - r * math.cos(angle)))
    return points


def draw_shape(pen: ImageDraw.ImageDraw, shape: str, box: tuple, fill: tuple, outline, width):
    x0, y0, x1, y1 = box
    if shape == "circle":
        pen.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "square":
        pen.rectangle(box, fill=fill, outline=outline, width=width)
    elif shape == "triangle":
        pen.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill, outline=outline)
    else:
        cx, cy, radius = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        pen.polygon(star_points(cx, cy, radius, 0.0), fill=fill, outline=outline)


def background(rng: np.random.Generator) -> Image.Image:
    first = np.array(random_colour(rng), dtype=np.float32)
    if rng.random() < 0.6:
        return Image.new("RGB", (PICTURE_SIZE, PICTURE_SIZE), tuple(int(v) for v in first))
    second = np.array(random_colour(rng), dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:PICTURE_SIZE, 0:PICTURE_SIZE] / (PICTURE_SIZE - 1)
    ramp = np.cos(angle) * x + np.sin(angle) * y
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min() + 1e-6)
    pixels = first + (second - first) * ramp[..., None]
    return Image.fromarray(pixels.astype(np.uint8))


def draw_picture(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A 256 px drawing and its caption ("<colour> <shape>" of its main shape)."""
    image = background(rng)
    pen = ImageDraw.Draw(image)
    size = PICTURE_SIZE

    if rng.random() < 0.25:  # bricks, tiles or stripes: many thin lines, as in the fireplace
        x0, y0 = rng.integers(0, size // 2, 2)
        x1, y1 = x0 + rng.integers(size // 4, size), y0 + rng.integers(size // 4, size)
        pen.rectangle((x0, y0, x1, y1), fill=random_colour(rng))
        line = random_colour(rng)
        pitch, width = int(rng.integers(10, 30)), int(rng.integers(1, 4))
        for row, y in enumerate(range(y0, y1, pitch)):
            pen.line((x0, y, x1, y), fill=line, width=width)
            for x in range(x0 + (row % 2) * pitch, x1, 2 * pitch):
                pen.line((x, y, x, y + pitch), fill=line, width=width)

    colour_name = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    extent = rng.integers(size // 3, size * 9 // 10)
    cx, cy = rng.integers(extent // 2, size - extent // 2 + 1, 2)
    box = (cx - extent // 2, cy - extent // 2, cx + extent // 2, cy + extent // 2)
    outline = random_colour(rng) if rng.random() < 0.6 else None
    draw_shape(pen, shape, box, jitter(COLOURS[colour_name], rng), outline, int(rng.integers(1, 6)))

    for _ in range(rng.integers(1, 9)):
        kind = rng.random()
        fill = random_colour(rng)
        if kind < 0.45:
            extent = int(rng.integers(8, size // 2))
            x0, y0 = rng.integers(-extent // 2, size, 2)
            box = (x0, y0, x0 + extent * rng.uniform(0.5, 2), y0 + extent * rng.uniform(0.5, 2))
            box = (box[0], box[1], max(box[0] + 1, box[2]), max(box[1] + 1, box[3]))
            outline = random_colour(rng) if rng.random() < 0.5 else None
            draw_shape(pen, str(rng.choice(SHAPES)), box, fill, outline, int(rng.integers(1, 5)))
        elif kind < 0.65:  # a flame-like polygon
            sides = rng.integers(3, 8)
            corners = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(sides)]
            pen.polygon(corners, fill=fill)
        elif kind < 0.85:  # strokes
            points = np.cumsum(rng.normal(0, 25, (int(rng.integers(2, 7)), 2)), axis=0)
            points += rng.integers(0, size, 2)
            pen.line([tuple(p) for p in points], fill=fill, width=int(rng.integers(1, 8)))
        else:
            font = ImageFont.load_default(size=int(rng.integers(12, 48)))
            text = " ".join(rng.choice(WORDS, int(rng.integers(1, 3))))
            corner = tuple(int(v) for v in rng.integers(0, size - 40, 2))
            pen.text(corner, text, fill=fill, font=font)
    return image, f"{colour_name} {shape}"


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Pictures as a batch in [-1, 1], as the pipeline's image processor gives them."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def held_out_pictures() -> torch.Tensor:
    rng = np.random.default_rng(HELD_OUT_SEED)
    return to_tensor([draw_picture(rng)[0] for _ in range(HELD_OUT_COUNT)])


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of 8-bit-range images, averaged over the batch (both in [-1, 1])."""
    error = ((reconstruction.clamp(-1, 1) - target) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / error)).mean())


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Encode, decode the posterior mean (not a sample), one picture at a time."""
    vae.eval()
    decoded = torch.cat(
        [vae.decode(vae.encode(image[None]).latent_dist.mode()).sample for image in images]
    )
    vae.train()
    return psnr(decoded, images)


def learning_rate(step: int, steps: int, lr: float, min_lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def random_crops(images: torch.Tensor, crop: int, rng: np.random.Generator) -> torch.Tensor:
    crops = []
    for image in images:
        for _ in range(2):
            y, x = rng.integers(0, PICTURE_SIZE - crop + 1, 2)
            crops.append(image[:, y : y + crop, x : x + crop])
    return torch.stack(crops)


def edge_l1(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical image gradients: keeps outlines sharp."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(reconstruction), dx(target)) + F.l1_loss(dy(reconstruction), dy(target))


def train_vae(work_dir: Path, settings: VaeSettings) -> AutoencoderKL:
    checkpoint_path = work_dir / "vae.pt"
    curve_path = work_dir / "vae-psnr.csv"
    vae = tiny.build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.lr, weight_decay=1e-4)
    rng = np.random.default_rng(TRAIN_SEED)
    start = 0
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=False)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
    else:
        torch.manual_seed(TRAIN_SEED)
        start_as_block_average(vae)
        curve_path.write_text("step,seconds,loss,held_out_psnr,fire_drawing_psnr\n")
    if start >= settings.stop:
        return vae

    held_out = held_out_pictures()
    fire = to_tensor([Image.open(FIRE_DRAWING).convert("RGB")])
    if start == 0:  # the block averages' own score: where training starts from
        with curve_path.open("a") as curve:
            curve.write(
                f"0,0,,{reconstruction_psnr(vae, held_out):.2f},"
                f"{reconstruction_psnr(vae, fire):.2f}\n"
            )
    vae.train()
    started, running_loss = time.perf_counter(), 0.0
    for step in range(start, settings.stop):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(
                step, settings.steps, settings.lr, settings.min_lr, settings.warmup
            )
        pictures = to_tensor([draw_picture(rng)[0] for _ in range(settings.batch // 2)])
        batch = random_crops(pictures, settings.crop, rng)
        batch = torch.where(torch.rand(len(batch), 1, 1, 1) < 0.5, batch, batch.flip(-1))
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = (
            F.mse_loss(reconstruction, batch)
            + settings.detail_weight
            * (F.l1_loss(reconstruction, batch) + edge_l1(reconstruction, batch))
            + settings.kl_weight * posterior.kl().mean()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        running_loss += loss.item()

        done = step + 1
        if done % 10 == 0:
            print(f"vae step {done} ({time.perf_counter() - started:.0f} s)", flush=True)
        if done % settings.eval_every == 0 or done == settings.stop:
            held_out_psnr = reconstruction_psnr(vae, held_out)
            fire_psnr = reconstruction_psnr(vae, fire)
            seconds = time.perf_counter() - started
            with curve_path.open("a") as curve:
                curve.write(
                    f"{done},{seconds:.0f},{running_loss / settings.eval_every:.5f},"
                    f"{held_out_psnr:.2f},{fire_psnr:.2f}\n"
                )
            print(
                f"vae step {done}/{settings.steps} loss {running_loss / settings.eval_every:.4f}"
                f" held-out {held_out_psnr:.2f} dB fire {fire_psnr:.2f} dB ({seconds:.0f} s)",
                flush=True,
            )
            running_loss = 0.0
            state = {
                "model": vae.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "step": done,
            }
            torch.save(state, checkpoint_path.with_suffix(".tmp"))
            checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)
    return vae


def load_vae(work_dir: Path) -> AutoencoderKL:
    vae = tiny.build_vae()
    vae.load_state_dict(torch.load(work_dir / "vae.pt", weights_only=False)["model"])
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL) -> float:
    """SD's recipe: 1 / std of the (sampled) latents of training pictures."""
    torch.manual_seed(TRAIN_SEED)
    rng = np.random.default_rng(TRAIN_SEED + 100)
    pictures = to_tensor([draw_picture(rng)[0] for _ in range(64)])
    latents = torch.cat([vae.encode(p[None]).latent_dist.sample() for p in pictures])
    return round(1 / float(latents.std()), 5)


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, count: int, scaling_factor: float):
    """Latent means (scaled) and captions of `count` fresh training pictures."""
    rng = np.random.default_rng(TRAIN_SEED + 200)
    latents, captions = [], []
    for _ in range(count):
        image, caption = draw_picture(rng)
        latents.append(vae.encode(to_tensor([image])).latent_dist.mode() * scaling_factor)
        captions.append(caption)
    return torch.cat(latents), captions


def train_unet(work_dir: Path, settings: UnetSettings) -> UNet2DConditionModel:
    checkpoint_path = work_dir / "unet.pt"
    unet = tiny.build_unet()
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=False)
        unet.load_state_dict(state["model"])
        if state["step"] >= settings.steps:
            return unet
    vae = load_vae(work_dir)
    scaling_factor = measure_scaling_factor(vae)
    pool_path = work_dir / "latent-pool.pt"
    if pool_path.exists():
        latents, captions = torch.load(pool_path, weights_only=False)
    else:
        latents, captions = encode_pool(vae, settings.pool, scaling_factor)
        torch.save((latents, captions), pool_path)

    tokenizer = tiny.build_tokenizer()
    text_encoder = tiny.build_text_encoder(tokenizer).eval().requires_grad_(False)
    vocabulary = sorted(set(captions)) + [""]
    with torch.no_grad():
        tokens = tokenizer(
            vocabulary,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        embeddings = text_encoder(tokens)[0]
    caption_index = torch.tensor([vocabulary.index(c) for c in captions])
    empty_index = len(vocabulary) - 1

    noise_scheduler = DDPMScheduler.from_config(tiny.build_scheduler().config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(TRAIN_SEED)
    start = 0
    if checkpoint_path.exists():
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start = state["step"]
    unet.train()
    started, running_loss = time.perf_counter(), 0.0
    earlier_seconds = state["seconds"] if checkpoint_path.exists() else 0.0
    for step in range(start, settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(
                step, settings.steps, settings.lr, settings.min_lr, settings.warmup
            )
        picks = torch.randint(0, len(latents), (settings.batch,), generator=generator)
        y, x = torch.randint(0, latents.shape[-1] - settings.crop + 1, (2,), generator=generator)
        clean = latents[picks, :, y : y + settings.crop, x : x + settings.crop]
        flip = torch.rand(settings.batch, 1, 1, 1, generator=generator) < 0.5
        clean = torch.where(flip, clean.flip(-1), clean)
        text = caption_index[picks].clone()
        drop = torch.rand(settings.batch, generator=generator) < settings.caption_dropout
        text[drop] = empty_index
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (settings.batch,), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=embeddings[text]).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        running_loss += loss.item()
        done = step + 1
        if done % settings.log_every == 0 or done == settings.steps:
            seconds = time.perf_counter() - started
            print(
                f"unet step {done}/{settings.steps} loss {running_loss / settings.log_every:.4f}"
                f" ({seconds:.0f} s)",
                flush=True,
            )
            running_loss = 0.0
            state = {
                "model": unet.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "step": done,
                "seconds": earlier_seconds + seconds,
            }
            torch.save(state, checkpoint_path.with_suffix(".tmp"))
            checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)
    return unet


MODEL_CARD = """\
# builtin:tiny

A Stable Diffusion 1.x-shaped img2img pipeline, small enough to run in milliseconds on a CPU
at 64-128 px, trained on this repository's own drawings so that img2img **visibly works**:
strength 0.4 keeps a drawing's layout, 0.7 departs further from it, 1.0 ignores it. It is a
teaching and testing model, not an image generator: it knows flat-coloured shapes, outlines,
bricks, strokes and a little text, and nothing else (no photographs, faces, scenes).

## Components

- `vae`: `AutoencoderKL` in SD's layout (4 latent channels, 8x downsampling), channels
  32/48/64/64, no mid-block attention. **Trained.** Encode -> decode (posterior mean) reaches
  {held_out_psnr:.1f} dB PSNR on {held_out_count} held-out 256 px drawings and {fire_psnr:.1f} dB
  on `recipes/pictures/fire-drawing.png` (never trained on). `scaling_factor` {scaling_factor}
  is 1 / std of its latents on training drawings, measured the way SD measured 0.18215.
- `unet`: `UNet2DConditionModel`, channels 32/64, cross-attention on the text encoder.
  {unet_note}
- `text_encoder`: a 2-layer CLIP text model of width 32 with **random weights**, frozen: the
  UNet learned to read its random but fixed embeddings.
- `tokenizer`: a byte-level BPE CLIP tokenizer (77 tokens) trained on a few hundred prompt
  words, so it tokenizes words rather than letters.
- `scheduler`: SD 1.x's PNDM config.

Weights are float32 safetensors. No safety checker or feature extractor.

## Training data

Only pictures drawn by `tools/train_tiny.py` itself, seeded: backgrounds (flat or two-colour
gradients), a main shape (circle, square, triangle, star) in a named colour, brick and tile
line patterns, flame-like polygons, strokes, and words in Pillow's built-in font (Aileron,
CC0, shipped inside Pillow). Nothing is downloaded. Held-out pictures come from another seed.

## Training

VAE: it starts as the plainest autoencoder, 8x8 block averages of R, G, B scaled back up
(nearest), built from the stock layers by `tools/vae_init.py` ({init_psnr:.1f} dB on the held-out
drawings before any step), then trains {vae_steps} steps on 8 random 64 px crops (2 from each
of 4 fresh 256 px drawings, so the drawings are at their real scale): loss MSE + 0.1 x (L1 +
L1 of image gradients) + 1e-6 KL, AdamW (lr 2e-4, 100 warm-up steps, cosine to 1e-5),
gradient clipping 1.0. The PSNR curve is `docs/tiny-model/vae-psnr.png`. UNet: {unet_steps}
steps of 24 random 16x16 latent crops at uniform DDPM timesteps, AdamW (lr 2e-3, 50 warm-up
steps, cosine to 5e-5). One CPU thread; on a 2-core machine shared with other work this took
about {minutes} minutes in all.

## Limits

- Round trips keep layout, flat colours and outlines; lines one or two pixels thin (brick
  mortar) and small text come back blurred, which is why the fire drawing scores lower than
  the held-out drawings. An earlier version trained from random weights reached only 15 dB in
  1,600 steps, its colours collapsed onto a few; starting from block averages sidesteps that
  (why it happened was not found out).
- The UNet had about ten minutes of CPU: it removes noise toward smooth regions, which is
  enough for img2img to keep a drawing's layout at strength 0.4 and depart further at 0.7,
  but it draws nothing recognisable from pure noise, and prompts have no visible effect.

## Regenerate

    make tiny-model        # runs: python tools/train_tiny.py  (trains: about 35 minutes)

Every phase is seeded, so re-running gives the same weights for the same torch/diffusers/
transformers versions (one torch thread). Checkpoints go to `build/tiny-training/`; an
interrupted run resumes from them.
"""

UNET_NOTE = "**Trained** {unet_steps} steps as a noise predictor: see Training and Limits."


def plot_curve(curve_path: Path, image_path: Path) -> None:
    """PSNR by step (held-out drawings and the fire drawing) as a small PNG line chart."""
    with curve_path.open() as curve:
        rows = list(csv.DictReader(curve))
    steps = [int(row["step"]) for row in rows]
    series = {
        "held-out drawings (256 px)": ([float(r["held_out_psnr"]) for r in rows], (40, 80, 200)),
        "fire-drawing.png": ([float(r["fire_drawing_psnr"]) for r in rows], (220, 90, 30)),
    }
    width, height, left, bottom, top, right = 640, 400, 60, 40, 60, 20
    low = math.floor(min(min(values) for values, _ in series.values()) / 2) * 2
    high = max(24, math.ceil(max(max(values) for values, _ in series.values()) / 2) * 2)
    image = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)

    def point(step: int, value: float) -> tuple[float, float]:
        x = left + (width - left - right) * step / max(steps)
        y = height - bottom - (height - top - bottom) * (value - low) / max(1, high - low)
        return x, y

    for db in range(low, high + 1, 2):
        pen.line([point(0, db), point(max(steps), db)], fill=(225, 225, 225))
        pen.text((8, point(0, db)[1] - 7), f"{db} dB", fill="black", font=font)
    for step in range(0, max(steps) + 1, 500):
        x, _ = point(step, low)
        pen.text((x - 10, height - bottom + 6), str(step), fill="black", font=font)
    pen.line([point(0, 22), point(max(steps), 22)], fill=(150, 150, 150), width=1)
    pen.text((left + 4, point(0, 22)[1] - 15), "22 dB target", fill=(120, 120, 120), font=font)
    for row, (label, (values, colour)) in enumerate(series.items()):
        pen.line([point(s, v) for s, v in zip(steps, values, strict=True)], fill=colour, width=2)
        pen.text((left + 20 + 250 * row, 28), label, fill=colour, font=font)
    title = "builtin:tiny VAE: PSNR of encode -> decode (posterior mean)"
    pen.text((left, 10), title, fill="black", font=font)
    pen.text((width // 2 - 20, height - 18), "training step", fill="black", font=font)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(image_path)


def write(work_dir: Path, output: Path) -> None:
    """The pipeline folder with the trained VAE and UNet, and the training curve."""
    vae = load_vae(work_dir)
    vae.register_to_config(scaling_factor=measure_scaling_factor(vae))
    unet_state = torch.load(work_dir / "unet.pt", weights_only=False)
    unet = tiny.build_unet()
    unet.load_state_dict(unet_state["model"])
    with (work_dir / "vae-psnr.csv").open() as curve:
        first, *_, last = csv.DictReader(curve)
    model_card = MODEL_CARD.format(
        held_out_psnr=float(last["held_out_psnr"]),
        held_out_count=HELD_OUT_COUNT,
        fire_psnr=float(last["fire_drawing_psnr"]),
        scaling_factor=vae.config.scaling_factor,
        unet_note=UNET_NOTE.format(unet_steps=unet_state["step"]),
        init_psnr=float(first["held_out_psnr"]),
        vae_steps=last["step"],
        unet_steps=unet_state["step"],
        minutes=round((float(last["seconds"]) + unet_state["seconds"]) / 60),
    )
    tiny.write_model(output, tiny.build_pipeline(vae, unet), model_card)
    plot_curve(work_dir / "vae-psnr.csv", DOCS_DIR / "vae-psnr.png")
    print(f"wrote {output} (scaling_factor {vae.config.scaling_factor})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["all", "vae", "unet", "write"], default="all")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--output", type=Path, default=tiny.DEFAULT_OUTPUT)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.phase in ("all", "vae"):
        train_vae(args.work_dir, VaeSettings())
    if args.phase in ("all", "unet"):
        train_unet(args.work_dir, UnetSettings())
    if args.phase in ("all", "write"):
        write(args.work_dir, args.output)


if __name__ == "__main__":
    main()
