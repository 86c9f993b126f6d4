"""The floor: a bare loop doing only the unavoidable work of one training step.

Our trainer's step is judged against it. It uses the trainers' own model (loaded and frozen by
the same `load_frozen_model`), images, cached latents and A1111 prompt chunking, and then does
nothing else: noise, text-encoder forward with the trainable vectors written into the token
embeddings (TI) or cached text encodings with the hypernetwork's modules in front of every
`to_k` / `to_v` (HN), UNet forward, backward to the trainables only, AdamW step. Whatever our
step costs beyond this is overhead of ours.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bench.jobs import PLACEHOLDER, Job, device
from benchmarks.bench.meters import GradMeter, StepClock, alone_result, frozen_grad_bytes, memory_reset
from benchmarks.bench.variants import apply_unet_options


class _Prefixed(torch.nn.Module):
    """`linear(hypernetwork_module(x))` as a plain module: the floor's way to put a
    hypernetwork in front of `to_k` / `to_v`, with no processor wrapper in between."""

    def __init__(self, module: torch.nn.Module, linear: torch.nn.Module) -> None:
        super().__init__()
        self.module, self.linear = module, linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.module(x))


class _Without:
    """A module's parameters minus some (the hypernetwork's, inside the floor's UNet)."""

    def __init__(self, module, excluded: set[int]) -> None:
        self.module, self.excluded = module, excluded

    def parameters(self):
        return (p for p in self.module.parameters() if id(p) not in self.excluded)


class Floor:
    """The bare loop: only the unavoidable work of one step, on the trainers' own model, data
    and cached latents. `hypernetwork=False`: TI (text encoder forward/backward to the new
    vectors); `True`: cached text encodings and the hypernetwork modules' forward/backward."""

    def __init__(self, job: Job, hypernetwork: bool) -> None:
        import random

        from tinv_lib.training.data import build_prompt, encode_latents, load_images, load_template
        from tinv_lib.training.frozen_model import load_frozen_model

        self.job, self.hypernetwork = job, hypernetwork
        self.device = device()
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(job.options.mixed_precision, torch.float32)
        torch.manual_seed(job.seed)
        family, _ = load_frozen_model(job.model, None, self.device, self.dtype, job.options.gradient_checkpointing)
        self.family = family
        apply_unet_options(family.unet, job.options)

        images, _, _ = load_images(Path(job.data), job.resolution, family.size_multiple, "buckets", False,
                                   family.latent_factor)
        encode_latents(images, family.vae, (False,), self.device, torch.float32)
        self.pixels = torch.stack([image.pixels for image in images]).to(self.device)
        self.latents = torch.stack([mean + std * torch.randn_like(std) for mean, std in
                                    (image.latents[False] for image in images)]).to(self.device) * family.latent_scale
        if job.options.latent_cache:
            family.vae.to("cpu")
        template = load_template("hypernetwork" if hypernetwork else "subject_filewords")
        rng = random.Random(job.seed)
        prompts = [build_prompt(line, image.caption, PLACEHOLDER, rng, False, 0.0) for image in images for line in template]
        self.prompt_of_image = [[i * len(template) + j for j in range(len(template))] for i in range(len(images))]
        self.scheduler = family.noise_scheduler()
        self.time_ids = torch.tensor([[job.resolution, job.resolution, 0, 0, job.resolution, job.resolution]] * job.batch,
                                     device=self.device, dtype=self.dtype)
        if hypernetwork:
            self.params = self._setup_hypernetwork(prompts)
        else:
            self.params = self._setup_vectors(prompts)
        self.optimizer = _bare_optimizer(self.params, job.options.use_8bit_adam, 0.01 if hypernetwork else 0.0)
        self.grads = GradMeter(self.params)
        self.step_index = 0

    def _setup_vectors(self, prompts: list[str]) -> list:
        """Tokenize every prompt once (A1111 chunking, so ids and slots are the trainer's) and
        hook each token embedding to write the trainable vectors at the recorded slots."""
        from tinv_lib.embeddings.formats import Embedding
        from tinv_lib.prompts.encoding import PromptEncoder

        encoder = PromptEncoder.from_pipeline(self.family.pipe)
        widths = self.family.widths
        vectors = [torch.nn.Parameter(torch.randn(self.job.num_vectors, w, device=self.device) * 0.01) for w in widths]
        architecture = self.family.architecture
        fake = Embedding(PLACEHOLDER, architecture.pack_vectors(dict(zip(architecture.embedding_keys, vectors))))
        self.tokens, self.slots = [], []
        for index, part in enumerate(encoder.encoders):
            chunks = [encoder.chunks(prompt, {PLACEHOLDER: fake})[index][0] for prompt in prompts]
            self.tokens.append(part.token_tensor(chunks).to(self.device))
            self.slots.append([[fix.offset + 1 for fix in chunk.fixes] for chunk in chunks])
        self.rows: list[tuple] = [() for _ in vectors]
        for index, text_encoder in enumerate(self.family.text_encoders):
            text_encoder.get_input_embeddings().register_forward_hook(self._insert_hook(index, vectors[index]))
        return vectors

    def _insert_hook(self, index: int, vectors) -> Callable:
        def hook(_module, _inputs, output):
            items, positions, which = self.rows[index]
            return output.index_put((items, positions), vectors[which].to(output.dtype))

        return hook

    def _setup_hypernetwork(self, prompts: list[str]) -> list:
        """Encode every prompt once (the text encoder is frozen) and put the hypernetwork's
        modules in front of `to_k` / `to_v` as plain submodules."""
        from tinv_lib.hypernetworks import context_widths, create_hypernetwork, make_options
        from tinv_lib.prompts.encoding import PromptEncoder

        encoder = PromptEncoder.from_pipeline(self.family.pipe)
        with torch.no_grad():
            encoded = [encoder.encode([prompt]) for prompt in prompts]
        self.hidden = torch.cat([e.embeds for e in encoded]).to(self.dtype)
        self.pooled = torch.cat([e.pooled for e in encoded]).to(self.dtype) if encoded[0].pooled is not None else None
        unet = self.family.unet
        network = create_hypernetwork("floor", context_widths(unet), make_options(), seed=self.job.seed)
        network.to(self.device, torch.float32).train()
        for layer in [m for m in unet.modules() if hasattr(m, "set_processor") and isinstance(getattr(m, "to_k", None), torch.nn.Linear)]:
            pair = network.modules_for(layer.to_k.in_features)
            if pair is not None:
                layer.to_k, layer.to_v = _Prefixed(pair[0], layer.to_k), _Prefixed(pair[1], layer.to_v)
        return list(network.parameters())

    def _batch(self) -> tuple:
        """The next batch: image indices and one prompt index per image (cycling)."""
        count, batch = len(self.prompt_of_image), self.job.batch
        images = [(self.step_index * batch + i) % count for i in range(batch)]
        prompts = [self.prompt_of_image[i][self.step_index % len(self.prompt_of_image[i])] for i in images]
        return images, prompts

    def _conditioning(self, prompts: list[int]) -> tuple:
        if self.hypernetwork:
            return self.hidden[prompts], None if self.pooled is None else self.pooled[prompts]
        outputs, pooled = [], None
        for index, text_encoder in enumerate(self.family.text_encoders):
            items, positions, which = [], [], []
            for item, prompt in enumerate(prompts):
                for start in self.slots[index][prompt]:
                    items += [item] * self.job.num_vectors
                    positions += range(start, start + self.job.num_vectors)
                    which += range(self.job.num_vectors)
            self.rows[index] = tuple(torch.tensor(x, device=self.device) for x in (items, positions, which))
            penultimate = self.family.architecture.penultimate_hidden_state
            output = text_encoder(self.tokens[index][prompts], output_hidden_states=penultimate)
            outputs.append(output.hidden_states[-2] if penultimate else output[0])
            pooled = getattr(output, "text_embeds", None)
        return torch.cat(outputs, dim=-1), pooled

    def step(self) -> None:
        """One optimizer step of bare work."""

        images, prompts = self._batch()
        family = self.family
        if self.job.options.latent_cache:
            latents = self.latents[images]
        else:
            with torch.no_grad():
                latents = family.vae.encode(self.pixels[images]).latent_dist.sample() * family.latent_scale
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(images),), device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
            hidden, pooled = self._conditioning(prompts)
            extra = {}
            if family.architecture.text_time_conditioning:
                extra = {"added_cond_kwargs": {"text_embeds": pooled.to(self.dtype), "time_ids": self.time_ids}}
            prediction = family.unet(noisy.to(self.dtype), t, hidden.to(self.dtype), **extra).sample
        loss = F.mse_loss(prediction.float(), family.training_target(self.scheduler, latents, noise, t).float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1

    def round(self) -> dict:
        """Warm-up steps, then the timed steps, by itself: for memory and bytes."""
        clock = StepClock(self.job.warmup, self.device)
        memory_reset(self.device)
        clock(0)
        for step in range(1, self.job.warmup + self.job.steps + 1):
            self.step()
            clock(step)
        frozen = frozen_grad_bytes(self.frozen_modules())
        return alone_result(clock, self.device, self.optimizer, self.params, self.grads, frozen)

    def frozen_modules(self) -> list:
        """The base model; for the hypernetwork floor without the modules put into the UNet."""
        modules = [self.family.vae, *self.family.text_encoders]
        trainable = {id(p) for p in self.params}
        return modules + [_Without(self.family.unet, trainable)]


def _bare_optimizer(params: list, eight_bit: bool, weight_decay: float):
    if eight_bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-3, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=weight_decay)
