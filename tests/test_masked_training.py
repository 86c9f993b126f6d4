"""Masked training: `<stem>-masklabel.png` loss masks (beside the images or in --mask_dir),
--unmasked_weight, bad mask files, and the toy world's silhouette masks."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_training, train_argv
from PIL import Image, ImageDraw

from tinv_lib.embeddings.formats import load_embedding
from tinv_lib.training.data import MaskOptions, load_images
from tinv_lib.training.task import TrainingHooks
from tinv_lib.training.textual_inversion import TextualInversionTask, main, parse_args


def _argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return train_argv(model, data, out, "--template_file", "subject", *extra)


def _picture(index: int, right: str) -> Image.Image:
    """A shape in the left half (the concept) and `right` filling the right half (not the concept)."""
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse([4 + 2 * index, 12, 28, 40 + 4 * index], fill=("red", "green")[index % 2])
    if right == "noise":
        noise = np.random.default_rng(index).integers(0, 256, (64, 24, 3), dtype=np.uint8)
        image.paste(Image.fromarray(noise, "RGB"), (40, 0))
    else:
        draw.rectangle([40, 0, 63, 63], fill=right)
    return image


def _left_half_mask(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """White on the left half: on the 8x8 latent grid, columns 0-3 are 1 and 4-7 exactly 0."""
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    return mask


def _dataset(folder: Path, right: str, count: int = 2, masks: bool = True) -> Path:
    folder.mkdir(parents=True)
    for index in range(count):
        _picture(index, right).save(folder / f"{index:04d}.png")
        if masks:
            _left_half_mask().save(folder / f"{index:04d}-masklabel.png")
    return folder


@pytest.fixture
def captured():
    """Where `_run` puts every step's loss (as logged) and the gradients of the trainables (just
    before clipping and the optimizer step), observed through the loop's hooks."""
    return SimpleNamespace(losses=[], grads=[])


def _run(argv: list[str], record) -> tuple[list[float], list[list[torch.Tensor]]]:
    record.losses, record.grads = [], []
    hooks = TrainingHooks(on_step=lambda report: record.losses.append(report.loss),
                          on_gradients=lambda step, grads: record.grads.append([g.detach().clone() for g in grads]))
    args = parse_args(argv)
    assert run_training(args, TextualInversionTask(args), hooks) == 0
    return record.losses, record.grads


@pytest.fixture
def spatially_local_networks(monkeypatch):
    """The real tiny SD1 with its VAE encoder and UNet replaced by spatially local stand-ins.

    The real networks mix context across the whole image (convolutions, attention), so a change
    outside the mask moves the prediction inside it even though the loss there weighs 0. These
    stand-ins keep every latent cell a function of its own pixels and the (real, trainable) text
    conditioning only, so what remains to test is exactly the data + loss path: the mask files,
    their fitting, the flips and the weighted loss.
    """
    import tinv_lib.models.loading as models

    real_load = models.load_base_model

    def local_encode(pixels: torch.Tensor, factor: int):
        pooled = F.avg_pool2d(pixels, factor)
        mean = torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.full_like(mean, 0.1)))

    def pointwise_unet(sample, timestep, encoder_hidden_states, **kwargs):
        gain = encoder_hidden_states.mean(1)[:, : sample.shape[1], None, None]
        return SimpleNamespace(sample=sample * (1 + gain))

    def load_local(*args, **kwargs):
        pipe, info = real_load(*args, **kwargs)
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        object.__setattr__(pipe.vae, "encode", lambda pixels: local_encode(pixels, factor))
        object.__setattr__(pipe.unet, "forward", pointwise_unet)
        return pipe, info

    monkeypatch.setattr(models, "load_base_model", load_local)


@pytest.mark.parametrize(("flip_p", "extra", "same"), [
    ("0", (), True),  # --unmasked_weight defaults to 0 when masks are given
    ("1", (), True),  # every sample flipped: the weight must flip with the latents
    ("1", ("--unmasked_weight", "1"), False),  # control: outside counting, the change shows
])
def test_outside_pixels_do_not_reach_the_gradient_when_unmasked_weight_is_0(
    tiny_sd1_path, tmp_path, captured, spatially_local_networks, flip_p, extra, same,
):
    """(a) Two datasets that differ only outside the masks give bit-identical losses and
    gradients of the trainable vectors at every step, through loading, flipping and the loss."""
    white, noisy = _dataset(tmp_path / "white", "white"), _dataset(tmp_path / "noisy", "noise")
    flags = ("--max_train_steps", "3", "--train_batch_size", "2", "--flip_p", flip_p, "--learning_rate", "0.05", *extra)
    losses_a, grads_a = _run(_argv(tiny_sd1_path, white, tmp_path / "a", *flags), captured)
    losses_b, grads_b = _run(_argv(tiny_sd1_path, noisy, tmp_path / "b", *flags), captured)
    assert len(grads_a) == len(grads_b) == 3 and all(g.abs().sum() > 0 for step in grads_a for g in step)
    identical = losses_a == losses_b and all(torch.equal(a, b) for sa, sb in zip(grads_a, grads_b) for a, b in zip(sa, sb))
    assert identical == same


def test_unmasked_weight_scales_the_outside_contribution(tiny_sd1_path, tmp_path, captured):
    """(b) Loss per image = sum(w * err) / sum(w), w = W + (1 - W) * mask: so loss(W) * mean(w) is
    linear in W, and W = 0.5 sits halfway between W = 0 and W = 1 (real tiny SD1 networks)."""
    data = _dataset(tmp_path / "data", "noise", count=1)
    images, _, _ = load_images(data, 64, 16, "buckets", False, 8, masks=MaskOptions(unmasked_weight=0.5))
    assert torch.allclose(images[0].weight[:, :4], torch.tensor(1 / 0.75))
    assert torch.allclose(images[0].weight[:, 4:], torch.tensor(0.5 / 0.75))
    mean_weight = {"0": 0.5, "0.5": 0.75, "1": 1.0}  # left half mask: mean(W + (1 - W) * mask)
    scaled = {}
    for w, mean in mean_weight.items():
        losses, grads = _run(_argv(tiny_sd1_path, data, tmp_path / w, "--max_train_steps", "1", "--unmasked_weight", w),
                             captured)
        scaled[w] = (losses[0] * mean, grads[0][0] * mean)
    assert scaled["0.5"][0] == pytest.approx((scaled["0"][0] + scaled["1"][0]) / 2, rel=1e-5)
    assert torch.allclose(scaled["0.5"][1], (scaled["0"][1] + scaled["1"][1]) / 2, rtol=1e-4, atol=1e-9)
    assert not torch.allclose(scaled["0"][1], scaled["1"][1], rtol=1e-2)


def test_bad_mask_files_give_one_notice_each_and_training_finishes(tiny_sd1_path, tmp_path, capsys):
    """(c) An unreadable mask: its image trains unmasked; a mask of another size is resized; the
    images left without a mask are counted; the run writes its embedding."""
    data = _dataset(tmp_path / "data", "white", count=3, masks=False)
    (data / "0000-masklabel.png").write_bytes(b"not a png")
    _left_half_mask((32, 32)).save(data / "0001-masklabel.png")
    assert main(_argv(tiny_sd1_path, data, tmp_path / "out", "--max_train_steps", "2")) == 0
    lines = capsys.readouterr().err.splitlines()
    notices = [line for line in lines if line.startswith("notice:")]
    assert notices == [
        "notice: 0000-masklabel.png: unreadable mask (not an image); its image trains unmasked",
        "notice: 0001-masklabel.png: mask is 32x32, its image 64x64; resized to the image",
        "notice: 2 of 3 images have no usable mask (<stem>-masklabel.png beside the image): "
        "they train with weight 1 everywhere",
    ]
    assert load_embedding(tmp_path / "out" / "my-thing.pt").step == 2


def test_bad_mask_flags_are_one_line_errors_before_the_model_loads(tmp_path, capsys):
    """A wrong --unmasked_weight or --mask_dir stops at argument parsing with exit 2."""
    data = _dataset(tmp_path / "data", "white", count=1)
    no_model = tmp_path / "no-model"  # never opened: parsing fails first
    for flags, message in [
        (("--unmasked_weight", "1.5"), "error: --unmasked_weight must be in [0, 1], not 1.5"),
        (("--unmasked_weight", "-0.1"), "error: --unmasked_weight must be in [0, 1], not -0.1"),
        (("--mask_dir", str(tmp_path / "missing")), f"error: --mask_dir {tmp_path / 'missing'}: no such folder"),
    ]:
        assert main(_argv(no_model, data, tmp_path / "out", *flags)) == 2
        assert capsys.readouterr().err.splitlines() == [message]


def test_mask_files_are_not_training_images_and_are_fitted_like_them(tmp_path):
    """(d) `-masklabel.png` files are masks, never images; --mask_dir replaces the folder beside
    the images; a mask file wins over alpha; masks are cropped/stretched like their image."""
    data = _dataset(tmp_path / "data", "white", count=2)
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(data / "0002.png")  # alpha only, no mask file
    images, skipped, notices = load_images(data, 64, 16, "buckets", True, 8)
    assert [image.path.name for image in images] == ["0000.png", "0001.png", "0002.png"] and skipped == []
    assert torch.equal(images[0].weight[:, :4], torch.full((8, 4), 2.0)) and images[0].weight[:, 4:].eq(0).all()
    assert images[2].weight is not None and notices == []  # transparent everywhere: A1111's rule, all ones
    elsewhere = tmp_path / "masks"
    elsewhere.mkdir()
    Image.new("L", (64, 64), 255).save(elsewhere / "0001-masklabel.png")
    images, _, notices = load_images(data, 64, 16, "buckets", False, 8, masks=MaskOptions(mask_dir=elsewhere))
    assert [image.path.name for image in images] == ["0000.png", "0001.png", "0002.png"]
    assert images[0].weight is None and torch.equal(images[1].weight, torch.ones(8, 8)) and images[2].weight is None
    assert notices == [f"2 of 3 images have no usable mask (<stem>-masklabel.png in {elsewhere}): "
                       "they train with weight 1 everywhere"]
    wide = tmp_path / "wide"
    wide.mkdir()
    Image.new("RGB", (128, 64), "white").save(wide / "w.png")
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (32, 0, 64, 64))  # the crop keeps x 32..96: the mask is its left half
    mask.save(wide / "w-masklabel.png")
    cropped = load_images(wide, 64, 16, "crop", False, 8)[0][0].weight
    stretched = load_images(wide, 64, 16, "stretch", False, 8)[0][0].weight
    assert cropped[:, :4].eq(2.0).all() and cropped[:, 4:].eq(0).all()
    assert stretched[:, 2:4].gt(3.9).all() and stretched[:, [1, 4]].lt(0.1).all()  # x 16..32, bicubic edges
    assert stretched[:, 0].eq(0).all() and stretched[:, 5:].eq(0).all()


def test_hypernetwork_trains_with_a_mask_dir(tiny_sd1_path, tmp_path, capsys):
    """Both trainers share the data pipeline: a hypernetwork run reads --mask_dir too."""
    from tinv_lib.training.hypernetwork import main as hypernetwork_main

    data = _dataset(tmp_path / "data", "white", count=2, masks=False)
    masks = tmp_path / "masks"
    masks.mkdir()
    _left_half_mask().save(masks / "0000-masklabel.png")
    argv = train_argv(tiny_sd1_path, data, tmp_path / "out", "--mask_dir", str(masks), "--unmasked_weight", "0.2",
                      "--max_train_steps", "1", name="hn", hypernetwork=True)
    assert hypernetwork_main(argv) == 0
    assert f"notice: 1 of 2 images have no usable mask (<stem>-masklabel.png in {masks})" in capsys.readouterr().err
    assert (tmp_path / "out" / "hn.pt").is_file()


def test_toy_world_writes_masks_that_match_the_shape(tmp_path):
    """(e) `NNNN-masklabel.png` is 64x64, white exactly where the shape is drawn in full, black
    where only background is, and the trainer reads it as that image's mask."""
    from toy_world.data import make_scenes, write_example_folder
    from toy_world.draw import SUPERSAMPLE, background_array, inside_point
    from toy_world.world import COLOURS

    scenes = make_scenes(5, 3)
    folder = write_example_folder(tmp_path / "toy", scenes, masks=True)
    for index, scene in enumerate(scenes):
        mask = Image.open(folder / f"{index:04d}-masklabel.png")
        assert mask.mode == "L" and mask.size == (64, 64)
        pixels, values = np.asarray(Image.open(folder / f"{index:04d}.png")), np.asarray(mask)
        x, y = inside_point(scene)
        assert values[y, x] == 255
        assert (pixels[values == 255] == COLOURS[scene.colour]).all()
        big = np.clip(background_array(scene) + 0.5, 0, 255).astype(np.uint8)
        background = np.asarray(Image.fromarray(big, "RGB").reduce(SUPERSAMPLE))  # as draw_scene filters
        assert (values == 0).sum() > 1000 and (pixels[values == 0] == background[values == 0]).all()
    images, _, notices = load_images(folder, 64, 16, "buckets", False, 8)
    assert len(images) == 3 and all(image.weight is not None for image in images) and notices == []
