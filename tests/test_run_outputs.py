"""What a run leaves and says: readable file modes, messages on the right stream and no install
advice, what resume did, `--help` that helps, and the small truths of the output list."""

import logging
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import train_argv

from tinv_lib.embeddings.formats import load_embedding
from tinv_lib.training.textual_inversion import main

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- 2. file modes


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_every_file_a_run_writes_gets_the_mode_open_would_give(umask, tiny_sd1_path, training_images, tmp_path):
    previous = os.umask(umask)
    try:
        code = main(train_argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "2", "--save_steps", "1",
                          "--validation_steps", "2", "--validation_num_inference_steps", "1", "--checkpointing_steps",
                          "2", "--save_optimizer_state", "--log_csv_steps", "1", "--report_to", "tensorboard"))
    finally:
        os.umask(previous)
    assert code == 0
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert {"my-thing.pt", "my-thing.safetensors", "my-thing-1.pt", "my-thing-2.png", "trainable.safetensors",
            "optimizer.pt", "textual_inversion_loss.csv"} <= {path.name for path in files}
    wrong = {str(path.relative_to(tmp_path)): oct(stat.S_IMODE(path.stat().st_mode)) for path in files
             if stat.S_IMODE(path.stat().st_mode) != 0o666 & ~umask}
    assert wrong == {}, f"expected {oct(0o666 & ~umask)}"


# ---------------------------------------------------------------- 3. messages

_RUN_AND_REPORT = ("import sys; from tinv_lib.training.textual_inversion import main; code = main(sys.argv[1:]); "
                   "print('bitsandbytes imported:', 'bitsandbytes' in sys.modules); sys.exit(code)")


def _script(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _RUN_AND_REPORT, *argv], env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_run_prints_no_install_advice_and_keeps_errors_on_stderr(tiny_sd1_path, training_images, tmp_path):
    done = _script(*train_argv(tiny_sd1_path, training_images, tmp_path / "ok", "--max_train_steps", "2"))
    assert done.returncode == 0, done.stderr
    assert "bitsandbytes imported: False" in done.stdout
    for noise in ("torchvision", "pip install", "kernels", "Traceback"):
        assert noise not in done.stderr, done.stderr
    assert "Saved step 2" in done.stdout
    bad = _script(*train_argv(tiny_sd1_path, training_images, tmp_path / "bad", "--flip_p", "2"))
    assert bad.returncode == 2
    assert bad.stdout.strip() == "bitsandbytes imported: False"
    assert bad.stderr.strip() == "error: --flip_p must be in [0, 1], not 2.0"


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_only_the_known_irrelevant_library_messages_are_dropped():
    from tinv_lib.common.quiet import silence_known_noise

    silence_known_noise()
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    transformers_imports = logging.getLogger("transformers.utils.import_utils")
    collect = _Collect()
    levels = {logger: logger.level for logger in (bnb, transformers_imports)}
    for logger in levels:  # other tests may have turned these libraries' verbosity down
        logger.setLevel(logging.WARNING)
        logger.addHandler(collect)
    try:
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                    "`pip install kernels`", "No module named 'kernels'")
        transformers_imports.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                                     "`CLIPImageProcessorPil` for backward compatibility.")
        bnb.warning("a real bitsandbytes warning")
        transformers_imports.warning("`Thing` requires a newer torch")
    finally:
        for logger, level in levels.items():
            logger.setLevel(level)
            logger.removeHandler(collect)
    assert collect.messages == ["a real bitsandbytes warning", "`Thing` requires a newer torch"]


# ---------------------------------------------------------------- 4. resume says what it did


def test_resume_from_checkpoint_latest_says_what_it_did(tiny_sd1_path, training_images, tmp_path, capsys):
    flags = ("--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    assert main(train_argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "2", *flags)) == 0
    assert f"no checkpoint in {tmp_path}: starting at step 0" in capsys.readouterr().out.splitlines()
    assert main(train_argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "4", *flags)) == 0
    assert f"resumed from {tmp_path / 'checkpoint-2'} at step 2" in capsys.readouterr().out.splitlines()


# ---------------------------------------------------------------- 5. --help


def _help_lines(parser) -> dict[str, str]:
    """First option string of each flag -> its whole help text, rendered one flag per line."""
    narrow = parser.formatter_class
    parser.formatter_class = lambda prog: narrow(prog, max_help_position=1000, width=4000)
    try:
        text = parser.format_help()
    finally:
        parser.formatter_class = narrow
    found = {}
    for line in text.splitlines():
        match = re.match(r"^  (-\S.*?)(?:\s{2,}(.*))?$", line)
        if match:
            found[match[1].split()[0].rstrip(",")] = (match[2] or "").strip()
    assert len(found) == len(parser._actions)
    return found


def _parsers():
    from tinv_lib.preprocessing.cli import build_parser as preprocess_parser
    from tinv_lib.training.hypernetwork import build_parser as hypernetwork_parser
    from tinv_lib.training.textual_inversion import build_parser as embedding_parser

    return {"train_textual_inversion": embedding_parser(), "train_hypernetwork": hypernetwork_parser(),
            "preprocess": preprocess_parser()}


def test_help_marks_required_flags_shows_each_default_once_and_helps_every_flag():
    parsers = _parsers()
    required = {"train_textual_inversion": {"--pretrained_model_name_or_path", "--placeholder_token"},
                "train_hypernetwork": {"--pretrained_model_name_or_path", "--hypernetwork_name"},
                "preprocess": {"--source_dir", "--dest_dir"}}
    for script, parser in parsers.items():
        lines = _help_lines(parser)
        assert "(default: None)" not in parser.format_help(), script
        for flag, text in lines.items():
            assert text, f"{script} {flag} has no help line"
            assert text.lower().count("default") <= 1, f"{script} {flag}: {text}"
            assert text.endswith("(required)") == (flag in required[script]), f"{script} {flag}: {text}"
    embedding = _help_lines(parsers["train_textual_inversion"])
    for script in ("train_textual_inversion", "train_hypernetwork"):  # one of the two data sources
        assert _help_lines(parsers[script])["--train_data_dir"].endswith("this or --dataset_name is required")
    assert embedding["--filename_join_string"].endswith("(default: ' ')")
    assert embedding["--max_train_steps"].endswith("(default: 3000)")
    assert embedding["--seed"].endswith("(default: 0)")
    assert _help_lines(parsers["preprocess"])["--width"].endswith("(default: 512)")


# ---------------------------------------------------------------- 6. small truths


def test_the_csv_gets_a_row_at_the_last_step(tiny_sd1_path, training_images, tmp_path):
    assert main(train_argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "3")) == 0  # --log_csv_steps 10
    rows = (tmp_path / "textual_inversion_loss.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,epoch_step,loss,learn_rate" and [row.split(",")[0] for row in rows[1:]] == ["3"]


def test_convert_pt_to_safetensors_gives_the_file_training_wrote(tiny_sd1_path, training_images, tmp_path):
    from tinv_lib.embeddings.__main__ import main as embeddings_main

    assert main(train_argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "1")) == 0
    converted = tmp_path / "converted" / "my-thing.safetensors"
    converted.parent.mkdir()
    assert embeddings_main(["convert", str(tmp_path / "my-thing.pt"), str(converted)]) == 0
    assert converted.read_bytes() == (tmp_path / "my-thing.safetensors").read_bytes()
    assert load_embedding(converted).step == 1


def _normalised(name: str) -> str:
    """A file name with steps, dates and placeholders (`<step>`, `*`, `…`) taken out."""
    name = re.sub(r"<[^>]*>|\*|…|\d", "", name)
    return re.sub(r"-+", "-", name)


def test_the_readme_output_list_names_every_file_the_quickstart_writes(tiny_sd1_path, training_images, tmp_path):
    """The quickstart's flags (steps scaled down) and the README's list of results."""
    readme = (ROOT / "README.md").read_text()
    results = readme.split("Results, in `output/toy-concept/`:", 1)[1].split("\n## ", 1)[0]
    argv = train_argv(tiny_sd1_path, training_images, tmp_path, name="toy-concept")
    argv = argv[:argv.index("--report_to")] + ["--max_train_steps", "4", "--validation_steps", "2", "--save_steps", "2",
                                               "--checkpointing_steps", "4", "--validation_num_inference_steps", "1"]
    assert main(argv) == 0
    listed = _normalised(results)
    written = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file())
    missing = []
    for relative in written:
        top, _, rest = relative.partition("/")
        if top == "logs":
            want = "logs"
        elif top.startswith("checkpoint-"):
            want = "checkpoint-/"
        else:
            want = _normalised(relative)
        if want not in listed:
            missing.append(relative)
    assert missing == [], f"not in the README's list of results: {missing}"


def test_gitignore_covers_the_output_folders():
    for path, ignored in [("embeddings/x.pt", True), ("outputs/txt2img-images/a.png", True), ("output/run/x.pt", True),
                          ("embeddings-xl/toy-concept.safetensors", True), ("models/hypernetworks/a.pt", True),
                          ("tinv_lib/embeddings/formats.py", False)]:
        done = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert (done.returncode == 0) == ignored, path
