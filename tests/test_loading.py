"""Loading components from folders and single-file checkpoints, safely and offline."""

from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from batchgen.engine.families.sd_loading import (
    CheckpointError,
    Components,
    load_components,
    load_tokenizer,
)
from batchgen.models.source import (
    BUILTIN_DIR,
    CONFIGS_DIR,
    SHIPPED_CONFIGS,
    ModelNotFoundError,
    detect_config,
    resolve_model,
    resolve_vae,
)
from tests.helpers import gradient
from tests.original_layout import text_encoder_to_original, unet_to_original, vae_to_original

TINY_DIR = BUILTIN_DIR / "tiny"
FLOAT32 = torch.float32


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHGEN_CACHE_DIR", str(tmp_path / "hash-cache"))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def tiny_components() -> Components:
    return load_components(resolve_model("builtin:tiny", Path(".")), FLOAT32, "cpu")


def original_checkpoint(components: Components) -> dict[str, torch.Tensor]:
    vae = vae_to_original(components.vae.state_dict(), components.vae.config)
    return {
        **unet_to_original(components.unet.state_dict(), components.unet.config),
        **{"first_stage_model." + key: tensor for key, tensor in vae.items()},
        **text_encoder_to_original(components.text_encoder.state_dict()),
    }


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """builtin:tiny as one .safetensors file, in the original checkpoint layout."""
    path = tmp_path_factory.mktemp("checkpoints") / "tiny-export.safetensors"
    checkpoint = {key: t.contiguous() for key, t in original_checkpoint(tiny_components()).items()}
    safetensors.torch.save_file(checkpoint, path)
    return path


def assert_same_weights(loaded: torch.nn.Module, expected: torch.nn.Module) -> None:
    loaded_state, expected_state = loaded.state_dict(), expected.state_dict()
    assert loaded_state.keys() == expected_state.keys()
    for key, tensor in expected_state.items():
        assert torch.equal(loaded_state[key], tensor), key


def assert_same_components(loaded: Components, expected: Components) -> None:
    assert_same_weights(loaded.unet, expected.unet)
    assert_same_weights(loaded.vae, expected.vae)
    assert_same_weights(loaded.text_encoder, expected.text_encoder)
    assert loaded.scheduler_config == expected.scheduler_config
    prompt = "cheery open fire, photograph"
    assert loaded.tokenizer(prompt).input_ids == expected.tokenizer(prompt).input_ids


def render(components: Components) -> torch.Tensor:
    """diffusers' own img2img pipeline on the components: what the engine reproduces."""
    pipe = StableDiffusionImg2ImgPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=PNDMScheduler.from_config(components.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    init = Image.new("RGB", (64, 64), (200, 80, 20))
    generator = torch.Generator("cpu").manual_seed(7)
    images: torch.Tensor = pipe(
        "fire",
        image=init,
        strength=0.5,
        num_inference_steps=2,
        generator=generator,
        output_type="pt",
    ).images
    return images


# --- single files ---


def test_safetensors_checkpoint_resolves_to_a_single_file_with_a1111_hash(
    tiny_export: Path,
) -> None:
    source = resolve_model(tiny_export.name, tiny_export.parent)

    sha256 = hashlib.sha256(tiny_export.read_bytes()).hexdigest()
    assert source.kind == "single_file"
    assert source.path == tiny_export
    assert source.identity == f"file:{sha256[:16]}"
    assert source.short_hash == sha256[:10]
    assert source.name == "tiny-export"
    assert source.config == TINY_DIR  # detected from the header: tiny's UNet widths


def test_config_override_is_part_of_the_identity(tiny_export: Path) -> None:
    detected = resolve_model(str(tiny_export), Path("."))
    overridden = resolve_model(str(tiny_export), Path("."), config="builtin:tiny")

    assert overridden.config == TINY_DIR
    assert overridden.identity.startswith(detected.identity + "+config:")


def test_missing_checkpoint_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist") as error:
        resolve_model("models/absent.safetensors", tmp_path)

    assert str(tmp_path / "models" / "absent.safetensors") in str(error.value)


def test_tiny_single_file_loads_the_same_components_as_its_folder(
    tiny_export: Path, no_network: None
) -> None:
    loaded = load_components(resolve_model(str(tiny_export), Path(".")), FLOAT32, "cpu")

    expected = tiny_components()
    assert_same_components(loaded, expected)
    assert torch.equal(render(loaded), render(expected))


def test_ckpt_saved_with_torch_save_loads_with_weights_only(
    tmp_path: Path, no_network: None
) -> None:
    expected = tiny_components()
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": original_checkpoint(expected), "global_step": 1}, path)

    source = resolve_model(str(path), Path("."))
    assert source.kind == "single_file" and source.config is None  # detected at load time

    assert_same_components(load_components(source, FLOAT32, "cpu"), expected)


class Payload:
    """What a malicious pickle would carry: code that runs on unpickling."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_ckpt_that_needs_more_than_tensors_is_refused_with_a_conversion_hint(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload(marker)}, path)
    source = resolve_model(str(path), Path("."))

    with pytest.raises(CheckpointError, match="never runs code") as error:
        load_components(source, FLOAT32, "cpu")

    assert not marker.exists()
    assert error.value.hint and "safetensors" in error.value.hint
    assert str(path.with_suffix(".safetensors")) in error.value.hint


def test_checkpoint_missing_weights_is_refused_by_name(tmp_path: Path) -> None:
    checkpoint = original_checkpoint(tiny_components())
    path = tmp_path / "truncated.safetensors"
    dropped = "model.diffusion_model.out.2.weight"
    safetensors.torch.save_file(
        {k: t.contiguous() for k, t in checkpoint.items() if k != dropped}, path
    )

    with pytest.raises(CheckpointError, match="lacks unet weights"):
        load_components(resolve_model(str(path), Path(".")), FLOAT32, "cpu")


def shapes(context_width: int, first_width: int = 320) -> dict[str, tuple[int, ...]]:
    return {
        "model.diffusion_model.input_blocks.0.0.weight": (first_width, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (
            first_width,
            context_width,
        ),
    }


def test_sd1_and_sd2_are_told_apart_by_the_text_encoder_width() -> None:
    assert detect_config(shapes(768), Path("sd15.safetensors")) == CONFIGS_DIR / "sd15"
    assert detect_config(shapes(1024), Path("sd21.safetensors")) == CONFIGS_DIR / "sd2"
    assert detect_config(shapes(32, first_width=32), Path("x.safetensors")) == TINY_DIR


def sd2_checkpoint(path: Path) -> Path:
    """A file with an SD 2.x UNet's telling tensors (zeros): enough to resolve, not to load."""
    safetensors.torch.save_file(
        {key: torch.zeros(shape, dtype=torch.float16) for key, shape in shapes(1024).items()},
        path,
    )
    return path


def test_an_sd2_checkpoint_loads_as_768_v_with_a_warning_unless_config_says(
    tmp_path: Path,
) -> None:
    """SD 2.x base and 768-v checkpoints have the same tensor shapes: batchgen says which it
    assumed, and `config:` chooses."""
    from batchgen.recipe.load import load_recipe

    sd2_checkpoint(tmp_path / "sd21.safetensors")
    (tmp_path / "pictures").mkdir()
    gradient(tmp_path / "pictures" / "gradient.png")
    base = "model: sd21.safetensors\ninit_images: pictures/gradient.png\nprompts: fire\nseeds: 1\n"
    configs = {}
    for name, extra in (("detected", ""), ("v", "config: sd2\n"), ("base", "config: sd2-base\n")):
        (tmp_path / f"{name}.yaml").write_text(base + extra)
        recipe = load_recipe(tmp_path / f"{name}.yaml")
        (model,) = recipe.axes["model"]
        configs[name] = (model.config.name, [str(warning) for warning in recipe.warnings])

    assert configs["detected"][0] == "sd2"
    (warning,) = configs["detected"][1]
    assert "768-v" in warning and "`config: sd2-base`" in warning
    assert configs["v"] == ("sd2", []) and configs["base"] == ("sd2-base", [])


def test_an_unknown_config_is_reported_at_config(tmp_path: Path) -> None:
    from batchgen.recipe.load import load_recipe
    from batchgen.recipe.problems import RecipeError

    sd2_checkpoint(tmp_path / "sd21.safetensors")
    (tmp_path / "pictures").mkdir()
    gradient(tmp_path / "pictures" / "gradient.png")
    for config in ("sd3", "builtin:huge"):
        (tmp_path / "recipe.yaml").write_text(
            "model: sd21.safetensors\n"
            f"config: {config}\n"
            "init_images: pictures/gradient.png\nprompts: fire\nseeds: 1\n"
        )
        with pytest.raises(RecipeError) as error:
            load_recipe(tmp_path / "recipe.yaml")
        (problem,) = error.value.problems
        assert str(problem).startswith(f"{tmp_path / 'recipe.yaml'}:2: config: "), str(problem)


@pytest.mark.parametrize(
    ("checkpoint_shapes", "message"),
    [
        ({"encoder.conv_in.weight": (128, 3, 3, 3)}, "no Stable Diffusion UNet"),
        (
            {**shapes(768), "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)},
            "inpainting",
        ),
        (shapes(4096), "cannot tell"),
    ],
)
def test_unsupported_checkpoints_are_named(
    checkpoint_shapes: dict[str, tuple[int, ...]], message: str
) -> None:
    with pytest.raises(ModelNotFoundError, match=message):
        detect_config(checkpoint_shapes, Path("x.safetensors"))


# --- VAE overrides, folders, variants ---


def write_vae_file(path: Path) -> Path:
    """builtin:tiny's VAE as one .safetensors file, in the original checkpoint layout."""
    vae = tiny_components().vae
    vae_state = vae_to_original(vae.state_dict(), vae.config)
    safetensors.torch.save_file({k: t.contiguous() for k, t in vae_state.items()}, path)
    return path


def test_vae_single_file_replaces_the_models_vae(tmp_path: Path, no_network: None) -> None:
    path = write_vae_file(tmp_path / "vae.safetensors")
    vae = resolve_vae(path.name, tmp_path)
    assert vae.kind == "single_file" and vae.identity.startswith("file:")

    loaded = load_components(resolve_model("builtin:tiny", Path(".")), FLOAT32, "cpu", vae=vae)

    assert_same_weights(loaded.vae, tiny_components().vae)


def test_a_vae_override_is_named_in_the_pngs_a1111_parameters(
    tmp_path: Path, no_network: None
) -> None:
    """A1111's "VAE hash" (the file's sha256, 10 digits) and "VAE" (its file name), after
    the model's keys, so that A1111 and its readers know which VAE made the image."""
    import batchgen
    from batchgen.store.manifest import Manifest

    path = write_vae_file(tmp_path / "kl-f8.safetensors")
    (tmp_path / "pictures").mkdir()
    gradient(tmp_path / "pictures" / "gradient.png")
    (tmp_path / "recipe.yaml").write_text(
        "init_images: pictures/gradient.png\nprompts: fire\nstrength: 0.6\nsteps: 5\n"
        "seeds: 3\nvae: kl-f8.safetensors\n"
    )
    result = batchgen.run(tmp_path / "recipe.yaml", output=tmp_path / "out", quiet=True)
    assert result.exit_code == 0
    (row,) = Manifest(tmp_path / "out").latest().values()
    with Image.open(tmp_path / "out" / row.path) as image:
        parameters = image.text["parameters"]  # type: ignore[attr-defined]
    vae_hash = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert (
        f"Model: tiny, VAE hash: {vae_hash}, VAE: kl-f8.safetensors, Denoising strength: 0.6"
        in parameters
    )


def test_vae_folder_or_pipeline_folder_replaces_the_models_vae(tmp_path: Path) -> None:
    shutil.copytree(TINY_DIR / "vae", tmp_path / "my-vae")

    for reference in ("my-vae", str(TINY_DIR)):
        vae = resolve_vae(reference, tmp_path)
        assert vae.path.name in ("my-vae", "vae")
        loaded = load_components(resolve_model("builtin:tiny", Path(".")), FLOAT32, "cpu", vae=vae)
        assert_same_weights(loaded.vae, tiny_components().vae)


def test_folder_with_only_bin_weights_loads_them_with_weights_only(tmp_path: Path) -> None:
    folder = tmp_path / "bin-model"
    shutil.copytree(TINY_DIR, folder)
    for weights in folder.glob("*/*.safetensors"):
        stem = "pytorch_model" if weights.stem == "model" else weights.stem
        torch.save(safetensors.torch.load_file(weights), weights.with_name(stem + ".bin"))
        weights.unlink()

    loaded = load_components(resolve_model(str(folder), Path(".")), FLOAT32, "cpu")

    assert_same_components(loaded, tiny_components())


def test_variant_selects_the_variant_weight_files(tmp_path: Path) -> None:
    folder = tmp_path / "fp16-model"
    shutil.copytree(TINY_DIR, folder)
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_name(f"{weights.stem}.fp16.safetensors"))

    source = resolve_model(str(folder), Path("."))
    loaded = load_components(source, FLOAT32, "cpu", variant="fp16")

    assert_same_components(loaded, tiny_components())


# --- the shipped SD configs ---


@pytest.mark.parametrize(
    ("name", "unet_params", "text_encoder_params", "prediction_type"),
    [
        ("sd15", 859_520_964, 123_060_480, "epsilon"),
        ("sd2", 865_910_724, 340_387_840, "v_prediction"),
        ("sd2-base", 865_910_724, 340_387_840, "epsilon"),
    ],
)
def test_shipped_configs_build_the_sd_architectures(
    name: str, unet_params: int, text_encoder_params: int, prediction_type: str
) -> None:
    from accelerate import init_empty_weights

    folder = CONFIGS_DIR / name
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))

    def count(model: torch.nn.Module) -> int:
        return sum(parameter.numel() for parameter in model.parameters())

    assert count(unet) == unet_params
    assert count(vae) == 83_653_863
    assert count(text_encoder) == text_encoder_params
    scheduler = (folder / "scheduler" / "scheduler_config.json").read_text()
    assert f'"prediction_type": "{prediction_type}"' in scheduler
    assert not [path for path in folder.rglob("*") if path.suffix in (".safetensors", ".bin")]


SHIPPED_TOKENIZERS = [
    (name, subfolder)
    for name in SHIPPED_CONFIGS
    for subfolder in ("tokenizer", "tokenizer_2")
    if (CONFIGS_DIR / name / subfolder).is_dir()
]


@pytest.mark.parametrize(("name", "subfolder"), SHIPPED_TOKENIZERS)
def test_shipped_tokenizers_give_clips_token_ids(name: str, subfolder: str) -> None:
    tokenizer = load_tokenizer(CONFIGS_DIR / name, subfolder)

    ids = tokenizer("a photograph of an astronaut riding a horse").input_ids

    assert ids == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    # OpenCLIP (SD 2's, SDXL's second) pads with "!" (id 0); OpenAI's CLIP with <|endoftext|>.
    open_clip = name.startswith("sd2") or subfolder == "tokenizer_2"
    assert tokenizer.pad_token_id == (0 if open_clip else 49407)


def test_every_shipped_config_has_its_tokenizers() -> None:
    assert sorted(SHIPPED_TOKENIZERS) == sorted(
        [(name, "tokenizer") for name in ("sd15", "sd2", "sd2-base", "sdxl-base")]
        + [("sdxl-base", "tokenizer_2"), ("sdxl-refiner", "tokenizer_2")]
    )


def test_a_recipe_on_the_single_file_makes_the_folder_model_s_pixels(
    tiny_export: Path, tmp_path: Path, no_network: None
) -> None:
    import batchgen
    from batchgen.store.manifest import Manifest

    (tmp_path / "pictures").mkdir()
    gradient(tmp_path / "pictures" / "gradient.png")
    recipe = (
        "init_images: pictures/gradient.png\nprompts: fire\nstrength: 0.6\nsteps: 5\nseeds: 3\n"
    )
    for name, model in (("folder", "builtin:tiny"), ("file", str(tiny_export))):
        (tmp_path / f"{name}.yaml").write_text(recipe + f"model: {model}\n")
        result = batchgen.run(tmp_path / f"{name}.yaml", output=tmp_path / name, quiet=True)
        assert (result.made, result.exit_code) == (1, 0)
    (folder_row,) = Manifest(tmp_path / "folder").latest().values()
    (file_row,) = Manifest(tmp_path / "file").latest().values()
    assert file_row.model.startswith("file:") and file_row.model_hash == file_row.model[5:15]
    assert file_row.sha256 != folder_row.sha256  # the PNG text names another model...
    with (
        Image.open(tmp_path / "folder" / folder_row.path) as a,
        Image.open(tmp_path / "file" / file_row.path) as b,
    ):
        assert a.tobytes() == b.tobytes()  # ...but the pixels are the same


def test_vae_override_is_in_the_job_id_and_a_missing_variant_is_bad_input(
    tmp_path: Path,
) -> None:
    from click.testing import CliRunner

    from batchgen.cli import main
    from batchgen.jobs.matrix import expand
    from batchgen.recipe.load import load_recipe

    (tmp_path / "pictures").mkdir()
    gradient(tmp_path / "pictures" / "gradient.png")
    tiny = resolve_model("builtin:tiny", Path(".")).path
    base = "init_images: pictures/gradient.png\nprompts: fire\nseeds: 3\nsteps: 5\n"
    (tmp_path / "plain.yaml").write_text(base)
    (tmp_path / "vae.yaml").write_text(base + f"vae: {tiny}\n")
    (plain,) = expand(load_recipe(tmp_path / "plain.yaml"), "float32")
    (with_vae,) = expand(load_recipe(tmp_path / "vae.yaml"), "float32")
    assert plain.vae == "" and with_vae.vae.startswith("folder:") and plain.id != with_vae.id

    (tmp_path / "variant.yaml").write_text(base + "variant: fp16\n")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "variant.yaml")])
    assert result.exit_code == 2 and "cannot load model `builtin:tiny`" in result.output
