"""SDXL single-file checkpoints: told base or refiner from their keys without torch, loaded with
the shipped configs (or `config:`), and rendering the pixels of the folder they came from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import batchgen
from batchgen.engine.families.sdxl_loading import XLComponents, load_xl_components
from batchgen.models.source import CONFIGS_DIR, ModelNotFoundError, resolve_model
from batchgen.store.manifest import Manifest
from tests.helpers import gradient, max_level_difference
from tests.original_layout import (
    open_clip_to_original,
    text_encoder_to_original,
    unet_to_original,
    vae_to_original,
)
from tools.tiny_sdxl import write_tiny_sdxl

FLOAT32 = torch.float32


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHGEN_CACHE_DIR", str(tmp_path / "hash-cache"))


@pytest.mark.parametrize(
    ("name", "unet_params", "encoder_params"),
    [
        ("sdxl-base", 2_567_463_684, [123_060_480, 694_659_840]),
        ("sdxl-refiner", 2_259_526_660, [694_659_840]),
    ],
)
def test_shipped_configs_build_the_sdxl_architectures(
    name: str, unet_params: int, encoder_params: list[int]
) -> None:
    from accelerate import init_empty_weights

    folder = CONFIGS_DIR / name
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = [
            cls(CLIPTextConfig.from_pretrained(folder / subfolder))
            for subfolder, cls in (
                ("text_encoder", CLIPTextModel),
                ("text_encoder_2", CLIPTextModelWithProjection),
            )
            if (folder / subfolder).is_dir()
        ]

    def count(model: torch.nn.Module) -> int:
        return sum(parameter.numel() for parameter in model.parameters())

    assert count(unet) == unet_params
    assert [count(encoder) for encoder in encoders] == encoder_params
    # SDXL's VAE: SD's architecture, its own scale, and the flag that keeps it out of fp16.
    assert count(vae) == 83_653_863
    assert (vae.config.scaling_factor, vae.config.force_upcast) == (0.13025, True)
    assert not [path for path in folder.rglob("*") if path.suffix in (".safetensors", ".bin")]


# --- original-layout files: a stand-in of a few named tensors is enough to tell them apart ---

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
CLIP_L = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
BIG_G = "conditioner.embedders.{}.model.token_embedding.weight"


def stand_in(path: Path, *keys: str, in_channels: int = 4) -> Path:
    tensors = {key: torch.zeros(2, 2) for key in keys}
    tensors[CONV_IN] = torch.zeros(320, in_channels, 3, 3)
    safetensors.torch.save_file(tensors, path)
    return path


def test_an_sdxl_file_is_told_base_or_refiner_from_its_keys(tmp_path: Path) -> None:
    base = stand_in(tmp_path / "base.safetensors", CLIP_L, BIG_G.format(1))
    refiner = stand_in(tmp_path / "refiner.safetensors", BIG_G.format(0))

    base_source = resolve_model(base.name, tmp_path)
    refiner_source = resolve_model(refiner.name, tmp_path)

    assert (base_source.family, base_source.config) == ("sdxl", CONFIGS_DIR / "sdxl-base")
    assert (refiner_source.family, refiner_source.config) == ("sdxl", CONFIGS_DIR / "sdxl-refiner")
    # A1111 names the model by the file's stem and hashes the whole file.
    assert base_source.kind == "single_file" and base_source.name == "base"


def test_an_sdxl_inpainting_file_needs_its_config_folder(tmp_path: Path) -> None:
    path = stand_in(tmp_path / "inpaint.safetensors", CLIP_L, BIG_G.format(1), in_channels=9)

    with pytest.raises(ModelNotFoundError) as refused:
        resolve_model(path.name, tmp_path)

    assert "9-channel" in str(refused.value) and "config:" in (refused.value.hint or "")
    given = resolve_model(path.name, tmp_path, config="sdxl-base")  # `config:` overrides
    assert given.config == CONFIGS_DIR / "sdxl-base"


# --- the tiny SDXL and its refiner exported as single files ---


def original_xl_checkpoint(parts: XLComponents) -> dict[str, torch.Tensor]:
    """The components as SGM's (Stability's) single files hold them: CLIP-L as embedder 0 and
    bigG as embedder 1 in a base; bigG alone, as embedder 0, in a refiner."""
    vae = vae_to_original(parts.vae.state_dict(), parts.vae.config)
    checkpoint = {
        **unet_to_original(parts.unet.state_dict(), parts.unet.config),
        **{"first_stage_model." + key: tensor for key, tensor in vae.items()},
    }
    *clip_l, big_g = parts.text_encoders
    if clip_l:
        prefix = "conditioner.embedders.0.transformer."
        checkpoint.update(text_encoder_to_original(clip_l[0].state_dict(), prefix))
    prefix = f"conditioner.embedders.{len(clip_l)}.model."
    checkpoint.update(open_clip_to_original(big_g.state_dict(), prefix))
    return {key: tensor.contiguous() for key, tensor in checkpoint.items()}


@pytest.fixture(scope="module", params=["base", "refiner"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL folder with its single-file export beside it, `<folder>.safetensors`."""
    folder = write_tiny_sdxl(
        tmp_path_factory.mktemp("sdxl-file") / f"tiny-{request.param}",
        refiner=request.param == "refiner",
    )
    parts = load_xl_components(resolve_model(str(folder), Path(".")), FLOAT32, "cpu")
    path = folder.with_suffix(".safetensors")
    safetensors.torch.save_file(original_xl_checkpoint(parts), path)
    return folder


def assert_same_weights(loaded: torch.nn.Module, expected: torch.nn.Module) -> None:
    loaded_state, expected_state = loaded.state_dict(), expected.state_dict()
    assert loaded_state.keys() == expected_state.keys()
    for key, tensor in expected_state.items():
        assert torch.equal(loaded_state[key], tensor), key


def test_a_single_file_loads_the_weights_of_the_folder_it_came_from(exported: Path) -> None:
    path = exported.with_suffix(".safetensors")
    source = resolve_model(path.name, path.parent, config=exported.name)
    assert source.family == "sdxl" and source.identity.startswith("file:")

    loaded = load_xl_components(source, FLOAT32, "cpu")
    expected = load_xl_components(resolve_model(str(exported), Path(".")), FLOAT32, "cpu")

    assert_same_weights(loaded.unet, expected.unet)
    assert_same_weights(loaded.vae, expected.vae)
    assert len(loaded.text_encoders) == len(expected.text_encoders)
    for mine, theirs in zip(loaded.text_encoders, expected.text_encoders, strict=True):
        assert_same_weights(mine, theirs)
    assert loaded.requires_aesthetics_score == expected.requires_aesthetics_score
    prompt = "cheery open fire, photograph"
    assert [t(prompt).input_ids for t in loaded.tokenizers] == [
        t(prompt).input_ids for t in expected.tokenizers
    ]


def test_a_recipe_on_the_single_file_makes_the_folder_s_pixels(
    exported: Path, tmp_path: Path
) -> None:
    (tmp_path / "pictures").mkdir()
    gradient(tmp_path / "pictures" / "gradient.png")
    recipe = (
        "init_images: pictures/gradient.png\nprompts: fire\nstrength: 0.6\nsteps: 5\nseeds: 3\n"
        "width: 64\nheight: 64\n"
    )
    path = exported.with_suffix(".safetensors")
    models = {"folder": f"model: {exported}\n", "file": f"model: {path}\nconfig: {exported}\n"}
    for name, model in models.items():
        (tmp_path / f"{name}.yaml").write_text(recipe + model)
        result = batchgen.run(tmp_path / f"{name}.yaml", output=tmp_path / name, quiet=True)
        assert (result.made, result.exit_code) == (1, 0)

    (folder_row,) = Manifest(tmp_path / "folder").latest().values()
    (file_row,) = Manifest(tmp_path / "file").latest().values()
    assert file_row.model.startswith("file:") and "+config:" in file_row.model
    # The weights are equal (the test above), but not always their memory alignment: a
    # safetensors file mapped into memory can leave a matrix 40 bytes off a 64-byte boundary,
    # and the CPU's BLAS then sums in another order (2e-7 on the pooled embedding here).
    with (
        Image.open(tmp_path / "folder" / folder_row.path) as a,
        Image.open(tmp_path / "file" / file_row.path) as b,
    ):
        assert max_level_difference(a, b) <= 1


def test_the_example_sdxl_recipe_validates_once_its_files_are_in_place(tmp_path: Path) -> None:
    """recipes/sdxl.yaml, with stand-ins of the two files it names where it names them."""
    from batchgen.recipe.load import load_recipe

    recipes = Path(batchgen.__file__).resolve().parent.parent / "recipes"
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "fire-drawing.png").write_bytes(
        (recipes / "pictures" / "fire-drawing.png").read_bytes()
    )
    (tmp_path / "models").mkdir()
    stand_in(tmp_path / "models" / "sd_xl_base_1.0.safetensors", CLIP_L, BIG_G.format(1))
    stand_in(tmp_path / "models" / "sd_xl_refiner_1.0.safetensors", BIG_G.format(0))
    recipe_path = tmp_path / "sdxl.yaml"
    recipe_path.write_text((recipes / "sdxl.yaml").read_text(encoding="utf-8"))

    recipe = load_recipe(recipe_path)

    [model] = recipe.axes["model"]
    assert (model.family, model.config) == ("sdxl", CONFIGS_DIR / "sdxl-base")
    assert [refiner.config for refiner in recipe.refiners().values()] == [
        CONFIGS_DIR / "sdxl-refiner"
    ]
    assert recipe.axes["refiner_switch"] == (0.7, 0.8)


def test_a_vae_file_or_folder_replaces_sdxls_and_one_made_for_float16_stays_in_it(
    tiny_sdxl_folder: Path, tmp_path: Path
) -> None:
    """`vae:` on SDXL: its own VAE as a single file (the form of the fp16-fixed SDXL VAE) gives
    its pixels; a VAE folder whose config says it is safe in float16 (`force_upcast: false`,
    as the fp16-fixed one's) is not kept in float32."""
    parts = load_xl_components(resolve_model(str(tiny_sdxl_folder), Path(".")), FLOAT32, "cpu")
    vae_file = tmp_path / "sdxl_vae.safetensors"
    safetensors.torch.save_file(
        {
            k: t.contiguous()
            for k, t in vae_to_original(parts.vae.state_dict(), parts.vae.config).items()
        },
        vae_file,
    )
    safe_vae = shutil.copytree(tiny_sdxl_folder / "vae", tmp_path / "fp16-vae")
    config = json.loads((safe_vae / "config.json").read_text(encoding="utf-8"))
    (safe_vae / "config.json").write_text(json.dumps(config | {"force_upcast": False}))
    (tmp_path / "pictures").mkdir()
    gradient(tmp_path / "pictures" / "gradient.png")
    recipe = (
        f"model: {tiny_sdxl_folder}\ninit_images: pictures/gradient.png\nprompts: fire\n"
        "strength: 0.6\nsteps: 5\nseeds: 3\n"
    )
    runs = {"own": "", "file": f"vae: {vae_file.name}\n", "fp16": f"vae: {safe_vae.name}\n"}
    rows = {}
    for name, vae in runs.items():
        (tmp_path / f"{name}.yaml").write_text(recipe + vae)
        dtype = "float16" if name == "fp16" else "float32"
        result = batchgen.run(
            tmp_path / f"{name}.yaml", output=tmp_path / name, dtype=dtype, quiet=True
        )
        assert (result.made, result.exit_code) == (1, 0)
        (rows[name],) = Manifest(tmp_path / name).latest().values()

    assert rows["file"].vae.startswith("file:") and rows["own"].vae == ""
    with (
        Image.open(tmp_path / "own" / rows["own"].path) as a,
        Image.open(tmp_path / "file" / rows["file"].path) as b,
    ):
        assert max_level_difference(a, b) <= 1
        assert "VAE: sdxl_vae.safetensors" in b.info["parameters"]
    assert rows["fp16"].fast_paths == ""  # decoded in float16, as its config allows
