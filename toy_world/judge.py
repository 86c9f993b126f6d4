"""The judge: a small CNN that says what a toy-world image shows, one head per attribute.

The generator knows the ground truth of every image it draws, so a classifier trained on drawn
images gives a deterministic, repeatable answer to "did the model draw a red star?". Generated
images are softer than drawn ones (they pass through the VAE decoder), so training mixes clean
images with VAE reconstructions and light noise, blur and brightness changes; the reported
accuracy is measured on clean, freshly drawn images it never saw.

Files: `judge.safetensors` (weights) and `judge.json` (attributes, classes, widths).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tinv_lib.common.atomic import atomic_path, atomic_write_bytes
from toy_world.autoencoder import to_model_range, warmup_cosine
from toy_world.world import ATTRIBUTES, Scene

WEIGHTS_NAME = "judge.safetensors"
CONFIG_NAME = "judge.json"
WIDTHS = (32, 64, 96, 128)


class JudgeNet(nn.Module):
    """Four stride-2 conv blocks (64 -> 4 px), average+max pooling, a linear head per attribute."""

    def __init__(self, attributes: Mapping[str, Sequence[str]] = ATTRIBUTES, widths: Sequence[int] = WIDTHS):
        super().__init__()
        self.attributes = {name: tuple(classes) for name, classes in attributes.items()}
        self.widths = tuple(widths)
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(2 * channels, len(c)) for name, c in self.attributes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute for images in [-1, 1], (N, 3, 64, 64)."""
        features = self.features(images)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return {name: head(pooled) for name, head in self.heads.items()}


def label_tensors(scenes: Sequence[Scene], attributes: Mapping[str, Sequence[str]] = ATTRIBUTES) -> dict:
    """Class indices per attribute for a list of scenes."""
    labels = [scene.labels() for scene in scenes]
    return {
        name: torch.tensor([list(classes).index(row[name]) for row in labels]) for name, classes in attributes.items()
    }


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light, random degradations of generated images: blur, noise, brightness and contrast."""
    n = batch.shape[0]
    sigma = torch.rand((n, 1, 1, 1), generator=generator) * 1.2
    kernel_x = torch.arange(-2, 3, dtype=torch.float32).view(1, 1, 1, 5)
    weights = torch.exp(-(kernel_x**2) / (2 * sigma.clamp(min=1e-3) ** 2))
    weights = weights / weights.sum(dim=-1, keepdim=True)  # (n, 1, 1, 5) separable Gaussian
    padded = nn.functional.pad(batch, (2, 2, 2, 2), mode="replicate")
    rows = sum(padded[..., :, i : i + 64] * weights[..., i : i + 1] for i in range(5))
    blurred = sum(rows[..., i : i + 64, :] * weights[..., i : i + 1].transpose(-1, -2) for i in range(5))
    contrast = 1.0 + (torch.rand((n, 1, 1, 1), generator=generator) - 0.5) * 0.15
    brightness = (torch.rand((n, 1, 1, 1), generator=generator) - 0.5) * 0.1
    noise = torch.randn(batch.shape, generator=generator) * torch.rand((n, 1, 1, 1), generator=generator) * 0.08
    return (blurred * contrast + brightness + noise).clamp(-1, 1)


def train_judge(
    images: np.ndarray,
    scenes: Sequence[Scene],
    steps: int,
    reconstructions: np.ndarray | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    log: Callable[[int, float], None] | None = None,
) -> JudgeNet:
    """Train a judge on drawn `images` (uint8 NHWC) of `scenes`; deterministic from `seed`.

    `reconstructions` (the first images through the VAE, same order) make half of each batch, so
    the judge also knows the decoder's softer rendering.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = JudgeNet()
    labels = label_tensors(scenes)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, min(100, steps // 10 + 1)))
    net.train()
    for step in range(steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator).numpy()
        batch = to_model_range(images[index])
        if reconstructions is not None:
            half = batch_size // 2
            index[:half] = torch.randint(0, len(reconstructions), (half,), generator=generator).numpy()
            batch[:half] = to_model_range(reconstructions[index[:half]])
        logits = net(augment(batch, generator))
        loss = sum(nn.functional.cross_entropy(logits[name], labels[name][index]) for name in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log(step, float(loss.detach()))
    return net.eval()


def save_judge(net: JudgeNet, folder: str | Path, report: dict | None = None) -> Path:
    """Write `judge.safetensors` and `judge.json` (with the accuracy report, if given)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    config = {"attributes": {k: list(v) for k, v in net.attributes.items()}, "widths": list(net.widths)}
    if report:
        config["accuracy"] = report
    atomic_write_bytes(folder / CONFIG_NAME, json.dumps(config, indent=1).encode("utf-8"))
    return folder


def load_judge(folder: str | Path) -> JudgeNet:
    """A judge written by `save_judge`, in eval mode on the CPU."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    net = JudgeNet(config["attributes"], config["widths"])
    net.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    return net.eval()


def as_array(images) -> np.ndarray:
    """PIL images, a list of HWC arrays or an NHWC uint8 array, as one uint8 NHWC array."""
    if isinstance(images, np.ndarray):
        return images
    return np.stack([np.asarray(image.convert("RGB") if hasattr(image, "convert") else image) for image in images])


@torch.no_grad()
def judge_probabilities(net: JudgeNet, images, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Class probabilities per attribute, (N, classes), for 64x64 images."""
    array = as_array(images)
    if array.shape[1:3] != (64, 64):
        raise ValueError(f"the judge reads 64x64 images, got {array.shape[2]}x{array.shape[1]}")
    net.eval()
    parts = [net(to_model_range(array[i : i + batch_size])) for i in range(0, len(array), batch_size)]
    return {name: torch.cat([p[name] for p in parts]).softmax(dim=1) for name in net.attributes}


def predict(net: JudgeNet, images) -> list[dict[str, str]]:
    """The judge's verdict per image: attribute -> class name."""
    probabilities = judge_probabilities(net, images)
    verdicts: list[dict[str, str]] = [{} for _ in range(len(next(iter(probabilities.values()))))]
    for name, probs in probabilities.items():
        for verdict, index in zip(verdicts, probs.argmax(dim=1).tolist()):
            verdict[name] = net.attributes[name][index]
    return verdicts


def accuracy(net: JudgeNet, images, scenes: Sequence[Scene]) -> dict[str, float]:
    """Per-attribute accuracy of the judge against the scenes' ground truth."""
    verdicts = predict(net, images)
    truth = [scene.labels() for scene in scenes]
    return {
        name: sum(v[name] == t[name] for v, t in zip(verdicts, truth)) / len(truth) for name in net.attributes
    }
