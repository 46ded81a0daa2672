"""Resolving `model:` references: builtin, folders, the offline hub cache, and the errors; and
`batchgen models`, which lists them with their family."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from batchgen.models.source import (
    BUILTIN_DIR,
    ModelListing,
    ModelNotFoundError,
    list_models,
    resolve_model,
)
from tests.helpers import imports_torch, invoke

TINY_DIR = BUILTIN_DIR / "tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_builtin_tiny_resolves_to_the_packaged_folder_with_a_stable_identity() -> None:
    first = resolve_model("builtin:tiny", Path("/anywhere"))
    second = resolve_model("builtin:tiny", Path("/elsewhere"))

    assert first == second
    assert first.kind == "builtin"
    assert first.path == TINY_DIR
    assert (first.path / "model_index.json").is_file()
    assert first.name == "tiny"
    name, digest = first.identity.split("@")
    assert name == "builtin:tiny"
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert first.short_hash == digest[:10]


def test_folder_relative_to_the_recipe_resolves(tmp_path: Path) -> None:
    shutil.copytree(TINY_DIR, tmp_path / "models" / "my-tiny")
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()

    source = resolve_model("../models/my-tiny", recipe_dir)

    assert source.kind == "folder"
    assert source.path == (tmp_path / "models" / "my-tiny").resolve()
    assert source.identity.startswith("folder:")
    assert source.name == "my-tiny"
    assert len(source.short_hash) == 10
    # The identity is the weights', not the path's: a moved copy is the same model.
    shutil.copytree(TINY_DIR, tmp_path / "elsewhere")
    assert resolve_model(str(tmp_path / "elsewhere"), recipe_dir).identity == source.identity


def test_existing_folder_without_dot_prefix_is_a_folder_not_a_hub_id(tmp_path: Path) -> None:
    shutil.copytree(TINY_DIR, tmp_path / "models" / "tiny")

    source = resolve_model("models/tiny", tmp_path)

    assert source.kind == "folder"
    assert source.path == (tmp_path / "models" / "tiny").resolve()


def test_missing_folder_names_the_path_looked_for(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist") as error:
        resolve_model("./models/nowhere", tmp_path)

    assert str(tmp_path / "models" / "nowhere") in str(error.value)


def test_folder_without_model_index_is_not_a_pipeline(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()

    with pytest.raises(ModelNotFoundError, match="model_index.json") as error:
        resolve_model("./weights", tmp_path)

    assert str(tmp_path / "weights") in str(error.value)
    assert error.value.hint


def test_a_file_that_is_no_safetensors_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "sd15.safetensors").write_bytes(b"")

    with pytest.raises(ModelNotFoundError, match="single-file") as error:
        resolve_model("sd15.safetensors", tmp_path)

    assert "sd15.safetensors" in str(error.value)
    assert error.value.hint and "diffusers folder" in error.value.hint


def test_unknown_builtin_lists_the_available_ones() -> None:
    with pytest.raises(ModelNotFoundError, match="builtin:huge") as error:
        resolve_model("builtin:huge", Path("."))

    assert "builtin:tiny" in str(error.value)


def test_uncached_hub_id_fails_fast_without_network(
    tmp_path: Path, empty_hub_cache: Path, no_network: None
) -> None:
    started = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="owner/not-cached") as error:
        resolve_model("owner/not-cached", tmp_path)

    assert time.perf_counter() - started < 5
    assert str(empty_hub_cache) in str(error.value)
    assert error.value.hint and "hf download owner/not-cached" in error.value.hint


def test_cached_hub_id_resolves_to_its_snapshot(
    tmp_path: Path, empty_hub_cache: Path, no_network: None
) -> None:
    repo = empty_hub_cache / "models--owner--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(TINY_DIR, snapshot)

    source = resolve_model("owner/tiny-sd", tmp_path)

    assert source.kind == "hub"
    assert source.path == snapshot
    assert source.identity == f"hub:owner/tiny-sd@{COMMIT}"
    assert source.name == "owner/tiny-sd"


def test_builtin_tiny_loads_as_an_img2img_pipeline_with_sd_geometry() -> None:
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        resolve_model("builtin:tiny", Path(".")).path
    )

    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
    # As SD did: 1 / the std of the latents over the training data (SD 1.x's is 0.18215).
    assert 0 < pipe.vae.config.scaling_factor < 10
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.safety_checker is None


def test_importing_models_does_not_import_torch() -> None:
    probe = "import sys, batchgen.models; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )

    assert result.stdout.strip() == "False"


def test_weights_are_hashed_once_until_they_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchgen.models import hashcache

    monkeypatch.setenv("BATCHGEN_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    shutil.copytree(TINY_DIR, folder)
    hashed: list[Path] = []
    real_hash = hashcache._hash
    monkeypatch.setattr(hashcache, "_hash", lambda path: hashed.append(path) or real_hash(path))

    first = resolve_model(str(folder), tmp_path).identity
    count = len(hashed)
    assert count > 0 and resolve_model(str(folder), tmp_path).identity == first
    assert len(hashed) == count  # served from the cache

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, other content
    assert resolve_model(str(folder), tmp_path).identity != first
    assert hashed[count:] == [weights]


# --- `batchgen models`: what is here, and of which family ---

SD = "Stable Diffusion 1.x/2.x"
XL = "Stable Diffusion XL"
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
CLIP_L = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
BIG_G = "conditioner.embedders.{}.model.token_embedding.weight"
LORA = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
FLUX = "double_blocks.0.img_attn.qkv.weight"


def stand_in(path: Path, *keys: str) -> Path:
    """A safetensors file with tiny tensors under `keys`: the names are all a listing reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file({key: np.zeros((2, 2), np.float32) for key in keys}, path)
    return path


def families(listings: list[ModelListing]) -> dict[str, tuple[str, str]]:
    return {listing.reference: (listing.kind, listing.family) for listing in listings}


@pytest.fixture
def no_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing reads configs and headers only: hashing a folder of 7 GB files takes minutes."""
    from batchgen.models import hashcache

    def refuse(path: Path) -> None:
        raise AssertionError(f"{path} hashed")

    monkeypatch.setattr(hashcache, "_hash", refuse)


def test_sdxl_folders_are_listed_as_base_refiner_or_inpainting(
    tmp_path: Path, tiny_sdxl_folder: Path, empty_hub_cache: Path, no_hashing: None
) -> None:
    from tools.tiny_sdxl import write_tiny_sdxl

    models = tmp_path / "models"
    shutil.copytree(tiny_sdxl_folder, models / "xl")
    write_tiny_sdxl(models / "xl-refiner", refiner=True)
    write_tiny_sdxl(models / "xl-inpainting", inpainting=True)
    shutil.copytree(TINY_DIR, models / "sd")

    listed = families(list_models([models]))

    assert listed == {
        "builtin:tiny": ("builtin", SD),
        str(models / "xl-inpainting"): ("folder", f"{XL} (inpainting)"),
        str(models / "sd"): ("folder", SD),
        str(models / "xl"): ("folder", f"{XL} (base)"),
        str(models / "xl-refiner"): ("folder", f"{XL} (refiner)"),
    }  # and not the pipelines' own weight files (xl/unet/diffusion_pytorch_model.safetensors)
    # A pipeline folder given itself is listed once, its weight files still not.
    assert families(list_models([models / "xl"])) == {
        "builtin:tiny": ("builtin", SD),
        str(models / "xl"): ("folder", f"{XL} (base)"),
    }


def test_single_files_are_listed_with_their_family_and_the_rest_with_why_not(
    tmp_path: Path, empty_hub_cache: Path, no_hashing: None
) -> None:
    base = stand_in(tmp_path / "sdxl-base.safetensors", CONV_IN, CLIP_L, BIG_G.format(1))
    refiner = stand_in(tmp_path / "sdxl-refiner.safetensors", CONV_IN, BIG_G.format(0))
    sd15 = stand_in(tmp_path / "sd15.SAFETENSORS", CONV_IN)
    lora = stand_in(tmp_path / "loras" / "detail.safetensors", LORA)  # one level below
    flux = stand_in(tmp_path / "flux1-dev.safetensors", FLUX)
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 3)
    (tmp_path / "v1-5.ckpt").write_bytes(b"a pickle only torch reads")
    (tmp_path / "notes.txt").write_text("not a model")

    listed = {
        Path(reference).name: family
        for reference, (kind, family) in families(list_models([tmp_path])).items()
        if kind == "single_file"
    }

    assert listed.keys() == {
        base.name,
        refiner.name,
        sd15.name,
        lora.name,
        flux.name,
        "broken.safetensors",
        "v1-5.ckpt",
    }
    assert listed[base.name] == f"{XL} (base)"
    assert listed[refiner.name] == f"{XL} (refiner)"
    assert listed[sd15.name] == SD
    # Listed, not hidden and not fatal: users keep LoRAs beside their models.
    assert listed[lora.name].startswith("not renderable: ") and "LoRA" in listed[lora.name]
    assert listed[flux.name].startswith("not renderable: ") and "FLUX" in listed[flux.name]
    assert "not a valid safetensors file" in listed["broken.safetensors"]
    assert listed["v1-5.ckpt"].startswith("unknown until loaded")


def test_a_folder_of_a_family_batchgen_does_not_render_is_listed_with_the_reason(
    tmp_path: Path, empty_hub_cache: Path
) -> None:
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')

    listed = families(list_models([tmp_path]))

    kind, family = listed[str(tmp_path / "flux")]
    assert kind == "folder" and family.startswith("not renderable: ") and "FLUX" in family


def test_models_command_prints_each_model_s_family_without_torch(
    tmp_path: Path,
    tiny_sdxl_folder: Path,
    empty_hub_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shutil.copytree(tiny_sdxl_folder, tmp_path / "xl")
    stand_in(tmp_path / "xl-refiner.safetensors", CONV_IN, BIG_G.format(0))
    stand_in(tmp_path / "detail-lora.safetensors", LORA)
    monkeypatch.chdir(tmp_path)  # short paths, so that each row fits on its line

    code, output = invoke("models", ".")

    assert code == 0, output
    rows = {line.split()[0]: line for line in output.splitlines() if line.strip()}
    assert "family" in rows["model:"]
    assert SD in rows["builtin:tiny"]
    assert "folder" in rows["xl"] and f"{XL} (base)" in rows["xl"]
    refiner = rows["xl-refiner.safetensors"]
    assert "single_file" in refiner and f"{XL} (refiner)" in refiner
    assert "not renderable" in rows["detail-lora.safetensors"]
    # `batchgen models` answers at once: no torch import, in a fresh interpreter.
    assert not imports_torch("models", str(tmp_path))
