"""Textual inversion on the shared training core: the embedding as a `TrainingTask`.

Only a separate `[num_vectors, width]` parameter per text encoder trains; the model's own
vocabulary is never touched (its rows stay bit-identical, and optimizer state, gradients and the
all-reduce hold `num_vectors x width` numbers, not the vocabulary). Training prompts go through
the same A1111 prompt encoding as generation, with the trainable vectors inserted where the
embedding's name appears, exactly as A1111 trains.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tinv_lib.common.errors import TinvError
from tinv_lib.common.names import sanitize_name
from tinv_lib.common.torch_files import safe_torch_load, save_a1111_pt
from tinv_lib.embeddings.create import MAX_VECTORS, create_embedding_vectors
from tinv_lib.embeddings.formats import Embedding, load_embedding, save_pt, save_safetensors
from tinv_lib.models.architecture import MAX_T5_LENGTH, selectable_encoders
from tinv_lib.training.arguments import (
    ArgumentError,
    HelpFormatter,
    add_model_arguments,
    add_training_arguments,
    mark_required,
    parse_training_args,
)
from tinv_lib.training.norm_control import NORM_MODES, NormControl, parse_norm_target, zero_vectors
from tinv_lib.training.optimizers import sidecar_name
from tinv_lib.training.preflight import require_file

KIND = "textual_inversion"
REQUIRED = ["pretrained_model_name_or_path", "placeholder_token"]
TRAIN_ENCODERS = ("all", *selectable_encoders())  # "all", then the encoder names some model has


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a textual-inversion embedding (A1111 Train tab features on Accelerate).",
        formatter_class=HelpFormatter,
    )
    add_model_arguments(parser)
    group = parser.add_argument_group("embedding")
    group.add_argument("--placeholder_token", help="the embedding's name: the word to type in prompts, and the file stem")
    group.add_argument("--initializer_token", default="*", help='init text, any number of tokens ("" = zero vectors)')
    group.add_argument("--num_vectors", type=int, default=1, help="vectors per token (1-75)")
    group.add_argument("--resume_from_embedding", help="continue training this embedding file (its step count continues)")
    group.add_argument("--train_encoders", type=_encoder_names, default="all",
                       help=f"on a model with several text encoders, train only the named encoders' vectors (a comma "
                            f"list of {', '.join(TRAIN_ENCODERS[1:])}); the others keep their init (or resumed) "
                            "values and are saved as they are")
    group.add_argument("--max_sequence_length", type=int,
                       help="FLUX.1 and SD3: T5 tokens per prompt (default: the pipeline's, 512 on FLUX.1 and 256 on "
                            "SD3; at most 512); fewer save memory and time, and previews use the same length")
    group.add_argument("--encoder_lr_scale", choices=("auto", "none", "vocab_norm"), default="auto",
                       help="on a model with several text encoders: vocab_norm steps each encoder's vectors at "
                            "--learning_rate times its vocabulary's median norm over the first encoder's (T5's "
                            "numbers are some 60x CLIP's); none: one rate for all; auto (default): vocab_norm on "
                            "models with T5 (FLUX.1, SD3), none on the others (measured: docs/training.md)")
    group.add_argument("--norm_mode", choices=("auto", *NORM_MODES), default="auto",
                       help="hold each vector's norm at --norm_target: direction (learn only the direction: tangent "
                            "gradient, then renormalise), preserve (rescale after every step) or none; auto "
                            "(default): direction, or none where it cannot hold (zero init vectors, --save_ema, "
                            "schedule-free, a checkpoint trained without it) (measured: docs/training.md)")
    group.add_argument("--norm_target", type=parse_norm_target, default=None,
                       help="with --norm_mode: init (default: each vector's norm at the start), vocab_median (the "
                            "median norm of the encoder's vocabulary), or a number (times the vocabulary median)")
    add_training_arguments(parser, default_lr="0.005", default_template="subject_filewords", default_weight_decay=0.0)
    mark_required(parser, REQUIRED)
    return parser


def _encoder_names(text: str) -> str:
    """`--train_encoders`: "all", or a comma list of encoder names (written back as "a,b")."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if names == ["all"]:
        return "all"
    if not names or any(name not in TRAIN_ENCODERS[1:] for name in names):
        raise argparse.ArgumentTypeError(f"{text!r}: give all, or a comma list of {', '.join(TRAIN_ENCODERS[1:])}")
    return ",".join(names)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parse_training_args(build_parser(), argv, REQUIRED, _check_embedding_flags)
    args.placeholder_token = sanitize_name(args.placeholder_token, "embedding")
    if " " in args.placeholder_token:
        print(f"notice: the embedding name {args.placeholder_token!r} has a space: prompts must hold it as written, "
              f"space included (\"a photo of {args.placeholder_token}\"), as in A1111", file=sys.stderr)
    return args


def _check_embedding_flags(args: argparse.Namespace) -> None:
    if not 1 <= args.num_vectors <= MAX_VECTORS:
        raise ArgumentError(f"--num_vectors must be 1-{MAX_VECTORS} (one prompt holds 75 tokens), not {args.num_vectors}")
    require_file("resume_from_embedding", args.resume_from_embedding)
    _check_resume_vectors(args)
    _check_flow_model_flags(args)
    _check_norm_flags(args)


def _check_norm_flags(args: argparse.Namespace) -> None:
    """`--norm_mode` needs vectors with a direction, and weights that stay on their sphere in the
    saved files (a moving average or schedule-free's averaged weights leave it). `auto` becomes
    the mode the run will use, so the settings file and a resume see it."""
    reason = None
    if args.norm_mode == "auto":
        args.norm_mode, reason = _auto_norm_mode(args)
        if reason and args.norm_target is None:
            print(f"notice: --norm_mode auto: no norm control, as {reason}", file=sys.stderr)
    if args.norm_mode == "none":
        if args.norm_target is not None:
            raise ArgumentError(f"--norm_target {args.norm_target} has no effect without --norm_mode preserve or "
                                "direction" + (f" ({reason})" if reason else ""))
        return
    if args.initializer_token == "" and not args.resume_from_embedding:
        raise ArgumentError(f"--norm_mode {args.norm_mode}: --initializer_token \"\" starts from zero vectors, which "
                            "have no direction to keep: give init text")
    if args.optimizer == "schedulefree_adamw" or args.save_ema:
        which = "--save_ema" if args.save_ema else "--optimizer schedulefree_adamw"
        raise ArgumentError(f"--norm_mode {args.norm_mode} with {which}: the saved weights would be an average of "
                            "the trained ones, off their target norm; leave one out")


def _auto_norm_mode(args: argparse.Namespace) -> tuple[str, str | None]:
    """`--norm_mode auto`: direction-only training (it captured every drawable concept of the
    suite in half the steps, vectors 2-3x the vocabulary's median norm instead of 7-8x:
    docs/training.md, "Measured on the concept suite"), unless something rules it out: then none,
    and why. A checkpoint resumes with the mode it was trained with."""
    from tinv_lib.training.checkpoints import read_state, resolve_checkpoint

    checkpoint = (resolve_checkpoint(args.resume_from_checkpoint, Path(args.output_dir))
                  if args.resume_from_checkpoint else None)
    if checkpoint is not None:
        saved = read_state(checkpoint).get("norm_control")
        return (saved["mode"], None) if saved else ("none", f"{checkpoint.name} was trained without it")
    if args.save_ema:
        return "none", "--save_ema saves an average of the vectors, off their norm"
    if args.optimizer == "schedulefree_adamw":
        return "none", "schedule-free saves an average of the vectors, off their norm"
    if args.resume_from_embedding:
        vectors = load_embedding(args.resume_from_embedding).vectors
        if zero_vectors(vectors if isinstance(vectors, dict) else {"emb_params": vectors}):
            return "none", f"{Path(args.resume_from_embedding).name} holds zero vectors, which have no direction"
    elif args.initializer_token == "":
        return "none", '--initializer_token "" starts from zero vectors, which have no direction'
    return "direction", None


def _check_flow_model_flags(args: argparse.Namespace) -> None:
    """Flags of one family on a folder of another, refused before the model loads (`setup`
    refuses them for a hub id, known only once loaded)."""
    length = args.max_sequence_length
    if length is not None and not args.num_vectors < length <= MAX_T5_LENGTH:
        raise ArgumentError(f"--max_sequence_length must hold the {args.num_vectors} vector(s) and the end token, "
                            f"at most {MAX_T5_LENGTH}: {args.num_vectors + 1}-{MAX_T5_LENGTH}, not {length}")
    from tinv_lib.models.architecture import ModelLoadError, of_folder

    model = Path(args.pretrained_model_name_or_path)
    try:
        architecture = of_folder(model) if model.is_dir() else None
    except ModelLoadError:
        return  # the loader says what is wrong with it
    if architecture is not None:
        _check_flags_fit_the_family(args, architecture)


def _check_resume_vectors(args: argparse.Namespace) -> None:
    """A checkpoint resumes only with the vector count it was trained with (recorded in its
    `state.json`; `--resume_from_embedding` brings its own count, checked once the file is read)."""
    from tinv_lib.training.checkpoints import read_state, resolve_checkpoint

    if not args.resume_from_checkpoint or args.resume_from_embedding:
        return
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, Path(args.output_dir))
    shapes = read_state(checkpoint).get("tensors", {}) if checkpoint is not None else {}
    counts = {shape[0] for shape in shapes.values()}
    if counts and counts != {args.num_vectors}:
        raise ArgumentError(f"--resume_from_checkpoint: {checkpoint.name} holds {max(counts)} vectors per text "
                            f"encoder; this run asks for --num_vectors {args.num_vectors}: pass --num_vectors "
                            f"{max(counts)} to resume it, or start a new --output_dir")


def _check_flags_fit_the_family(args: argparse.Namespace, architecture) -> None:
    """`--snr_gamma` weighs DDPM timesteps, which flow models lack; `--max_sequence_length` is
    the length of a T5 prompt, which only FLUX.1 and SD3 have."""
    if args.snr_gamma is not None and architecture.flow_matching:
        raise ArgumentError(f"--snr_gamma weighs DDPM timesteps by their signal-to-noise ratio; this "
                            f"{architecture.label} model is trained by flow matching, which has none: leave it out")
    if args.max_sequence_length is not None and not architecture.t5_max_length:
        raise ArgumentError(f"--max_sequence_length sets a T5 prompt's length; this {architecture.label} model has "
                            "no T5 encoder: leave it out")


class TextualInversionTask:
    """The trainable vectors of one embedding and how they enter prompts and files."""

    kind = KIND

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.name = args.placeholder_token
        self.vectors: dict[str, torch.nn.Parameter] = {}
        self.optimizer_state: dict | None = None
        self.initial: dict[str, torch.Tensor] = {}  # the vectors training started from (diagnostics)
        self.vocabularies = None  # the model's vocabularies for diagnostics, built at the first save
        self.resumed_from: Path | None = None  # the --resume_from_embedding file, once read
        self.norm_control: NormControl | None = None  # --norm_mode

    # -- set-up
    def setup(self, family, model_info, args, device: torch.device) -> int:
        from tinv_lib.prompts.encoding import PromptEncoder

        self.family, self.model_info = family, model_info
        _check_flags_fit_the_family(args, family.architecture)
        self._check_name_is_not_a_word()
        self.prompt_encoder = PromptEncoder.from_pipeline(family.pipe, t5_length=args.max_sequence_length)
        step = 0
        if args.resume_from_embedding:
            embedding = load_embedding(args.resume_from_embedding)
            initial = self._check_fits(embedding)
            step = embedding.step or 0
            self.resumed_from = Path(args.resume_from_embedding)
            self.optimizer_state = self._matching_optimizer_state(Path(args.resume_from_embedding), embedding,
                                                                  sidecar_name(args.optimizer))
        else:
            initial = create_embedding_vectors(family, args.initializer_token, args.num_vectors)
        initial = family.architecture.unpack_vectors(initial)
        self.vectors = {key: torch.nn.Parameter(value.to(device, torch.float32).clone()) for key, value in initial.items()}
        self.initial = {key: value.detach().to("cpu", torch.float32).clone() for key, value in initial.items()}
        self._freeze_untrained_encoders(args.train_encoders)
        self.norm_control = self._norm_control(args)
        return step

    def _norm_control(self, args: argparse.Namespace) -> NormControl | None:
        """`--norm_mode`: the targets, fixed now; the trained vectors start at them."""
        if args.norm_mode == "none":
            return None
        from tinv_lib.embeddings.diagnostics import vocabularies_of

        self.vocabularies = vocabularies_of(self.family)
        medians = {key: vocabulary.median_norm for key, vocabulary in self.vocabularies.items()}
        control = NormControl.build(args.norm_mode, args.norm_target or "init", self.vectors, medians)
        if control.zero_vectors():
            key, row = control.zero_vectors()[0]
            raise TinvError(f"--norm_mode {args.norm_mode}: vector {row} ({key}) starts at zero and has no direction "
                            "to keep: start from init text or another embedding")
        control.retract()
        self.initial = {key: value.detach().to("cpu", torch.float32).clone() for key, value in self.vectors.items()}
        return control

    def _freeze_untrained_encoders(self, train_encoders: str) -> None:
        """`--train_encoders a,b`: the other encoders' vectors stop being trainable."""
        if train_encoders == "all":
            return
        architecture = self.family.architecture
        wanted = train_encoders.split(",")
        missing = [name for name in wanted if name not in architecture.selectable_encoders]
        if missing:
            has = ", ".join(architecture.selectable_encoders) or "a single one"
            raise TinvError(f"--train_encoders {train_encoders}: this {architecture.label} model has no text encoder "
                            f"{' or '.join(missing)} (its encoders: {has}); leave it at 'all'")
        for key, vectors in self.vectors.items():
            vectors.requires_grad_(key in wanted)

    def _check_name_is_not_a_word(self) -> None:
        """A name that is one word of the vocabulary would take that word over in every prompt
        (names are matched on tokens), so "cat" could no longer mean a cat: refuse it up front."""
        from tinv_lib.prompts.encoding import token_ids

        (ids,) = token_ids(self.family.tokenizers[0], [self.name.lower()])
        if len(ids) == 1:
            raise TinvError(f"--placeholder_token {self.name!r} is already a word of the model's vocabulary, so every "
                            f"{self.name!r} in a prompt would become the embedding: choose a name that is not a word "
                            f"(e.g. {self.name + '-ti'!r})")

    def _check_fits(self, embedding: Embedding) -> torch.Tensor | dict[str, torch.Tensor]:
        expected = self.family.architecture.embedding_dim(self.family.widths)
        if embedding.dim != expected:
            raise TinvError(f"--resume_from_embedding {embedding.path}: vectors of width {embedding.dim} do not fit "
                            f"this model (text width {expected})")
        return embedding.vectors

    def _matching_optimizer_state(self, path: Path, embedding: Embedding, optimizer_name: str) -> dict | None:
        """A1111's `.optim` sidecar, used only if its checksum matches the embedding
        (docs/formats.md, "Optimizer sidecars") and it was saved by this run's optimizer (our
        sidecars name it; A1111's, without a name, are AdamW)."""
        sidecar = path.with_name(path.name + ".optim")
        if not sidecar.is_file():
            return None
        data = safe_torch_load(sidecar)
        if not isinstance(data, dict) or data.get("hash") != embedding.checksum():
            print(f"notice: {sidecar.name} does not match the embedding; starting with a fresh optimizer", file=sys.stderr)
            return None
        saved_by = data.get("optimizer_name", "AdamW")
        if saved_by != optimizer_name:
            print(f"notice: {sidecar.name} holds {saved_by} state, not {optimizer_name}; starting with a fresh optimizer",
                  file=sys.stderr)
            return None
        return data.get("optimizer_state_dict")

    def parameters(self) -> list[torch.nn.Parameter]:
        return [vectors for vectors in self.vectors.values() if vectors.requires_grad]

    def parameter_groups(self) -> list[dict]:
        """One group, or with `--encoder_lr_scale vocab_norm` (the default on models with T5) one
        per encoder whose rate is scaled
        by its vocabulary's median norm over the first encoder's (`encoder_lr_scales`)."""
        scales = self.encoder_lr_scales()
        trained = [key for key, vectors in self.vectors.items() if vectors.requires_grad]
        if all(scales[key] == 1.0 for key in trained):
            return [{"params": self.parameters()}]  # the optimizer state of runs before the option
        return [{"params": [self.vectors[key]], "lr_scale": scales[key]} for key in trained]

    def encoder_lr_scales(self) -> dict[str, float]:
        """Each encoder's learning-rate factor. Adam-like optimizers step every number by about
        the learning rate whatever its gradient, so a rate tuned on CLIP vectors (coordinates
        about 0.02 in the toy models) barely turns T5 vectors (about 1, some 60 times larger):
        with `vocab_norm`, each encoder's vectors step in proportion to its own vocabulary's
        scale (docs/training.md, "Learning rate per encoder")."""
        mode = self.args.encoder_lr_scale
        if mode == "auto":
            mode = "vocab_norm" if self.family.architecture.has_t5 else "none"
        if mode == "none" or len(self.vectors) == 1:
            return {key: 1.0 for key in self.vectors}
        from tinv_lib.embeddings.diagnostics import vocabularies_of

        self.vocabularies = self.vocabularies or vocabularies_of(self.family)
        medians = {key: self.vocabularies[key].median_norm for key in self.vectors}
        first = medians[next(iter(self.vectors))]
        return {key: float(median / first) for key, median in medians.items()}

    def set_training(self, training: bool) -> None:
        """Vectors have no train/eval behaviour."""

    # -- prompts
    def current_embedding(self, step: int | None = None, detached: bool = False) -> Embedding:
        """The embedding as it is now: the live parameters (differentiable inside the encoder),
        or detached CPU float32 copies (to save)."""
        vectors = {key: value.detach().cpu().float() for key, value in self.vectors.items()} if detached else self.vectors
        vectors = self.family.architecture.pack_vectors(vectors)
        return Embedding(self.name, vectors, step, self.model_info.short_hash or None, self.model_info.name)

    def conditioning(self, prompts: list[str]):
        encoded = self.prompt_encoder.encode(prompts, {self.name: self.current_embedding()})
        return encoded.embeds, encoded.pooled

    def check_prompts(self, prompts: list[str]) -> None:
        """A dataset whose prompts never contain the embedding's name would train nothing. The name
        is looked for exactly as encoding finds it (`PromptEncoder.chunks`: an embedding fix in a
        chunk of the first encoder)."""
        embeddings = {self.name: self.current_embedding()}
        for prompt in prompts:
            if any(chunk.fixes for chunk in self.prompt_encoder.chunks(prompt, embeddings)[0]):
                return
        raise TinvError(
            f"no training prompt contains the placeholder {self.name!r}: use a template with [name] "
            f"(e.g. --template_file subject_filewords) or put {self.name!r} in the captions"
        )

    # -- state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {key: value.detach() for key, value in self.vectors.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, value in self.vectors.items():
                value.copy_(tensors[key].to(value.device))

    def save_files(self, output_dir: Path, step: int, final: bool, optimizer_state: dict | None,
                   best: bool = False) -> list[Path]:
        """Final: `<name>.pt` + `<name>.safetensors`; intermediate: `embeddings/<name>-<step>.pt`
        (A1111's naming; the name inside is `<name>-<step>`); `best` (`--keep_best`):
        `<name>-best.safetensors`, its step in the metadata."""
        embedding = self.current_embedding(step, detached=True)
        if best:
            embedding.name = f"{self.name}-best"
            written = [save_safetensors(embedding, output_dir / f"{self.name}-best.safetensors")]
        elif final:
            written = [save_pt(embedding, output_dir / f"{self.name}.pt"),
                       save_safetensors(embedding, output_dir / f"{self.name}.safetensors")]
        else:
            embedding.name = f"{self.name}-{step}"
            written = [save_pt(embedding, output_dir / "embeddings" / f"{self.name}-{step}.pt")]
        if optimizer_state is not None:
            save_a1111_pt({"hash": embedding.checksum(), "optimizer_name": sidecar_name(self.args.optimizer),
                           "optimizer_state_dict": optimizer_state},
                          written[0].with_name(written[0].name + ".optim"))
        return written

    def describe_saved(self, step: int, final: bool, logger) -> None:
        """Diagnostics of the vectors just saved against the model's vocabulary and the vectors
        this run started from: TensorBoard scalars and `embedding_diagnostics.csv` rows at every
        save; after the final save, one line per vector and the warnings (on stderr), since
        nothing else tells a user that an embedding trained nothing or drowns its prompts."""
        from tinv_lib.embeddings import diagnostics

        if self.vocabularies is None:
            self.vocabularies = diagnostics.vocabularies_of(self.family)
        records = diagnostics.diagnose_embedding(self.state_tensors(), self.vocabularies, self.initial)
        logger.scalars(step, diagnostics.scalars(records))
        logger.table(diagnostics.CSV_NAME, diagnostics.CSV_COLUMNS, diagnostics.csv_rows(step, records))
        if final:
            print("\n".join(diagnostics.summary_lines(self.name, records)))
            for line in diagnostics.warnings_for(self.name, records):
                print(line, file=sys.stderr)

    def preview(self, family, request) -> list:
        """Preview images (the loop saves them as `images/<name>-<step>.png`) and a PNG embedding
        carrying the current vectors on the first one (`image_embeddings/<name>-<step>.png`)."""
        from tinv_lib.embeddings.image_embed import save_png_embedding
        from tinv_lib.generation.txt2img import generate

        r = request
        embedding = self.current_embedding(r.step, detached=True)
        pictures = generate(family.pipe, r.prompt, r.negative, seed=r.seed, steps=r.steps, cfg_scale=r.cfg_scale,
                            width=r.size[0], height=r.size[1], batch_size=r.count, embeddings={self.name: embedding},
                            encoder=self.prompt_encoder).images
        embedding.name = f"{self.name}-{r.step}"
        save_png_embedding(embedding, r.output_dir / "image_embeddings" / f"{self.name}-{r.step}.png", image=pictures[0])
        return pictures


def main(argv: list[str] | None = None) -> int:
    """Entry point of `train_textual_inversion.py`."""
    from tinv_lib.training.runner import run_script

    return run_script(parse_args, TextualInversionTask, argv)
