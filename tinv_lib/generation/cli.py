"""`generate.py`: A1111-style txt2img from the command line (docs/generate.md).

One run loads the model once, then makes images for a prompt from the flags, for each line read
from standard input (`--interactive`), or for the settings stored in an image
(`--from_infotext`). Around `tinv_lib.generation.txt2img.generate` it adds what an A1111 user expects
of txt2img: sampler names, `-1` for a random seed, batches and batch counts with A1111's seeds
(image i of a run uses seed + i), grids, A1111 folder and file names, the `parameters` infotext,
the embeddings folder re-read before every prompt, and `<hypernet:name:mult>` tags.

Precedence of settings: a flag given on the command line (or on an interactive line) beats the
infotext of `--from_infotext`, which beats the defaults (A1111's: 20 steps, DPM++ 2M, CFG 7,
random seed, the model's native size).
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinv_lib import __version__
from tinv_lib.common.errors import TinvError
from tinv_lib.generation.infotext import (
    GenerationParameters,
    format_infotext,
    parameters_from_infotext,
    read_infotext,
    ti_hash_entries,
)
from tinv_lib.generation.samplers import (
    AUTOMATIC,
    DEFAULT_SAMPLER,
    FLOW_SAMPLER,
    check_flow_sampler,
    sampler_names,
    scheduler_options,
    split_sampler_name,
)

if TYPE_CHECKING:  # heavy modules stay unimported until a model is loaded
    from tinv_lib.embeddings.database import EmbeddingDatabase
    from tinv_lib.generation.extra_networks import HypernetworkHandler
    from tinv_lib.generation.image_saving import OutputFolders
    from tinv_lib.models.loading import ModelInfo
    from tinv_lib.prompts.encoding import PromptEncoder

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "toy"
"""The toy model the project ships (docs/toy_world.md): the model used when none is named."""

VERSION = f"tinv {__version__}"
RANDOM_SEED_LIMIT = 4294967294  # A1111 draws random seeds below this
GENERATION_DEFAULTS: dict[str, Any] = {
    "prompt": "", "negative_prompt": "", "steps": 20, "sampler": DEFAULT_SAMPLER, "schedule_type": AUTOMATIC,
    "cfg_scale": 7.0, "seed": -1, "width": None, "height": None, "batch_size": 1, "n_iter": 1, "emphasis": "Original",
}

Say = Callable[[str], None]


# ---------------------------------------------------------------------------------- arguments


class _LineParser(argparse.ArgumentParser):
    """Parses the options of one interactive line: a mistake is a one-line error, not an exit."""

    def error(self, message: str):  # type: ignore[override]
        raise TinvError(message)


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """The per-image settings, shared by the command line and interactive lines.

    Defaults are None here so that "given" can be told from "not given" (see module docstring);
    the real defaults are `GENERATION_DEFAULTS`.
    """
    group = parser.add_argument_group("image settings")
    group.add_argument("--prompt", help="the prompt, with A1111 syntax: (emphasis:1.2), [less], BREAK, embedding names, <hypernet:name:0.8>")
    group.add_argument("--negative_prompt", help="the negative prompt (embedding names work here too)")
    group.add_argument("--steps", type=int, help="sampling steps (default 20)")
    group.add_argument("--sampler", "--sampler_name", dest="sampler",
                       help=f"A1111 sampler name (default {DEFAULT_SAMPLER!r}): {', '.join(sampler_names())}; "
                            "a schedule suffix works too (\"DPM++ 2M Karras\")")
    group.add_argument("--schedule_type", help="A1111 schedule type: Automatic (default), Uniform, Karras, Exponential, "
                                               "SGM Uniform, Simple, Normal, DDIM")
    group.add_argument("--cfg_scale", type=float,
                       help="classifier-free guidance scale (default 7); FLUX.1-dev: its distilled guidance; a FLUX.1 "
                            "model without a guidance embedding (schnell): true guidance, 1 turns it off")
    group.add_argument("--seed", type=int, help="seed of the first image; -1 (default) draws one and prints it")
    group.add_argument("--width", type=int, help="image width (default: the model's native size)")
    group.add_argument("--height", type=int, help="image height (default: the model's native size)")
    group.add_argument("--batch_size", type=int, help="images made together per iteration (default 1)")
    group.add_argument("--n_iter", type=int, help="number of batches (A1111 'Batch count', default 1)")
    group.add_argument("--emphasis", help="A1111 emphasis mode: Original (default), No norm, Ignore, None")


def build_parser() -> argparse.ArgumentParser:
    """The `generate.py` command line."""
    parser = argparse.ArgumentParser(
        prog="generate.py",
        description="txt2img with A1111 prompt semantics, embeddings, hypernetworks and infotext.",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", "--model", dest="model",
                       help="diffusers folder or single .safetensors/.ckpt file (default: the toy model in models/toy/)")
    model.add_argument("--model_config", help="config folder for a single-file checkpoint (a diffusers folder of the same architecture)")
    model.add_argument("--max_sequence_length", type=int,
                       help="FLUX.1 and SD3: T5 tokens per prompt (default: the pipeline's, 512 on FLUX.1 and 256 on SD3; "
                            "at most 512)")
    add_generation_arguments(parser)
    networks = parser.add_argument_group("embeddings and hypernetworks")
    networks.add_argument("--embeddings_dir", default="embeddings", help="embeddings folder, searched recursively and re-read before each prompt")
    networks.add_argument("--hypernetwork_dir", default="models/hypernetworks", help="folder of hypernetwork .pt files for <hypernet:name:mult>")
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--outdir", default="outputs/txt2img-images", help="folder for images (a dated sub-folder is made inside)")
    outputs.add_argument("--outdir_grids", help="folder for grids (default: txt2img-grids beside --outdir)")
    outputs.add_argument("--no_grid", action="store_true", help="do not save a grid when a run makes several images")
    outputs.add_argument("--no_date_dirs", action="store_true", help="save into the folders themselves, not dated sub-folders")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--interactive", action="store_true",
                      help="read prompts from standard input, one per line (a line may also hold --prompt/--steps/... options)")
    mode.add_argument("--from_infotext", metavar="FILE", help="make the image whose A1111 'parameters' this PNG (or .txt) holds")
    return parser


def _line_parser() -> _LineParser:
    parser = _LineParser(prog="line", add_help=False)
    add_generation_arguments(parser)
    return parser


def given_values(args: argparse.Namespace) -> dict[str, Any]:
    """The image settings that were given (not None), by name."""
    return {key: getattr(args, key) for key in GENERATION_DEFAULTS if getattr(args, key, None) is not None}


def line_values(line: str) -> dict[str, Any]:
    """An interactive line: a plain prompt, or A1111 "Prompts from file" options (`--prompt "a cat" --steps 10`)."""
    if not line.startswith("--"):
        return {"prompt": line}
    try:
        words = shlex.split(line)
    except ValueError as error:
        raise TinvError(f"cannot read the line's options ({error})") from None
    return given_values(_line_parser().parse_args(words))


# ------------------------------------------------------------------------------------ session


@dataclass
class Session:
    """A loaded model and everything kept between prompts."""

    pipe: Any
    model: ModelInfo
    embeddings: EmbeddingDatabase
    hypernetworks: HypernetworkHandler
    outputs: OutputFolders
    make_grid: bool = True
    say: Say = print
    encoders: dict[str, PromptEncoder] = field(default_factory=dict)
    t5_length: int | None = None  # --max_sequence_length

    def encoder(self, emphasis: str) -> PromptEncoder:
        """The prompt encoder for an emphasis mode (one per mode, made on first use)."""
        from tinv_lib.prompts.encoding import PromptEncoder

        if emphasis not in self.encoders:
            self.encoders[emphasis] = PromptEncoder.from_pipeline(self.pipe, emphasis, self.t5_length)
        return self.encoders[emphasis]

    def native_size(self) -> int:
        """The model's native image side: UNet sample size × VAE scale factor; for FLUX.1 and SD3
        the VAE's own `sample_size` (1024 in theirs, 64 in the toy model's), since FLUX.1
        pipelines hard-code 1024 as their default whatever the model."""
        if hasattr(self.pipe, "transformer"):
            return int(self.pipe.vae.config.sample_size)
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)


def default_model() -> Path:
    """The shipped toy model, or a one-line error saying it is missing."""
    if not (DEFAULT_MODEL / "model_index.json").is_file():
        raise TinvError(f"no --pretrained_model_name_or_path given and the default toy model is missing "
                        f"({DEFAULT_MODEL}); pass a diffusers folder or a single-file checkpoint")
    return DEFAULT_MODEL


def open_session(args: argparse.Namespace, say: Say = print) -> Session:
    """Load the model, the embeddings folder and the hypernetwork folder; report what loaded."""
    from tinv_lib.common.quiet import silence_known_noise
    from tinv_lib.embeddings.database import EmbeddingDatabase
    from tinv_lib.generation.extra_networks import HypernetworkHandler
    from tinv_lib.generation.image_saving import OutputFolders
    from tinv_lib.models.family import family_of
    from tinv_lib.models.loading import load_base_model
    from tinv_lib.prompts.encoding import PromptEncoder

    silence_known_noise()
    pipe, info = load_base_model(args.model or default_model(), args.model_config)
    pipe.set_progress_bar_config(disable=True)
    _check_t5_length(args.max_sequence_length, family_of(pipe).architecture)  # a hub id or file is known now
    encoder = PromptEncoder.from_pipeline(pipe, t5_length=args.max_sequence_length)
    outdir = Path(args.outdir)
    grids = Path(args.outdir_grids) if args.outdir_grids else outdir.parent / "txt2img-grids"
    session = Session(
        pipe=pipe,
        model=info,
        embeddings=EmbeddingDatabase(
            args.embeddings_dir,
            expected_dim=encoder.expected_dim,  # a wrong-width file is skipped with its reason
            model_hashes=[info.short_hash, info.sha256, info.old_hash],
            model_name=info.name,
        ),
        hypernetworks=HypernetworkHandler(args.hypernetwork_dir, notify=lambda text: say(f"notice: {text}")),
        outputs=OutputFolders(outdir, grids, date_dirs=not args.no_date_dirs),
        make_grid=not args.no_grid,
        say=say,
        encoders={encoder.emphasis: encoder},
        t5_length=args.max_sequence_length,
    )
    say(f"Model: {info.name} [{info.short_hash}] ({info.arch})")
    refresh_embeddings(session)
    say(session.hypernetworks.summary_line())
    return session


def refresh_embeddings(session: Session) -> None:
    """Re-read the embeddings folder; print the loaded/skipped report when anything changed."""
    database = session.embeddings
    before = len(database.notices)
    if database.refresh():
        for line in database.summary_lines():
            session.say(line)
    for notice in database.notices[before:]:
        session.say(f"notice: {notice}")


# --------------------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """What one prompt asks for: the settings of its first image, and how many batches."""

    params: GenerationParameters
    n_iter: int = 1
    keep_position: int | None = None  # --from_infotext of a batched image: save only this one


def check_numbers(values: Mapping[str, Any]) -> None:
    """The counts and sides among `values` (those given; the model's size is checked once known):
    run before the model loads, so a typo costs a second, not a model load."""
    for name in ("steps", "batch_size", "n_iter"):
        if values.get(name) is not None and int(values[name]) < 1:
            raise TinvError(f"--{name} must be at least 1 (got {values[name]})")
    for name in ("width", "height"):
        side = values.get(name)
        if side is not None and (side < 8 or side % 8):
            raise TinvError(f"--{name} {side}: must be a positive multiple of 8")


def make_job(session: Session, values: Mapping[str, Any], base: GenerationParameters | None = None) -> Job:
    """Settings for one prompt: `values` over `base` over the defaults, checked and completed
    (canonical sampler name, a drawn seed for -1, the model's size and identity)."""
    merged = {**GENERATION_DEFAULTS}
    if base is not None:
        merged.update({key: getattr(base, key) for key in GENERATION_DEFAULTS if key != "n_iter" and getattr(base, key) is not None})
    merged.update(values)
    check_numbers(merged)
    sampler, schedule = split_sampler_name(str(merged["sampler"]), str(merged["schedule_type"] or AUTOMATIC))
    scheduler_options(sampler, schedule)  # an unusable combination fails here, before any work
    session.encoder(merged["emphasis"])  # so does an unknown emphasis mode
    width = merged["width"] or session.native_size()
    height = merged["height"] or session.native_size()
    seed = int(merged["seed"])
    if seed == -1:
        seed = random.SystemRandom().randrange(RANDOM_SEED_LIMIT)
        session.say(f"Seed: {seed} (drawn for -1)")
    params = GenerationParameters(
        prompt=merged["prompt"], negative_prompt=merged["negative_prompt"], steps=int(merged["steps"]),
        sampler=sampler, schedule_type=schedule, cfg_scale=float(merged["cfg_scale"]), seed=seed,
        width=int(width), height=int(height), model_hash=session.model.short_hash or None, model=session.model.name,
        rng="CPU", emphasis=merged["emphasis"], batch_size=int(merged["batch_size"]), version=VERSION,
    )
    return Job(params, n_iter=int(merged["n_iter"]))


def run_job(session: Session, job: Job) -> list[Path]:
    """Make and save the images of one job (and its grid); return the saved sample paths."""
    from tinv_lib.generation.txt2img import generate

    p = job.params
    saved, images, texts = [], [], []
    for iteration in range(job.n_iter):
        first_seed = p.seed + iteration * p.batch_size
        result = generate(
            session.pipe, p.prompt, p.negative_prompt, seed=first_seed, steps=p.steps, cfg_scale=p.cfg_scale,
            width=p.width, height=p.height, batch_size=p.batch_size, embeddings=session.embeddings,
            extra_networks={"hypernet": session.hypernetworks}, emphasis=p.emphasis, encoder=session.encoder(p.emphasis),
            sampler=p.sampler, schedule_type=p.schedule_type,
        )
        _report_result(session, result, first=iteration == 0)
        for position, image in enumerate(result.images):
            if job.keep_position is not None and position != job.keep_position:
                continue
            record = replace(p, seed=first_seed + position, batch_pos=position, ti_hashes=result.ti_hashes or None)
            text = format_infotext(record)
            path = session.outputs.save_sample(image, record.seed, p.prompt, text)
            session.say(f"saved {path}")
            saved.append(path)
            images.append(image)
            texts.append(text)
    if session.make_grid and len(images) > 1:
        session.say(f"saved grid {session.outputs.save_grid(images, texts[0])}")
    return saved


def _report_result(session: Session, result: Any, first: bool) -> None:
    """Notices of a generation, and (once per job) which embeddings and hypernetworks it used."""
    for notice in result.notices:
        session.say(f"notice: {notice}")
    if not first:
        return
    if result.used_embeddings:
        session.say(f"Embeddings used: {', '.join(emb.name for emb in result.used_embeddings)}")
    if session.hypernetworks.applied:
        names = ", ".join(f"{name} (x{multiplier:g})" for name, multiplier in session.hypernetworks.applied)
        session.say(f"Hypernetworks applied: {names}")


# -------------------------------------------------------------------------------------- modes


def infotext_job(session: Session, path: str, overrides: Mapping[str, Any]) -> Job:
    """The job that remakes the image whose infotext `path` holds, with notices for whatever
    keeps it from being the same image (another model, other embedding files, unused fields)."""
    params, ignored = parameters_from_infotext(read_infotext(path))
    say = session.say
    if ignored:
        say(f"notice: infotext fields not used here: {', '.join(f'{k}: {v}' for k, v in ignored.items())}")
    if params.rng != "CPU":
        say(f"notice: the image was made with {params.rng} noise; tinv draws noise on the CPU, so it will differ")
    loaded = session.model.short_hash
    if params.model_hash and loaded and not loaded.startswith(params.model_hash.lower()):
        say(f"notice: the image was made with model {params.model or '?'} [{params.model_hash}], "
            f"not the loaded {session.model.name} [{loaded}]; it will differ")
    session.embeddings.refresh()
    for name, digest in ti_hash_entries(params.ti_hashes).items():
        embedding = session.embeddings.get(name)
        if embedding is None:
            say(f"notice: embedding {name} [{digest}] of the infotext is not in the embeddings folder")
        elif embedding.shorthash and embedding.shorthash != digest:
            say(f"notice: embedding {name} is a different file [{embedding.shorthash}] than the image's [{digest}]")
    keep = None
    if params.batch_size > 1 and not {"seed", "batch_size"} & overrides.keys():
        # the same batch again, keeping only this image: batches are not bit-identical to single images
        params = replace(params, seed=params.seed - params.batch_pos)
        keep = params.batch_pos
    job = make_job(session, {**overrides, "n_iter": overrides.get("n_iter", 1)}, base=params)
    job.keep_position = keep
    return job


def run_interactive(session: Session, base_values: Mapping[str, Any], lines: Iterable[str]) -> int:
    """One job per non-empty line; the embeddings folder is re-read before each. A bad line is
    reported and skipped. Returns the number of lines that failed."""
    failed = 0
    session.say("interactive: one prompt per line (or --prompt \"...\" --steps N ... options); end with Ctrl-D")
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        try:
            values = {**base_values, **line_values(line)}
            refresh_embeddings(session)
            run_job(session, make_job(session, values))
        except TinvError as error:
            session.say(f"error: {error}")
            failed += 1
    return failed


def run(args: argparse.Namespace, say: Say = print, stdin: Iterable[str] | None = None) -> int:
    """Run one `generate.py` invocation (after argument parsing); returns the exit status."""
    values = given_values(args)
    check_numbers(values)  # a typo should not wait for the model to load
    if "sampler" in values or "schedule_type" in values:
        scheduler_options(*split_sampler_name(values.get("sampler", DEFAULT_SAMPLER), values.get("schedule_type", AUTOMATIC)))
    _check_flow_model(args, values)
    session = open_session(args, say)
    if args.interactive:
        if "prompt" in values:
            say("notice: --prompt is not used with --interactive (prompts come from standard input)")
            values.pop("prompt")
        failed = run_interactive(session, values, stdin if stdin is not None else sys.stdin)
        return 1 if failed else 0
    if args.from_infotext:
        job = infotext_job(session, args.from_infotext, values)
    else:
        job = make_job(session, values)
    run_job(session, job)
    return 0


def _check_flow_model(args: argparse.Namespace, values: dict[str, Any]) -> None:
    """FLUX.1 and SD3 models, before they load (a folder, or a single file's `--model_config`):
    their one sampler (the default becomes it; any other is refused) and no hypernetworks."""
    from tinv_lib.hypernetworks.apply import refuse_flow_models
    from tinv_lib.models.architecture import ModelLoadError, of_folder
    from tinv_lib.prompts.syntax import parse_extra_networks

    model = Path(args.model) if args.model else None
    folder = model if model is not None and model.is_dir() else None
    if folder is None and args.model_config and Path(args.model_config).is_dir():
        folder = Path(args.model_config)  # a single file: its config folder says what it is
    try:
        architecture = of_folder(folder) if folder is not None else None
    except ModelLoadError:
        return  # the loader says what is wrong with it
    _check_t5_length(args.max_sequence_length, architecture)
    if architecture is None or not architecture.flow_matching:
        return
    if "sampler" in values or "schedule_type" in values:
        check_flow_sampler(values.get("sampler", FLOW_SAMPLER), values.get("schedule_type", AUTOMATIC))
    values["sampler"] = FLOW_SAMPLER
    if parse_extra_networks(str(values.get("prompt", "")))[1].get("hypernet"):
        refuse_flow_models(model, architecture)


def _check_t5_length(length: int | None, architecture) -> None:
    """`--max_sequence_length` is a T5 prompt's length: 2-512, and only on a model with T5 (the
    architecture is None while it is not known yet)."""
    from tinv_lib.models.architecture import MAX_T5_LENGTH

    if length is None:
        return
    if not 1 < length <= MAX_T5_LENGTH:
        raise TinvError(f"--max_sequence_length must be 2-{MAX_T5_LENGTH}, not {length}")
    if architecture is not None and not architecture.t5_max_length:
        raise TinvError(f"--max_sequence_length sets a T5 prompt's length; this {architecture.label} model has no "
                        "T5 encoder: leave it out")


def _say(text: str) -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `generate.py`: user errors print `error: <one line>` and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return run(args, _say)
    except TinvError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
