"""`--config FILE` values are checked like the same values on the command line: a wrong choice,
type or range, or an unknown key, is one `error:` line naming the file and the key, exit 2, before
any model loads or any output is written (docs/training.md, docs/preprocess.md)."""

from pathlib import Path

import pytest

from tinv_lib.preprocessing import cli as preprocess_cli
from tinv_lib.training import hypernetwork as hypernetwork_training
from tinv_lib.training import textual_inversion

TRAINERS = {"ti": textual_inversion, "hn": hypernetwork_training}


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a base model fails the test."""
    import tinv_lib.models.loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the config file was checked")

    monkeypatch.setattr(tinv_lib.models.loading, "load_base_model", refuse)


def _trainer_config(tmp_path: Path, kind: str, body: str, suffix: str = ".toml") -> Path:
    """A config file naming an (empty) model folder and data folder, plus `body`."""
    for folder in ("model", "data"):
        (tmp_path / folder).mkdir(exist_ok=True)
    name = 'placeholder_token = "my-thing"' if kind == "ti" else 'hypernetwork_name = "hn"'
    if suffix == ".yaml":
        name = name.replace(" = ", ": ")
        head = f"pretrained_model_name_or_path: {tmp_path / 'model'}\ntrain_data_dir: {tmp_path / 'data'}\n"
    else:
        head = f'pretrained_model_name_or_path = "{tmp_path / "model"}"\ntrain_data_dir = "{tmp_path / "data"}"\n'
    path = tmp_path / f"run{suffix}"
    path.write_text(f"{head}{name}\n{body}\n")
    return path


def _one_error_line(run, capsys, tmp_path: Path) -> str:
    code = run()
    printed = capsys.readouterr()
    lines = printed.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), printed.err
    assert not (tmp_path / "out").exists()
    return lines[0]


TRAINER_MISTAKES = [
    ('optimizer = "foo"', "run.toml: optimizer: invalid choice: 'foo' (choose from adamw, adamw8bit"),
    ('aspect_mode = "bucket"', "run.toml: aspect_mode: invalid choice: 'bucket' (choose from buckets, crop, stretch)"),
    ('max_train_steps = "many"', "run.toml: max_train_steps: invalid int value: 'many'"),
    ("resolution = 64.5", "run.toml: resolution: invalid int value: '64.5'"),
    ('shuffle_tags = "yes"', "run.toml: shuffle_tags: expected true or false, not 'yes'"),
    ("flip_p = 1.5", "run.toml: flip_p must be in [0, 1], not 1.5"),
    ("max_train_steps = 0", "run.toml: max_train_steps must be a positive integer, not 0"),
    ('learning_rate = "fast"', "run.toml: learning_rate 'fast': Invalid learning rate schedule"),
    ("bogus_flag = 1", "run.toml: unknown setting(s) bogus_flag"),
]


@pytest.mark.parametrize("kind", TRAINERS)
@pytest.mark.parametrize(("body", "message"), TRAINER_MISTAKES, ids=[body.split()[0] for body, _ in TRAINER_MISTAKES])
def test_trainer_config_mistakes_are_one_line_naming_file_and_key(kind, body, message, tmp_path, capsys, no_model_load,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _trainer_config(tmp_path, kind, body)
    line = _one_error_line(lambda: TRAINERS[kind].main(["--config", config.name, "--output_dir", "out"]),
                           capsys, tmp_path)
    assert line.startswith(f"error: {message}"), line


@pytest.mark.parametrize(("body", "message"), [
    ("num_vectors = 2.5", "run.toml: num_vectors: invalid int value: '2.5'"),
    ("num_vectors = 100", "run.toml: num_vectors must be 1-75"),
    ('train_encoders = "clip_x"', "run.toml: train_encoders: 'clip_x': give all, or a comma list of"),
])
def test_embedding_config_values_are_checked(body, message, tmp_path, capsys, no_model_load, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _trainer_config(tmp_path, "ti", body)
    line = _one_error_line(lambda: textual_inversion.main(["--config", config.name, "--output_dir", "out"]),
                           capsys, tmp_path)
    assert line.startswith(f"error: {message}"), line


def test_hypernetwork_config_choice_is_checked(tmp_path, capsys, no_model_load, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _trainer_config(tmp_path, "hn", "activation_func: swishy", suffix=".yaml")
    line = _one_error_line(lambda: hypernetwork_training.main(["--config", config.name, "--output_dir", "out"]),
                           capsys, tmp_path)
    assert line.startswith("error: run.yaml: activation_func: invalid choice: 'swishy'"), line


def test_command_line_wins_over_the_file_and_values_are_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _trainer_config(tmp_path, "ti", 'optimizer = "foo"\nmax_train_steps = 7\nshuffle_tags = true\n'
                                             'learning_rate = 0.01\noptimizer_args = ["amsgrad=True"]')
    with pytest.raises(Exception, match="optimizer: invalid choice"):
        textual_inversion.parse_args(["--config", config.name, "--optimizer", "adamw"])  # the file is checked anyway
    config.write_text(config.read_text().replace('optimizer = "foo"\n', ""))
    args = textual_inversion.parse_args(["--config", config.name, "--max_train_steps", "3"])
    assert args.max_train_steps == 3 and args.shuffle_tags is True and args.optimizer_args == ["amsgrad=True"]
    assert str(args.learning_rate) == "0.01"


def test_a_range_error_from_the_command_line_does_not_blame_the_file(tmp_path, capsys, no_model_load, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _trainer_config(tmp_path, "ti", "flip_p = 0.5")
    line = _one_error_line(lambda: textual_inversion.main(["--config", config.name, "--output_dir", "out",
                                                           "--flip_p", "2"]), capsys, tmp_path)
    assert line == "error: --flip_p must be in [0, 1], not 2.0"


def test_use_8bit_adam_is_one_optimizer_after_parsing(tmp_path, monkeypatch):
    """The normalisation happens while parsing; the checks only read."""
    monkeypatch.chdir(tmp_path)
    config = _trainer_config(tmp_path, "ti", "use_8bit_adam = true")
    try:
        args = textual_inversion.parse_args(["--config", config.name])
    except Exception as error:  # noqa: BLE001 - bitsandbytes may be missing: the check says so
        assert "bitsandbytes" in str(error)
        return
    assert args.optimizer == "adamw8bit"


def test_checks_do_not_change_the_arguments(tmp_path, monkeypatch):
    from tinv_lib.training.preflight import check_training_arguments

    monkeypatch.chdir(tmp_path)
    args = textual_inversion.parse_args(["--config", _trainer_config(tmp_path, "ti", "").name])
    args.use_8bit_adam, args.optimizer = True, "adamw"  # as if parsing had not normalised them
    before, text = dict(vars(args)), {key: repr(value) for key, value in vars(args).items()}
    try:
        check_training_arguments(args)
    except Exception:  # noqa: BLE001 - only whether the namespace changed matters here
        pass
    assert vars(args).keys() == before.keys() and all(vars(args)[key] is value for key, value in before.items())
    assert {key: repr(value) for key, value in vars(args).items()} == text


PREPROCESS_MISTAKES = [
    ('existing_caption = "add"', "p.toml: existing_caption: invalid choice: 'add' (choose from ignore, copy, prepend, "
                                 "append)"),
    ('width = "wide"', "p.toml: width: invalid int value: 'wide'"),
    ("width = 0", "p.toml: width: --width/--height must be positive"),
    ("flipped = true", "p.toml: unknown setting(s) flipped"),
]


@pytest.mark.parametrize(("body", "message"), PREPROCESS_MISTAKES, ids=[body.split()[0] for body, _ in PREPROCESS_MISTAKES])
def test_preprocess_config_mistakes_are_one_line_naming_file_and_key(body, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    config = tmp_path / "p.toml"
    config.write_text(f'source_dir = "src"\ndest_dir = "out"\n{body}\n')
    line = _one_error_line(lambda: preprocess_cli.main(["--config", "p.toml"]), capsys, tmp_path)
    assert line.startswith(f"error: {message}"), line


def test_preprocess_takes_its_folders_from_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    (tmp_path / "p.yaml").write_text("source_dir: src\ndest_dir: out\nflip: true\nwidth: 64\nface_model:\n")
    args = preprocess_cli.parse_args(["--config", "p.yaml", "--width", "128"])
    assert (args.source_dir, args.dest_dir, args.flip, args.width, args.face_model) == ("src", "out", True, 128, None)
