"""Model families: which family a model is, known without torch so that `validate` refuses one
batchgen does not render before anything loads, and a family registered through the public
table renders through the same loop as Stable Diffusion."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from batchgen.engine.families.sd import StableDiffusion
from batchgen.models.families import (
    FAMILIES,
    FamilyEntry,
    UnsupportedFamilyError,
    family_of_checkpoint,
    register_family,
    unregister_family,
)
from batchgen.models.source import BUILTIN_DIR, resolve_model
from batchgen.recipe.load import load_recipe
from batchgen.recipe.problems import RecipeError
from batchgen.running.runner import run
from batchgen.store.manifest import Manifest
from tests.helpers import RECIPE, write_recipe


def recipe_for(tmp_path: Path, model: str) -> Path:
    return write_recipe(tmp_path, f"model: {model}\n" + RECIPE)


def pipeline_folder(tmp_path: Path, class_name: str) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return folder


def test_builtin_and_shipped_models_are_stable_diffusion() -> None:
    assert resolve_model("builtin:tiny", Path(".")).family == "sd"
    assert FAMILIES["sd"].load_class() is StableDiffusion


@pytest.mark.parametrize(
    ("class_name", "named"),
    [
        ("FluxImg2ImgPipeline", "FLUX"),
        ("KandinskyPipeline", "KandinskyPipeline"),
    ],
)
def test_validate_refuses_a_folder_of_another_family_at_its_line(
    tmp_path: Path, class_name: str, named: str
) -> None:
    folder = pipeline_folder(tmp_path, class_name)
    recipe = recipe_for(tmp_path, str(folder))
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    (problem,) = error.value.problems
    text = str(problem)
    assert text.startswith(f"{recipe}:1: model: "), text
    assert named in text and "Stable Diffusion 1.x/2.x" in text  # what it is, what works


def test_a_single_file_of_another_family_is_named_from_its_keys(tmp_path: Path) -> None:
    key = "double_blocks.0.img_attn.qkv.weight"
    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(1), "model.diffusion_model.out.2.weight": torch.zeros(1)}, path)
    with pytest.raises(UnsupportedFamilyError, match="FLUX"):
        family_of_checkpoint([key, "model.diffusion_model.out.2.weight"], path)
    with pytest.raises(RecipeError, match="FLUX"):
        load_recipe(recipe_for(tmp_path, str(path)))


def test_an_sd3_single_file_is_told_from_its_keys_and_sent_to_a_folder(tmp_path: Path) -> None:
    """SD 3 renders from diffusers folders; its single files are not loaded yet."""
    keys = ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]
    path = tmp_path / "sd3.safetensors"
    save_file({key: torch.zeros(1) for key in keys}, path)
    assert family_of_checkpoint(keys, path).name == "sd3"
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe_for(tmp_path, str(path)))
    [problem] = caught.value.problems
    assert "Stable Diffusion 3 checkpoint" in problem.message
    assert "diffusers folder" in str(problem.hint)


@pytest.mark.parametrize(
    ("keys", "what", "hint"),
    [
        (
            ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"],
            "a LoRA (or LyCORIS) file",
            "LoRAs",
        ),
        (
            ["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"],
            "a LoRA (or LyCORIS) file",
            "LoRAs",
        ),
        (["encoder.conv_in.weight", "decoder.conv_out.weight"], "a VAE", "`vae:`"),
        (["first_stage_model.decoder.conv_out.weight"], "a VAE", "`vae:`"),
        (["emb_params"], "a textual-inversion embedding", "embeddings"),
        (["clip_l", "clip_g"], "a textual-inversion embedding", "embeddings"),
        (["control_model.input_hint_block.0.weight"], "a ControlNet", "ControlNet"),
    ],
)
def test_a_file_that_is_no_model_is_named_for_what_it_is_at_its_line(
    tmp_path: Path, keys: list[str], what: str, hint: str
) -> None:
    """Users keep LoRAs, VAEs and embeddings beside their checkpoints, and name one as
    `model:` by mistake: `validate` says what the file is and where it goes."""
    path = tmp_path / "file.safetensors"
    save_file({key: torch.zeros(1) for key in keys}, path)
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe_for(tmp_path, str(path)))
    [problem] = caught.value.problems
    assert (problem.field, problem.line) == ("model", 1)
    assert problem.message == f"{path} is {what}, not a model"
    assert problem.hint is not None and hint in problem.hint


def test_validate_refuses_another_family_without_importing_torch(tmp_path: Path) -> None:
    folder = pipeline_folder(tmp_path, "FluxPipeline")
    recipe = recipe_for(tmp_path, str(folder))
    code = (
        "import sys\n"
        "from batchgen.cli import main\n"
        f"try: main(['validate', {str(recipe)!r}])\n"
        "except SystemExit as exit: print('exit', exit.code)\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split()[-3:] == ["exit", "2", "False"], done.stdout + done.stderr
    assert "FLUX" in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (["model.diffusion_model.input_blocks.0.0.weight"], "sd"),
        (
            [
                "model.diffusion_model.input_blocks.0.0.weight",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            ],
            "sdxl",
        ),  # SD's UNet prefix, and SDXL's text encoders beside it
    ],
)
def test_a_checkpoint_is_the_most_specific_family_its_keys_match(
    keys: list[str], family: str
) -> None:
    assert family_of_checkpoint(keys, Path("model.safetensors")).name == family


def test_prompt_2_on_a_one_encoder_model_is_refused_at_its_line(tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path, "model: builtin:tiny\nprompt_2: oil painting\n" + RECIPE, name="p2"
    )
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    (problem,) = error.value.problems
    assert str(problem).startswith(f"{recipe}:2: prompt_2: "), str(problem)
    assert "builtin:tiny has only one" in str(problem)


class CountingFamily(StableDiffusion):
    """A test's family: Stable Diffusion's components, with its model calls counted."""

    calls = 0

    def predict_noise(self, sample, timestep, conditioning):  # type: ignore[no-untyped-def]
        CountingFamily.calls += 1
        return super().predict_noise(sample, timestep, conditioning)


def test_a_family_registered_through_the_table_renders(tmp_path: Path) -> None:
    folder = tmp_path / "counting-model"
    shutil.copytree(BUILTIN_DIR / "tiny", folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(
        json.dumps(index | {"_class_name": "CountingImg2ImgPipeline"})
    )
    register_family(
        FamilyEntry(
            name="counting",
            title="Counting",
            pipelines=("CountingImg2ImgPipeline",),
            checkpoint_prefixes=("counting.",),
            implementation=CountingFamily,
        )
    )
    try:
        assert resolve_model(str(folder), tmp_path).family == "counting"
        result = run(recipe_for(tmp_path, str(folder)), quiet=True)
    finally:
        unregister_family("counting")
    assert result.made == 4 and result.failed == 0
    # 2 prompts at strength 0.5 of 4 steps, guided: one batch, 2 UNet calls; strength 0 none.
    assert CountingFamily.calls == 2
    assert len(Manifest(tmp_path / "out").rows()) == 4


def test_a_family_name_or_pipeline_is_registered_once() -> None:
    with pytest.raises(ValueError, match="registered already"):
        register_family(FAMILIES["sd"])
