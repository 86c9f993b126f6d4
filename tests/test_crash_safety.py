"""No lost work: flags are checked before the model loads, a failing preview only turns previews
off, and any other failure inside the loop saves the training before the run ends."""

from pathlib import Path

import pytest
from helpers import train_argv

from tinv_lib.embeddings.formats import load_embedding
from tinv_lib.hypernetworks import load_hypernetwork
from tinv_lib.training import hypernetwork as hypernetwork_training
from tinv_lib.training import textual_inversion
from tinv_lib.training.checkpoints import list_checkpoints, load_checkpoint


def _hn_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return train_argv(model, data, out, *extra, name="hn", hypernetwork=True)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the base model is loaded: these errors must come first."""
    import tinv_lib.models.loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(tinv_lib.models.loading, "load_base_model", refuse)


BAD_FLAGS = [
    (("--resolution", "63"), "--resolution 63 must be a multiple of 8"),
    (("--max_train_steps", "0"), "--max_train_steps must be a positive integer"),
    (("--validation_num_inference_steps", "0"), "--validation_num_inference_steps must be a positive integer"),
    (("--lr_warmup_steps", "-1"), "--lr_warmup_steps must be 0 (off) or a positive integer"),
    (("--flip_p", "1.5"), "--flip_p must be in [0, 1]"),
    (("--tag_dropout", "1"), "--tag_dropout must be in [0, 1)"),
    (("--num_vectors", "0"), "--num_vectors must be 1-75"),
    (("--template_file", "no-such-template"), "template 'no-such-template' not found"),
    (("--resume_from_embedding", "missing.pt"), "--resume_from_embedding missing.pt: no such file"),
    (("--resume_from_checkpoint", "checkpoint-9"), "--resume_from_checkpoint checkpoint-9: not a checkpoint folder"),
    (("--learning_rate", "fast"), "Invalid learning rate schedule"),
    (("--max_grad_norm", "big"), "--max_grad_norm 'big'"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=[flags[0] for flags, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_errors_before_the_model_loads(flags, message, tiny_sd1_path, training_images, tmp_path,
                                                              capsys, no_model_load):
    out = tmp_path / "out"
    assert textual_inversion.main(train_argv(tiny_sd1_path, training_images, out, *flags)) == 2
    printed = capsys.readouterr()
    lines = printed.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], printed.err
    assert printed.out == "" and not out.exists()


def test_missing_files_and_bad_hypernetwork_options_fail_before_the_model_loads(tiny_sd1_path, training_images, tmp_path,
                                                                                capsys, no_model_load):
    cases = [
        (train_argv(tmp_path / "no-model", training_images, tmp_path / "out"), "--pretrained_model_name_or_path"),
        (train_argv(tiny_sd1_path, tmp_path / "no-data", tmp_path / "out"), "--train_data_dir"),
        (_hn_argv(tiny_sd1_path, training_images, tmp_path / "out", "--dropout_structure", "0, 1.5, 0"),
         "dropout structure"),
        (_hn_argv(tiny_sd1_path, training_images, tmp_path / "out", "--resume_from_hypernetwork", "gone.pt"),
         "--resume_from_hypernetwork gone.pt: no such file"),
    ]
    for argv, message in cases:
        main = hypernetwork_training.main if "--hypernetwork_name" in argv else textual_inversion.main
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_a_failing_preview_is_one_notice_and_training_goes_on(tiny_sd1_path, training_images, tmp_path, capsys,
                                                              monkeypatch):
    calls = []

    def broken_preview(self, *args, **kwargs):
        calls.append(args)
        raise ValueError("`height` and `width` have to be divisible by 8 but are 63 and 63.\nmore detail")

    monkeypatch.setattr(textual_inversion.TextualInversionTask, "preview", broken_preview)
    code = textual_inversion.main(train_argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "4",
                                        "--validation_steps", "1", "--checkpointing_steps", "4"))
    err = capsys.readouterr().err
    assert code == 0, err
    assert len(calls) == 1, "previews went on after one failed"
    notices = [line for line in err.splitlines() if line.startswith("notice:")]
    assert notices == ["notice: the preview at step 1 failed (ValueError: `height` and `width` have to be divisible "
                       "by 8 but are 63 and 63.); previews are off for the rest of this run, training goes on"]
    assert load_embedding(tmp_path / "my-thing.pt").step == 4
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-4"]


def _fail_on_call(monkeypatch, cls, number: int) -> None:
    """Make `cls.conditioning` (the forward pass of a step) raise on its `number`-th call."""
    original = cls.conditioning
    count = [0]

    def conditioning(self, prompts):
        count[0] += 1
        if count[0] == number:
            raise RuntimeError("injected failure\nsecond line of the message")
        return original(self, prompts)

    monkeypatch.setattr(cls, "conditioning", conditioning)


def test_a_failure_inside_a_step_saves_the_embedding_and_a_checkpoint(tiny_sd1_path, training_images, tmp_path,
                                                                      capsys, monkeypatch):
    _fail_on_call(monkeypatch, textual_inversion.TextualInversionTask, 4)  # steps 1-3 finish, step 4 breaks
    argv = train_argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "6")
    code = textual_inversion.main(argv)
    printed = capsys.readouterr()
    assert code == 1, printed.err
    assert "Traceback" not in printed.err
    logs = list(tmp_path.glob("crash-*.log"))
    assert len(logs) == 1
    error = printed.err.strip().splitlines()[-1]
    assert error == (f"error: training failed after step 3 (RuntimeError: injected failure); saved "
                     f"{tmp_path / 'my-thing.pt'}, {tmp_path / 'my-thing.safetensors'}, {tmp_path / 'checkpoint-3'}; "
                     f"traceback in {logs[0]}")
    log = logs[0].read_text()
    assert "Traceback (most recent call last)" in log and "second line of the message" in log
    saved = load_embedding(tmp_path / "my-thing.pt")
    assert saved.step == 3 and load_embedding(tmp_path / "my-thing.safetensors").step == 3
    state = load_checkpoint(tmp_path / "checkpoint-3", "textual_inversion")
    assert state.step == 3
    monkeypatch.undo()
    assert textual_inversion.main([*argv, "--resume_from_checkpoint", "latest"]) == 0
    assert load_embedding(tmp_path / "my-thing.pt").step == 6


def test_a_failure_inside_a_hypernetwork_step_saves_it_too(tiny_sd1_path, training_images, tmp_path, capsys,
                                                           monkeypatch):
    _fail_on_call(monkeypatch, hypernetwork_training.HypernetworkTask, 3)
    code = hypernetwork_training.main(_hn_argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "5"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: training failed after step 2 (RuntimeError: injected failure)")
    assert load_hypernetwork(tmp_path / "hn.pt").step == 2
    assert load_checkpoint(tmp_path / "checkpoint-2", "hypernetwork").step == 2
