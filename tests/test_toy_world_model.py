"""The shipped toy model and judge (`models/toy/`): they load, generate, follow prompts and judge
fresh procedural images correctly; the pretraining recipe runs end to end in --quick mode."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from toy_world import judge as judge_lib
from toy_world.data import draw_images, make_scenes
from toy_world.examples import COLOUR_SHIFT, CONCEPT, concept_scenes
from toy_world.pipeline import DEFAULT_MODEL_DIR
from toy_world.scoring import load_default_judge, score_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def judge():
    return load_default_judge()


@pytest.fixture(scope="module")
def pipe():
    from tinv_lib.models.loading import load_base_model

    pipe, info = load_base_model(DEFAULT_MODEL_DIR)
    assert info.arch == "sd1" and info.prediction_type == "v_prediction"
    return pipe


def test_model_folder_is_small_and_sd1_shaped():
    files = [p for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 40 * 2**20
    index = json.loads((DEFAULT_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["scheduler"][1] == "PNDMScheduler"
    assert not list(DEFAULT_MODEL_DIR.rglob("*.bin")) and not list(DEFAULT_MODEL_DIR.rglob("*.pt"))


def test_judge_is_accurate_on_fresh_procedural_images(judge):
    scenes = make_scenes(seed=4242, count=400, outline_probability=0.3)
    accuracy = judge_lib.accuracy(judge, draw_images(scenes), scenes)
    assert all(value >= 0.98 for value in accuracy.values()), accuracy


def test_judge_is_deterministic_and_scores_targets(judge):
    scenes = concept_scenes()
    images = draw_images(scenes)
    first = judge_lib.judge_probabilities(judge, images)
    again = judge_lib.judge_probabilities(judge, list(images))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert score_images(images, CONCEPT, judge)["match"] == 1.0
    wrong = score_images(images, {"shape": "circle"}, judge)
    assert wrong["match"] == 0.0 and wrong["seen"]["shape"] == {"triangle": len(scenes)}
    with pytest.raises(ValueError, match="unknown colour"):
        score_images(images, {"colour": "beige"}, judge)


def test_pipeline_generates_64px_images_deterministically(pipe):
    generate = lambda seed: pipe(  # noqa: E731
        "a red circle on a white background", num_inference_steps=20, height=64, width=64,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    first = generate(1)
    assert first.size == (64, 64)
    assert np.array_equal(np.asarray(first), np.asarray(generate(1)))
    assert not np.array_equal(np.asarray(first), np.asarray(generate(2)))


def test_base_model_follows_prompts(pipe, judge):
    from benchmarks import quality

    # A regression guard for the committed model; the bar of 80% over 64 prompts is
    # measured by benchmarks/quality.py (93.8% for this model).
    result = quality.measure_prompt_following(pipe, judge, count=8, seed=1, steps=20)
    assert result["n"] == 8 and result["match"] >= 0.5, result["seen"]


def test_recipe_quick_mode_writes_a_loadable_model_that_repeats_bit_for_bit(tmp_path):
    """Every stage runs and the folder loads; two runs from scratch (separate work folders, so
    the VAE is trained twice too) write the same weights, and a different seed does not."""
    from safetensors.torch import load_file

    from tinv_lib.models.loading import load_base_model
    from toy_world.recipe import REPORT_NAME, quick_config, run_recipe

    def run(name: str, seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
        out = tmp_path / name
        report = run_recipe(dataclasses.replace(quick_config(out, tmp_path / f"{name}-work"), seed=seed),
                            log=lambda message: None)
        weights = {f"{f.parent.name}/{key}": tensor
                   for f in sorted(out.rglob("*.safetensors")) for key, tensor in load_file(f).items()}
        return report, weights

    report, first = run("first", 0)
    out = tmp_path / "first"
    assert set(report["timing"]["stages"]) == {"data", "vae", "judge", "diffusion"}
    assert json.loads((out / REPORT_NAME).read_text())["timing"]["total_wall_s"] > 0
    pipe, info = load_base_model(out)
    assert info.arch == "sd1" and pipe.vae.config.scaling_factor == report_scaling(out)
    assert judge_lib.load_judge(out / "judge").attributes["shape"][0] == "circle"

    (_, again), (_, other) = run("again", 0), run("other", 1)
    assert {name.split("/")[0] for name in first} == {"judge", "text_encoder", "unet", "vae"}
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["unet/conv_in.weight"], other["unet/conv_in.weight"])


@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_diffusion_training_split_over_two_processes_is_the_one_process_training(tmp_path, architecture):
    """Two gloo processes sharing each batch train the same weights as one process (to float
    rounding), for both text sides. Without the gradient average, or with the helper stepping the
    first process's shared weights too, the weights move by about the learning rate everywhere
    (measured ~7e-4); with SDXL's encoders unpickled in the helper as they are, transformers
    returns no hidden states there and the helper fails."""
    from toy_world import diffusion
    from toy_world.recipe import RecipeConfig, build_text_side_and_unet

    cfg = RecipeConfig(work_dir=tmp_path, architecture=architecture)
    scenes = make_scenes(0, 16, 0.2)
    latents = torch.randn(16, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    training = diffusion.DiffusionTraining(steps=3, batch_size=4, warmup=1)

    def train(processes: int) -> tuple[list[float], torch.Tensor]:
        losses: list[float] = []
        text, unet = build_text_side_and_unet(cfg)
        unet, encoders = diffusion.train_diffusion(
            unet, text, latents, scenes, training, log=lambda step, loss: losses.append(loss), processes=processes,
        )
        weights = torch.cat([p.detach().reshape(-1) for m in [unet, *encoders] for p in m.parameters()])
        return losses, weights

    one_losses, one = train(1)
    two_losses, two = train(2)
    assert one_losses == pytest.approx(two_losses, rel=1e-5)
    assert float((one - two).abs().mean()) < 1e-6
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        diffusion.train_diffusion(None, None, latents, scenes, training, processes=3)


def test_recipe_defaults_are_the_committed_model_and_flags_reach_the_config():
    from recipes import pretrain_toy_model
    from toy_world.recipe import REPORT_NAME, RecipeConfig

    assert pretrain_toy_model.config_from_args(pretrain_toy_model.parse_args([])) == RecipeConfig()
    # The committed model's report names every setting it was trained with; settings added
    # since must default to the behaviour it had (uniform timesteps).
    committed = json.loads((DEFAULT_MODEL_DIR / REPORT_NAME).read_text())["config"]
    defaults = dataclasses.asdict(RecipeConfig())
    for key, value in committed.items():
        if key == "diffusion":
            assert {k: defaults[key][k] for k in value} == value
        elif key not in ("output_dir", "work_dir"):
            assert defaults[key] == value, key
    assert defaults["diffusion"]["mid_noise_share"] == 0.0
    argv = ["--mid_noise_share", "0.5", "--diffusion_steps", "10", "--seed", "3"]
    cfg = pretrain_toy_model.config_from_args(pretrain_toy_model.parse_args(argv))
    assert (cfg.diffusion.mid_noise_share, cfg.diffusion.steps, cfg.diffusion.seed, cfg.seed) == (0.5, 10, 3, 3)


def report_scaling(folder: Path) -> float:
    return json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]


# ---------------------------------------------------------------- part B plumbing (the numbers: benchmarks/quality.py)

def _short(flags, steps: str) -> list[str]:
    flags = list(flags)
    flags[flags.index("--max_train_steps") + 1] = steps
    return flags


@pytest.mark.parametrize("script, flags_name", [
    ("train_textual_inversion.py", "CONCEPT_TRAINING_FLAGS"), ("train_hypernetwork.py", "STYLE_TRAINING_FLAGS"),
])
def test_readme_commands_train_what_the_quality_benchmark_measures(script, flags_name):
    """The README's quickstart and hypernetwork commands (on models/toy and models/toy-xl) use
    quality.py's training flags."""
    import shlex

    from benchmarks import quality

    lines = [line for line in (ROOT / "README.md").read_text().splitlines()
             if f"{script} --pretrained_model_name_or_path models/toy" in line]
    flags = getattr(quality, flags_name)
    expected = dict(zip(flags[::2], flags[1::2]))
    assert lines
    for line in lines:
        argv = shlex.split(line.split(script, 1)[1])
        given = dict(zip(argv[::2], argv[1::2]))
        assert {key: given.get(key) for key in expected} == expected, line


def test_untrained_concept_embedding_draws_its_init_text(pipe, judge, tmp_path):
    """The untrained side of acceptance 2 is the init text: N vectors from "triangle" draw
    exactly "a photo of triangle ... triangle" (N times); the trained side loads the file train_concept wrote."""
    from benchmarks import quality

    embedding, _ = quality.train_concept(DEFAULT_MODEL_DIR, tmp_path, _short(quality.CONCEPT_TRAINING_FLAGS, "2"))
    result = quality.measure_concept(pipe, judge, embedding, count=2, steps=4)
    assert result["trained"]["n"] == result["untrained"]["n"] == 2
    vectors = int(dict(zip(quality.CONCEPT_TRAINING_FLAGS[::2], quality.CONCEPT_TRAINING_FLAGS[1::2]))["--num_vectors"])
    init_words = " ".join([quality.CONCEPT_INIT] * vectors)
    plain = quality.tinv_generator(pipe, steps=4)([f"a photo of {init_words}"] * 2, [c.seed for c in result["cases"]])
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, result["untrained"]["images"]))
    assert not np.array_equal(np.asarray(plain[0]), np.asarray(result["trained"]["images"][0]))


def test_style_measurement_applies_the_hypernetwork_only_at_multiplier_1(pipe, judge, tmp_path):
    from benchmarks import quality

    folder, _ = quality.train_style(DEFAULT_MODEL_DIR, tmp_path, _short(quality.STYLE_TRAINING_FLAGS, "2"))
    assert (folder / f"{quality.STYLE_NAME}.pt").is_file()
    result = quality.measure_style(pipe, judge, folder, count=2, steps=4)
    plain = quality.tinv_generator(pipe, steps=4)([c.prompt for c in quality.style_cases(count=2)],
                                                  [c.seed for c in quality.style_cases(count=2)])
    same = lambda a, b: np.array_equal(np.asarray(a), np.asarray(b))  # noqa: E731
    assert all(same(a, b) for a, b in zip(plain, result[0.0]["images"]))
    assert not same(plain[0], result[1.0]["images"][0])
    # judged on the shifted colour, and the same images on the prompt's shape (the on-prompt guard)
    assert [c.target for c in quality.style_cases(count=2)] == [
        {"colour": COLOUR_SHIFT[c.target["colour"]]} for c in quality.prompt_following_cases(2)]
    assert result["on_prompt"][0.0]["images"] is result[0.0]["images"]
    assert set(result["on_prompt"][1.0]["per_attribute"]) == {"shape"}
    assert set(result[1.0]["per_attribute"]) == {"colour"}
