"""`python -m tinv_lib.embeddings`: look inside embedding files and convert between formats.

    inspect FILE...   one JSON object per file: name, format, vectors, dim (a dict per encoder
                      for SDXL), step, sd_checkpoint, sd_checkpoint_name, checksum, shorthash
    inspect --diagnose FILE... --model MODEL
                      per file: one line per vector (norm, its percentile among the model's
                      vocabulary norms, nearest tokens) and any warnings (on stderr)
    convert SRC DST   write SRC in the format DST's extension names (.pt .safetensors .bin .png)

Unknown, damaged or unsafe input: a one-line reason on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from tinv_lib.common.errors import TinvError
from tinv_lib.embeddings.formats import Embedding, load_embedding, save_embedding

EXIT_BAD_INPUT = 2


def describe(embedding: Embedding) -> dict:
    """The `inspect` record of one embedding."""
    return {
        "file": str(embedding.path) if embedding.path else None,
        "name": embedding.name,
        "format": embedding.format,
        "vectors": embedding.vector_counts(),
        "dim": embedding.dim,
        "step": embedding.step,
        "sd_checkpoint": embedding.sd_checkpoint,
        "sd_checkpoint_name": embedding.sd_checkpoint_name,
        "checksum": embedding.checksum(),
        "shorthash": embedding.shorthash,
    }


def inspect_files(paths: list[str]) -> int:
    """Print one JSON line per readable file and one error line per unreadable one."""
    status = 0
    for path in paths:
        try:
            print(json.dumps(describe(load_embedding(path))), flush=True)
        except TinvError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            status = EXIT_BAD_INPUT
    return status


def diagnose_files(paths: list[str], model: str, model_config: str | None) -> int:
    """Print each file's diagnostics against `model`'s vocabulary (warnings on stderr); one
    error line per file that cannot be read or does not fit the model."""
    from transformers.utils import logging as transformers_logging

    from tinv_lib.embeddings import diagnostics

    transformers_logging.disable_progress_bar()  # stderr is for warnings and errors
    vocabularies = diagnostics.load_vocabularies(model, model_config)
    status = 0
    for path in paths:
        try:
            embedding, records = _diagnosis(path, vocabularies)
        except TinvError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            status = EXIT_BAD_INPUT
            continue
        step = "no step recorded" if embedding.step is None else f"step {embedding.step}"  # SDXL .pt files keep none
        print(f"{path}: {embedding.name} ({embedding.format}, {step})")
        print("\n".join(f"  {line}" for line in diagnostics.summary_lines(embedding.name, records)), flush=True)
        for line in diagnostics.warnings_for(embedding.name, records):
            print(line, file=sys.stderr, flush=True)
    return status


def _diagnosis(path: str, vocabularies: dict) -> tuple[Embedding, list]:
    """The embedding in `path` and its diagnostics; a misfit names the file."""
    from tinv_lib.embeddings.diagnostics import diagnose_embedding

    embedding = load_embedding(path)
    try:
        return embedding, diagnose_embedding(embedding.vectors, vocabularies)
    except TinvError as error:
        raise TinvError(f"{path}: {error}") from None


def convert_file(source: str, target: str, name: str | None, image: str | None, overwrite: bool) -> int:
    """Read `source`, write `target`. The embedding is renamed to the target's stem (the file
    name is the trigger word in A1111 and ComfyUI) unless `name` is given."""
    target_path = Path(target)
    if target_path.exists() and not overwrite:
        raise TinvError(f"{target}: already exists (pass --overwrite to replace it)")
    if target_path.resolve() == Path(source).resolve():
        raise TinvError(f"{target}: source and destination are the same file")
    embedding = dataclasses.replace(load_embedding(source), name=name or target_path.stem)
    options = {}
    if image:
        if target_path.suffix.lower() != ".png":
            raise TinvError("--image only applies when converting to .png")
        from tinv_lib.common.images import UnreadableImage, read_image

        try:
            options["image"] = read_image(image).convert("RGB")
        except UnreadableImage as error:
            raise TinvError(f"{image}: not a readable image ({error})") from None
    save_embedding(embedding, target_path, **options)
    print(json.dumps(describe(load_embedding(target_path))), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="python -m tinv_lib.embeddings", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print one JSON object per embedding file")
    inspect.add_argument("files", nargs="+", metavar="FILE")
    inspect.add_argument("--diagnose", action="store_true",
                         help="print each vector's norm, norm percentile and nearest tokens in --model's vocabulary, "
                              "and warnings")
    inspect.add_argument("--model", help="model folder (or single file with --model_config) to diagnose against")
    inspect.add_argument("--model_config", help="config folder for a single-file --model")
    convert = commands.add_parser("convert", help="convert an embedding to the format of DST's extension")
    convert.add_argument("source", metavar="SRC")
    convert.add_argument("target", metavar="DST", help=".pt, .safetensors, .bin or .png")
    convert.add_argument("--name", help="embedding name to store (default: DST's file stem)")
    convert.add_argument("--image", help="picture for a .png embedding (default: a colour field)")
    convert.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "inspect" and args.diagnose != bool(args.model):
        parser.error("--diagnose needs --model MODEL" if args.diagnose else "--model is only used with --diagnose")
    try:
        if args.command == "inspect" and args.diagnose:
            return diagnose_files(args.files, args.model, args.model_config)
        if args.command == "inspect":
            return inspect_files(args.files)
        return convert_file(args.source, args.target, args.name, args.image, args.overwrite)
    except TinvError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
