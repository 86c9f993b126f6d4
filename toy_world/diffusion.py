"""The toy model's text encoder and UNet, and the joint training from scratch on cached latents
(of any text side: `Sd1Text` here, `toy_world.xl.XlText` for the SDXL layout).

Shapes follow SD 1.x (CLIPTextModel with a causal mask and all 77 output states as context,
UNet2DConditionModel with cross-attention, an SD scheduler on scaled-linear betas), only
smaller: text width 96, UNet channels (32, 64, 128) on 16x16 latents with attention at 8x8 and
4x4. Training tricks that make a 50-minute CPU run enough:

* the loss of the easy low-noise steps capped as in min-SNR-5, without min-SNR's down-weighting
  of the high-noise steps that decide the shape (see `loss_weights`);
* a little offset noise, so background brightness is not tied to the mean of the start noise;
* caption dropout (empty caption 10%) for classifier-free guidance, and shortened captions;
* an exponential moving average of the weights, which is what gets saved.

Every random choice comes from generators seeded by `seed`, so a run repeats bit for bit on the
same machine and thread count.
"""

from __future__ import annotations

import copy
import datetime
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tinv_lib.training.distributed import average_gradients
from toy_world.autoencoder import warmup_cosine
from toy_world.data import training_caption
from toy_world.world import Scene

# SD's scaled-linear schedule, but ending at 0.02 instead of 0.012, and v-prediction (as SD 2.x)
# instead of epsilon. On 16x16 latents the mean of the noise is 4x larger than on SD's 64x64
# ones; with SD's betas (sqrt(alpha_bar) = 0.068 at t = 999) the image's mean colour shows
# through the noise at every training step, so the model copies the background colour from the
# noise instead of learning it from the caption, and at inference draws a random one (measured:
# 20% right, chance is 17%). Ending at 0.02 leaves sqrt(alpha_bar) = 0.015 at t = 999; but an
# epsilon target then barely depends on the image at the steps that decide the background (the
# loss sees the image scaled by sqrt(SNR)), and the background colour was still near chance after
# 1500 of 3600 steps. A v target asks for the image itself at high noise. Every consumer reads
# the betas and the prediction type from the scheduler config, as for any SD model.
TOY_BETAS = {"beta_start": 0.00085, "beta_end": 0.02, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
TOY_PREDICTION = "v_prediction"

# Not one of the UNet's channel widths, as SD 1.x's 768 is none of 320/640/1280: A1111 picks a
# hypernetwork's module by context width, and a text width equal to a self-attention width makes
# the text module also transform that level's image features. The first toy model had text width
# 64 = its 8x8 channels, and an outline hypernetwork learnt the style in 12% of images; the same
# training with the modules kept out of self-attention reached 72%.
TEXT_WIDTH = 96

UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64, 128),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": TEXT_WIDTH,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}


def build_text_encoder(tokenizer, width: int = TEXT_WIDTH, layers: int = 3):
    """A fresh CLIPTextModel sized for the toy vocabulary (random weights from the torch seed)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=width,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(config: dict | None = None):
    """A fresh UNet2DConditionModel (random weights from the torch seed)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**(config or UNET_CONFIG))


def build_noise_scheduler():
    """The training noise schedule (DDPM, `TOY_BETAS`, `TOY_PREDICTION`)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**TOY_BETAS, prediction_type=TOY_PREDICTION)


@dataclass
class DiffusionTraining:
    """Hyper-parameters of the joint UNet + text-encoder run."""

    steps: int = 3000
    batch_size: int = 64
    lr: float = 1.2e-3
    warmup: int = 200
    ema_decay: float = 0.998
    min_snr_gamma: float = 5.0
    noise_offset: float = 0.1
    drop_all: float = 0.1
    drop_colour: float = 0.1
    drop_background: float = 0.2
    mid_noise_share: float = 0.0
    seed: int = 0


class CaptionTokens:
    """Token ids per caption, cached: the caption set is small and tokenizing is slow."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(
                missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            ).input_ids
            self.cache.update(zip(missing, ids))
        return torch.stack([self.cache[c] for c in captions])


class Sd1Text:
    """The SD 1.x toy model's text side: one CLIP encoder whose last hidden states are the context.

    `train_diffusion` trains any text side with this interface (`toy_world.xl.XlText` is the
    SDXL one): `encoders` are trained with the UNet, `condition` turns captions into the UNet's
    context and extra keyword arguments, `tokenizers` go into the saved pipeline.
    """

    def __init__(self, tokenizer, text_encoder) -> None:
        self.tokenizers = [tokenizer]
        self.encoders = [text_encoder]
        self.tokens = CaptionTokens(tokenizer)

    def condition(self, captions: Sequence[str]) -> tuple[torch.Tensor, dict]:
        """The UNet's context for `captions` (no extra arguments)."""
        return self.encoders[0](self.tokens(captions))[0], {}


def loss_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Per-sample loss weights that cap the low-noise steps: min(SNR, gamma) / SNR for epsilon
    (min-SNR-gamma), min(SNR + 1, gamma) / (SNR + 1) for v.

    For v, min-SNR's own min(SNR, gamma) / (SNR + 1) also scales the high-noise steps by about
    SNR (0.09 at SNR 0.1), and those are the steps where the model decides what shape to draw:
    the first toy model, trained that way, learnt colours and backgrounds early and shapes last
    (69% right after 4400 steps). Capping only where SNR + 1 > gamma keeps min-SNR's relief from
    the noisy low-noise gradients and leaves the v loss of the other steps whole.
    """
    alpha = alphas_cumprod[timesteps]
    snr = alpha / (1.0 - alpha)
    if prediction == "v_prediction":
        return torch.clamp(snr + 1.0, max=gamma) / (snr + 1.0)
    return torch.clamp(snr, max=gamma) / snr


def sample_timesteps(count: int, num_train_timesteps: int, mid_noise_share: float, generator: torch.Generator) -> torch.Tensor:
    """Training timesteps: uniform, except that a `mid_noise_share` of them come from a
    logit-normal centred on t = 0.45 * T (SNR about 0.3).

    With this toy schedule a uniform draw spends a quarter of every batch above t = 750, where
    SNR < 0.01 and the latent is all but pure noise, and a tenth below t = 100, whose loss
    `loss_weights` caps. The shape and the colour are decided between. Measured on the same
    cached latents, 500 steps each: uniform timesteps drew the asked colour in 33% of 64 prompts,
    half from mid noise in 61% (background colour 83% -> 97%). Shapes come later, and a whole
    65-minute recipe with it (2200 steps at lr 1.6e-3) still drew the right shape in only 56%,
    so the committed model does not use it (docs/toy_world.md, Numbers).
    """
    uniform = torch.randint(0, num_train_timesteps, (count,), generator=generator)
    if not mid_noise_share:
        return uniform
    logit = torch.randn(count, generator=generator) - 0.2
    mid = (torch.sigmoid(logit) * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    pick_mid = torch.rand(count, generator=generator) < mid_noise_share
    return torch.where(pick_mid, mid, uniform)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1.0 - decay)


def diffusion_loss(
    unet, text, latents: torch.Tensor, captions: Sequence[str], noise_scheduler, cfg: DiffusionTraining,
    generator: torch.Generator, part: slice = slice(None),
) -> torch.Tensor:
    """The weighted loss (`loss_weights`) (epsilon or v target, per the scheduler) of one batch of
    scaled latents, or of its `part`, conditioned through the text side `text`.

    Noise and timesteps are drawn for the whole batch either way, so processes that share a batch
    (`train_diffusion` with `processes` > 1) draw the same numbers and each trains on its part.
    """
    noise = torch.randn(latents.shape, generator=generator)
    if cfg.noise_offset:
        noise += cfg.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
    timesteps = sample_timesteps(latents.shape[0], noise_scheduler.config.num_train_timesteps, cfg.mid_noise_share, generator)
    latents, noise, timesteps = latents[part], noise[part], timesteps[part]
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    context, extra = text.condition(captions[part])
    prediction = unet(noisy, timesteps, context, **extra).sample
    kind = noise_scheduler.config.prediction_type
    target = noise_scheduler.get_velocity(latents, noise, timesteps) if kind == "v_prediction" else noise
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    weights = loss_weights(noise_scheduler.alphas_cumprod, timesteps, cfg.min_snr_gamma, kind)
    return (per_sample * weights).mean()


@dataclass(frozen=True)
class Objective:
    """What the denoiser learns: its loss of one batch (`diffusion_loss`'s signature) and the
    noise scheduler that loss reads."""

    loss: Callable
    scheduler: Callable


def _ddpm_objective() -> Objective:
    return Objective(diffusion_loss, build_noise_scheduler)


# A helper that died leaves the others waiting in an all-reduce; this ends the wait with an error.
_GLOO_TIMEOUT = datetime.timedelta(minutes=10)


def train_diffusion(
    unet,
    text,
    latents: torch.Tensor,
    scenes: Sequence[Scene],
    cfg: DiffusionTraining,
    log: Callable[[int, float], None] | None = None,
    checkpoint: Callable[[int, torch.nn.Module, torch.nn.Module], None] | None = None,
    checkpoint_every: int = 500,
    processes: int = 1,
    objective: Objective | None = None,
):
    """Train the UNet and the text encoder(s) jointly on scaled `latents` captioned from `scenes`.

    `text` is the text side (`Sd1Text`, `toy_world.xl.XlText`, `toy_world.flux.FluxText`); its
    encoders train with the UNet (or FLUX.1's transformer, with `objective` its flow loss).
    Returns the EMA copies `(unet, text_encoders)` in eval mode; `log(step, mean loss)` is
    called every 50 steps and `checkpoint(step, ema_unet, ema_text_encoders)` every
    `checkpoint_every` steps (to watch a long run; it must not change the models).

    `processes` > 1 splits every batch over that many processes (this one and spawned helpers,
    gradients averaged over gloo), which share this process's torch threads: the same training
    as one process, to float rounding. On 2 CPU cores two 1-thread processes beat one 2-thread
    process, whose threads wait on each other in each of the step's many small operations:
    1.10-1.27x for the step alone, 1.0-1.18x inside the recipe (docs/toy_world.md).
    """
    objective = objective or _ddpm_objective()
    if processes <= 1:
        return _train_loop(unet, text, latents, scenes, cfg, objective, 0, 1, log, checkpoint, checkpoint_every)
    if cfg.batch_size % processes:
        raise ValueError(f"the batch size {cfg.batch_size} does not split over {processes} processes")
    import torch.distributed as dist
    import torch.multiprocessing as mp

    threads = torch.get_num_threads()
    per_process = max(1, threads // processes)
    address = f"tcp://127.0.0.1:{_free_port()}"
    context = mp.get_context("spawn")
    helpers = [
        context.Process(
            target=_helper_process, daemon=True,
            args=(address, rank, processes, per_process, unet, text, latents, scenes, cfg, objective),
        )
        for rank in range(1, processes)
    ]
    for helper in helpers:
        helper.start()
    torch.set_num_threads(per_process)
    dist.init_process_group("gloo", init_method=address, rank=0, world_size=processes, timeout=_GLOO_TIMEOUT)
    try:
        return _train_loop(
            unet, text, latents, scenes, cfg, objective, 0, processes, log, checkpoint, checkpoint_every
        )
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)
        for helper in helpers:
            helper.join(timeout=60)
            if helper.is_alive():
                helper.terminate()


def _free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for the gloo rendezvous)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _helper_process(address, rank, processes, threads, unet, text, latents, scenes, cfg, objective) -> None:
    """A helper of `train_diffusion`: the same loop on its part of every batch; its copy is discarded."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    # Spawning passed the models' tensors in shared memory: copy them before the group forms (no
    # process steps before then), or every optimizer step would also move the first process's weights.
    unet, text = copy.deepcopy(unet), copy.copy(text)
    text.encoders = [_rebuilt(encoder) for encoder in text.encoders]
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=processes, timeout=_GLOO_TIMEOUT)
    try:
        _train_loop(unet, text, latents, scenes, cfg, objective, rank, processes)
    finally:
        dist.destroy_process_group()


def _rebuilt(model):
    """A copy of a transformers model made through its constructor. transformers registers, in
    `__init__`, which layers can report hidden states; an unpickled model in a spawned process
    skipped that and answers `output_hidden_states=True` with None."""
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    return fresh


def _train_loop(unet, text, latents, scenes, cfg: DiffusionTraining, objective: Objective, rank: int, processes: int,
                log=None, checkpoint=None, checkpoint_every: int = 500):
    """The training steps of `train_diffusion`, in process `rank` of `processes`.

    Every process of a group draws the same batch, captions and noise from the same seeds, trains
    on its own slice of the batch and applies the averaged gradients, so all keep equal weights.
    """
    share = cfg.batch_size // processes
    part = slice(rank * share, (rank + 1) * share)
    generator = torch.Generator().manual_seed(cfg.seed)
    caption_rng = random.Random(f"captions/{cfg.seed}")
    noise_scheduler = objective.scheduler()
    models = torch.nn.ModuleList([unet, *text.encoders])
    parameters = list(models.parameters())
    ema = copy.deepcopy(models).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.steps, cfg.warmup))
    models.train()
    running = 0.0
    for step in range(cfg.steps):
        index = torch.randint(0, len(latents), (cfg.batch_size,), generator=generator)
        captions = [training_caption(scenes[i], caption_rng, cfg.drop_all, cfg.drop_colour, cfg.drop_background)
                    for i in index.tolist()]
        loss = objective.loss(unet, text, latents[index], captions, noise_scheduler, cfg, generator, part)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss = _mean_over_processes(loss.detach().clone(), processes)
        average_gradients(parameters, processes)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        update_ema(ema, models, min(cfg.ema_decay, (1.0 + step) / (10.0 + step)))
        running += loss
        if log and ((step + 1) % 50 == 0 or step == cfg.steps - 1):
            log(step + 1, running / (50 if (step + 1) % 50 == 0 else (step + 1) % 50))
            running = 0.0
        if checkpoint and (step + 1) % checkpoint_every == 0 and step + 1 < cfg.steps:
            checkpoint(step + 1, ema[0], list(ema[1:]))
    return ema[0], list(ema[1:])


def _mean_over_processes(loss: torch.Tensor, processes: int) -> float:
    """The mean of every process's loss (the whole batch's loss, as the parts are equal)."""
    if processes > 1:
        torch.distributed.all_reduce(loss)
        loss /= processes
    return float(loss)
