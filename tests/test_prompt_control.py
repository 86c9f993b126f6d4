"""Issue 35's options, their mechanics: norm control (`--norm_mode`, `--norm_target`), early
stopping on the fixed-batch loss (`--early_stopping dvar`) and the best step (`--keep_best`).

What the options do to capture and prompt edits is measured on the concept suite, not here
(docs/training.md, "Norm control, early stopping and the best step")."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from helpers import run_training, train_argv
from safetensors.torch import load_file

from tinv_lib.embeddings.diagnostics import vocabularies_of
from tinv_lib.embeddings.formats import load_embedding
from tinv_lib.training.early_stopping import FixedBatchHistory, dvar_ratio
from tinv_lib.training.hypernetwork import HypernetworkTask
from tinv_lib.training.hypernetwork import parse_args as parse_hypernetwork_args
from tinv_lib.training.task import TrainingHooks
from tinv_lib.training.textual_inversion import TextualInversionTask, main, parse_args

pytestmark = pytest.mark.usefixtures("one_thread")

# A run whose fixed-batch loss falls for some 15 steps and then settles (tiny SD1, 4 images).
FALLING = ("--learning_rate", "0.05", "--template_file", "subject", "--train_batch_size", "4",
           "--validation_loss_steps", "1")


def _ti(model: Path, data: Path, out: Path, *extra: str):
    args = parse_args(train_argv(model, data, out, *FALLING, *extra))
    return args, TextualInversionTask(args)


def _fixed_batch_losses(out: Path) -> dict[int, float]:
    with open(out / "validation_loss.csv") as handle:
        return {int(row["step"]): float(row["validation_loss"]) for row in csv.DictReader(handle)}


def _norms(task: TextualInversionTask) -> dict[str, torch.Tensor]:
    return {key: torch.linalg.vector_norm(value.detach().float(), dim=1) for key, value in task.vectors.items()}


# ---------------------------------------------------------------- norm control


@pytest.mark.parametrize(("arch", "mode", "target"), [
    ("sd1", "preserve", "vocab_median"), ("sd1", "direction", "init"), ("sd1", "preserve", "3"),
    ("sdxl", "direction", "vocab_median"), ("sd2", "preserve", "init"), ("flux", "direction", "vocab_median"),
    ("sd3", "preserve", "init"),
])
def test_every_vector_stays_at_its_target_norm_after_every_step(arch, mode, target, request, training_images,
                                                                 tmp_path):
    """The norm of every vector is its target's, to 1e-6, after each of the steps (and at the
    start); the vectors still move. Targets: the median row norm of the vector's own encoder's
    vocabulary (times the number), or the vector's norm at init."""
    model = request.getfixturevalue(f"tiny_{arch}_path")
    args, task = _ti(model, training_images, tmp_path, "--max_train_steps", "6", "--num_vectors", "2",
                     "--norm_mode", mode, "--norm_target", target)
    seen, expected = [], {}

    def start(run):
        medians = {key: vocabulary.median_norm for key, vocabulary in vocabularies_of(run.family).items()}
        for key, value in task.vectors.items():
            if target == "init":
                from tinv_lib.embeddings.create import create_embedding_vectors

                init = run.family.architecture.unpack_vectors(create_embedding_vectors(run.family, "cat", 2))[key]
                expected[key] = torch.linalg.vector_norm(init.float(), dim=1)
            else:
                scale = 1.0 if target == "vocab_median" else float(target)
                expected[key] = torch.full((value.shape[0],), scale * medians[key])
        seen.append(_norms(task))

    hooks = TrainingHooks(on_start=start, on_step=lambda report: seen.append(_norms(task)))
    assert run_training(args, task, hooks) == 0
    assert len(seen) == 7
    for norms in seen:
        for key, norm in norms.items():
            torch.testing.assert_close(norm.cpu(), expected[key], atol=1e-6, rtol=0)
    saved = task.family.architecture.unpack_vectors(load_embedding(tmp_path / "my-thing.safetensors").vectors)
    for key, value in saved.items():
        torch.testing.assert_close(torch.linalg.vector_norm(value, dim=1), expected[key], atol=1e-6, rtol=0)
        assert not torch.allclose(value, task.initial[key].cpu()), "the vectors did not move"


def test_by_default_only_the_direction_is_learned_the_norm_kept_at_init(tiny_sd1_path, training_images, tmp_path):
    """The default (`--norm_mode auto` on init text): only the direction is learned, each vector
    keeps its init norm, and that alone lowers the fixed-batch loss."""
    args, task = _ti(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "30", "--learning_rate", "0.2",
                     "--keep_best")  # --keep_best: the fixed-batch loss on the training images
    assert (args.norm_mode, args.norm_target) == ("direction", None)
    norms = []
    hooks = TrainingHooks(on_step=lambda report: norms.append(_norms(task)["emb_params"].clone()))
    assert run_training(args, task, hooks) == 0
    init = torch.linalg.vector_norm(task.initial["emb_params"], dim=1)
    assert float(init[0]) != pytest.approx(vocabularies_of(task.family)["emb_params"].median_norm, abs=1e-3)
    assert len(norms) == 30 and all(torch.allclose(norm.cpu(), init, atol=1e-6, rtol=0) for norm in norms)
    losses = _fixed_batch_losses(tmp_path)
    print(f"fixed-batch loss, direction only: step 1 {losses[1]:.6f} -> step 30 {losses[30]:.6f}")
    assert losses[30] < losses[1]
    cosine = torch.nn.functional.cosine_similarity(task.vectors["emb_params"].detach().cpu(),
                                                   task.initial["emb_params"], dim=1)
    assert float(cosine[0]) < 0.99, "the direction did not move"


@pytest.mark.parametrize(("extra", "mode", "notice"), [
    ((), "direction", None),
    (("--norm_target", "vocab_median"), "direction", None),
    (("--initializer_token", ""), "none", '--initializer_token "" starts from zero vectors'),
    (("--ema_decay", "0.9", "--save_ema"), "none", "--save_ema saves an average"),
    (("--optimizer", "schedulefree_adamw"), "none", "schedule-free saves an average"),
])
def test_auto_picks_direction_unless_the_run_rules_it_out(extra, mode, notice, tiny_sd1_path, training_images,
                                                          tmp_path, capsys):
    """`--norm_mode auto` (the default) is resolved before the model loads, into the mode the
    settings file records; where direction cannot hold, a one-line notice says why."""
    argv = train_argv(tiny_sd1_path, training_images, tmp_path)
    if "--initializer_token" in extra:
        argv[argv.index("--initializer_token") + 1] = ""
    else:
        argv += list(extra)
    assert parse_args(argv).norm_mode == mode
    err = capsys.readouterr().err
    assert (notice in err) if notice else "--norm_mode auto" not in err


def test_auto_trains_a_resumed_file_with_a_zero_vector_without_norm_control(tiny_sd1_path, training_images,
                                                                            tmp_path, capsys):
    from tinv_lib.embeddings.formats import Embedding, save_pt

    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    vectors[1] = 0
    save_pt(Embedding("old", vectors, step=7), tmp_path / "old.pt")
    argv = train_argv(tiny_sd1_path, training_images, tmp_path / "run", "--resume_from_embedding",
                      str(tmp_path / "old.pt"))
    assert parse_args(argv).norm_mode == "none"
    assert "old.pt holds zero vectors" in capsys.readouterr().err
    assert main(argv + ["--max_train_steps", "9", "--norm_mode", "direction"]) == 2  # named, it is refused once loaded
    assert "vector 1 (emb_params) starts at zero" in capsys.readouterr().err


def test_a_checkpoint_trained_without_norm_control_resumes_without_it(tiny_sd1_path, training_images, tmp_path,
                                                                      capsys):
    """A checkpoint of a run without norm control (`--norm_mode none`, or any run from before the
    default changed) resumed under the default goes on without it, bit for bit as the
    uninterrupted run; one trained with it resumes with it."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args, task = _ti(tiny_sd1_path, training_images, whole, "--max_train_steps", "12", "--norm_mode", "none")
    assert run_training(args, task) == 0
    args, task = _ti(tiny_sd1_path, training_images, parts, "--max_train_steps", "6", "--norm_mode", "none",
                     "--checkpointing_steps", "6")
    assert run_training(args, task) == 0
    args, task = _ti(tiny_sd1_path, training_images, parts, "--max_train_steps", "12", "--resume_from_checkpoint",
                     "latest")
    assert args.norm_mode == "none" and "checkpoint-6 was trained without it" in capsys.readouterr().err
    assert run_training(args, task) == 0
    a, b = load_embedding(whole / "my-thing.safetensors"), load_embedding(parts / "my-thing.safetensors")
    assert a.step == b.step == 12 and torch.equal(a.vectors, b.vectors)
    directed = tmp_path / "directed"
    args, task = _ti(tiny_sd1_path, training_images, directed, "--max_train_steps", "2", "--checkpointing_steps", "2")
    assert run_training(args, task) == 0
    args = parse_args(train_argv(tiny_sd1_path, training_images, directed, *FALLING, "--max_train_steps", "4",
                                 "--resume_from_checkpoint", "latest"))
    assert args.norm_mode == "direction"


def test_direction_projects_the_gradient_onto_the_tangent_space():
    """`project_gradients` leaves no component along the vector; `retract` puts it back on its sphere."""
    from tinv_lib.training.norm_control import NormControl

    generator = torch.Generator().manual_seed(0)
    vectors = {"emb_params": torch.nn.Parameter(torch.randn(3, 8, generator=generator))}
    control = NormControl.build("direction", 2.0, vectors, {"emb_params": 0.5})
    vectors["emb_params"].grad = torch.randn(3, 8, generator=generator)
    scale = torch.linalg.vector_norm(vectors["emb_params"].grad, dim=1) * torch.linalg.vector_norm(
        vectors["emb_params"].detach(), dim=1)
    control.project_gradients()
    radial = (vectors["emb_params"].grad * vectors["emb_params"].detach()).sum(dim=1)
    torch.testing.assert_close(radial / scale, torch.zeros(3), atol=1e-6, rtol=0)  # float32 rounding, no more
    with torch.no_grad():
        vectors["emb_params"].add_(vectors["emb_params"].grad)
    control.retract()
    torch.testing.assert_close(torch.linalg.vector_norm(vectors["emb_params"].detach(), dim=1), torch.full((3,), 1.0))


# ---------------------------------------------------------------- early stopping


def test_dvar_stops_on_a_plateau_and_not_on_a_falling_loss():
    """DVAR's rule (var(last W) / var(all) < threshold) on synthetic losses: a loss that falls
    and then settles (small noise) stops soon after it settles; a loss that keeps falling at
    a steady rate, noise included, does not stop within 2.5 windows (the ratio of a line is
    (W²-1)/(n²-1): a steady fall stops only after about W/sqrt(threshold) evaluations)."""
    noise = random.Random(0)
    window, threshold = 20, 0.15

    def first_stop(losses):
        return next((n for n in range(1, len(losses) + 1) if (r := dvar_ratio(losses[:n], window)) is not None
                     and r < threshold), None)

    plateau = [1.0 - 0.5 * min(i, 30) / 30 + noise.gauss(0, 0.002) for i in range(120)]
    stop = first_stop(plateau)
    assert stop is not None and 30 < stop <= 30 + 2 * window
    falling = [1.0 - 0.004 * i + noise.gauss(0, 0.002) for i in range(50)]
    assert first_stop(falling) is None
    assert dvar_ratio([0.5] * 20, window) == 0.0  # a loss that never moves has settled
    assert dvar_ratio([1.0, 0.9], window) is None  # fewer losses than the window: no decision


def test_fixed_batch_history_survives_json_exactly():
    history = FixedBatchHistory()
    for step, loss in enumerate([0.31, 0.1 + 0.2, 0.29999999999999993, 0.4], start=1):
        history.add(step * 5, loss)
    assert (history.best_step, history.best_loss) == (15, 0.29999999999999993)
    again = FixedBatchHistory.from_state(json.loads(json.dumps(history.state())))
    assert again == history


def test_early_stopping_ends_the_run_once_the_loss_settles(tiny_sd1_path, training_images, tmp_path, capsys):
    args, task = _ti(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "40", "--early_stopping", "dvar",
                     "--early_stopping_window", "10", "--early_stopping_threshold", "0.15",
                     "--checkpointing_steps", "100")
    assert run_training(args, task) == 0
    stopped = load_embedding(tmp_path / "my-thing.safetensors").step
    assert 10 < stopped < 40
    assert f"early stopping at step {stopped}" in capsys.readouterr().err
    with open(tmp_path / "validation_loss.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == list(range(1, stopped + 1))
    assert rows[8]["dvar_ratio"] == "" and float(rows[-1]["dvar_ratio"]) < 0.15 <= float(rows[-2]["dvar_ratio"])
    state = json.loads((tmp_path / f"checkpoint-{stopped}" / "state.json").read_text())
    assert state["fixed_batch"]["stopped_at"] == stopped
    # Resuming a run that stopped early trains nothing more.
    args, task = _ti(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "40", "--early_stopping", "dvar",
                     "--early_stopping_window", "10", "--early_stopping_threshold", "0.15",
                     "--checkpointing_steps", "100", "--resume_from_checkpoint", "latest")
    assert run_training(args, task) == 0
    assert load_embedding(tmp_path / "my-thing.safetensors").step == stopped


# ---------------------------------------------------------------- the best step


def test_best_file_equals_the_intermediate_file_and_checkpoint_of_its_step(tiny_sd1_path, training_images, tmp_path):
    """The best step by the fixed-batch loss (as validation_loss.csv shows it) is written as
    `<name>-best.safetensors` with its step, equal to that step's files. (In this run the loss
    wobbles under a high rate: the best step is step 15 of 21 here.)"""
    args, task = _ti(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "21", "--learning_rate", "0.5",
                     "--keep_best", "--validation_loss_steps", "3", "--save_steps", "3", "--checkpointing_steps", "3",
                     "--norm_mode", "preserve", "--norm_target", "3")
    assert run_training(args, task) == 0
    losses = _fixed_batch_losses(tmp_path)
    best_step = min(losses, key=losses.get)
    best = load_embedding(tmp_path / "my-thing-best.safetensors")
    assert best.step == best_step
    same_step = tmp_path / "embeddings" / f"my-thing-{best_step}.pt" if best_step < 21 else tmp_path / "my-thing.pt"
    assert torch.equal(best.vectors, load_embedding(same_step).vectors)
    checkpoint = load_file(str(tmp_path / f"checkpoint-{best_step}" / "trainable.safetensors"))
    assert torch.equal(best.vectors, checkpoint["emb_params"])
    state = json.loads((tmp_path / "checkpoint-21" / "state.json").read_text())
    assert state["fixed_batch"]["best_step"] == best_step
    assert state["fixed_batch"]["best_loss"] == pytest.approx(losses[best_step], abs=1e-7)


def test_hypernetwork_best_file_equals_the_intermediate_file_of_its_step(tiny_sd1_path, training_images, tmp_path):
    args = parse_hypernetwork_args(train_argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "8",
                                              "--learning_rate", "0.001", "--keep_best", "--validation_loss_steps",
                                              "2", "--save_steps", "2", "--template_file", "subject",
                                              hypernetwork=True))
    assert run_training(args, HypernetworkTask(args)) == 0
    losses = _fixed_batch_losses(tmp_path)
    best_step = min(losses, key=losses.get)
    best = torch.load(tmp_path / "my-thing-best.pt", weights_only=True)
    assert best["step"] == best_step
    if best_step < 8:
        intermediate = torch.load(tmp_path / "hypernetworks" / f"my-thing-{best_step}.pt", weights_only=True)
        for size, layers in best.items():
            if isinstance(size, int):
                assert all(torch.equal(a, b) for a, b in zip(
                    [t for layer in layers for t in layer.values()],
                    [t for layer in intermediate[size] for t in layer.values()]))


# ---------------------------------------------------------------- exact resume


@pytest.mark.parametrize("options", [
    ("--norm_mode", "preserve"),
    ("--norm_mode", "direction", "--norm_target", "init"),
    ("--early_stopping", "dvar", "--early_stopping_window", "8", "--early_stopping_threshold", "0.15", "--keep_best"),
], ids=["preserve", "direction", "dvar+best"])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(options, tiny_sd1_path, training_images,
                                                                  tmp_path):
    """Stopped at step 8 and resumed, a run ends bit for bit as the uninterrupted one: vectors,
    the fixed-batch history (best step, early stop) and the best file."""
    flags = ("--checkpointing_steps", "4", *options)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args, task = _ti(tiny_sd1_path, training_images, whole, "--max_train_steps", "30", *flags)
    assert run_training(args, task) == 0
    args, task = _ti(tiny_sd1_path, training_images, parts, "--max_train_steps", "8", *flags)
    assert run_training(args, task) == 0
    args, task = _ti(tiny_sd1_path, training_images, parts, "--max_train_steps", "30", *flags,
                     "--resume_from_checkpoint", "latest")
    assert run_training(args, task) == 0
    a, b = load_embedding(whole / "my-thing.safetensors"), load_embedding(parts / "my-thing.safetensors")
    assert a.step == b.step and torch.equal(a.vectors, b.vectors)
    last = f"checkpoint-{a.step}"
    state_a = json.loads((whole / last / "state.json").read_text())
    state_b = json.loads((parts / last / "state.json").read_text())
    assert state_a.get("fixed_batch") == state_b.get("fixed_batch")
    assert state_a.get("norm_control") == state_b.get("norm_control")
    if "--keep_best" in options:
        assert a.step < 30, "the run was meant to stop early"
        best_a, best_b = load_embedding(whole / "my-thing-best.safetensors"), load_embedding(parts / "my-thing-best.safetensors")
        assert best_a.step == best_b.step and torch.equal(best_a.vectors, best_b.vectors)
    if (whole / "validation_loss.csv").is_file():
        assert _fixed_batch_losses(whole) == _fixed_batch_losses(parts)


def test_a_sigterm_between_evaluations_resumes_exactly(tiny_sd1_path, training_images, tmp_path):
    """SIGTERM at a step that is no multiple of --validation_loss_steps: the loss of that step is
    logged but kept out of the history (the uninterrupted run never measured it), so the resumed
    run stops early at the same step with the same best file and vectors."""
    import os
    import signal

    flags = ("--max_train_steps", "60", "--validation_loss_steps", "3", "--early_stopping", "dvar",
             "--early_stopping_window", "15", "--keep_best", "--checkpointing_steps", "100",
             "--norm_mode", "none")  # a loss that settles within the 60 steps
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args, task = _ti(tiny_sd1_path, training_images, whole, *flags)
    assert run_training(args, task) == 0

    def terminate(report):
        if report.step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    args, task = _ti(tiny_sd1_path, training_images, parts, *flags)
    assert run_training(args, task, TrainingHooks(on_step=terminate)) == 143
    assert 8 in _fixed_batch_losses(parts)  # logged at the interruption (the step after the signal) ...
    assert json.loads((parts / "checkpoint-8" / "state.json").read_text())["fixed_batch"]["steps"] == [3, 6]  # not kept
    args, task = _ti(tiny_sd1_path, training_images, parts, *flags, "--resume_from_checkpoint", "latest")
    assert run_training(args, task) == 0
    a, b = load_embedding(whole / "my-thing.safetensors"), load_embedding(parts / "my-thing.safetensors")
    assert a.step == b.step < 60 and torch.equal(a.vectors, b.vectors)
    best_a, best_b = load_embedding(whole / "my-thing-best.safetensors"), load_embedding(parts / "my-thing-best.safetensors")
    assert best_a.step == best_b.step and torch.equal(best_a.vectors, best_b.vectors)
    state = [json.loads((out / f"checkpoint-{a.step}" / "state.json").read_text())["fixed_batch"] for out in (whole, parts)]
    assert state[0] == state[1]


def test_hypernetwork_training_stops_early_too(tiny_sd1_path, training_images, tmp_path, capsys):
    args = parse_hypernetwork_args(train_argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "60",
                                              "--learning_rate", "0.001", "--early_stopping", "dvar",
                                              "--validation_loss_steps", "1", "--early_stopping_window", "8",
                                              "--template_file", "subject", hypernetwork=True))
    assert run_training(args, HypernetworkTask(args)) == 0
    step = torch.load(tmp_path / "my-thing.pt", weights_only=True)["step"]
    assert 8 < step < 60
    assert f"early stopping at step {step}" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("extra", "message"), [
    (("--norm_target", "init", "--norm_mode", "none"), "--norm_target init has no effect without --norm_mode"),
    (("--norm_target", "3", "--ema_decay", "0.9", "--save_ema"), "(--save_ema saves an average"),
    (("--norm_mode", "direction", "--initializer_token", ""), "zero vectors"),
    (("--norm_mode", "preserve", "--ema_decay", "0.9", "--save_ema"), "--save_ema"),
    (("--norm_mode", "preserve", "--optimizer", "schedulefree_adamw"), "schedulefree_adamw"),
    (("--early_stopping_window", "50"), "has no effect without --early_stopping dvar"),
    (("--early_stopping", "dvar", "--validation_loss_steps", "100", "--early_stopping_window", "150"),
     "fewer than 2 fixed-batch losses"),
    (("--early_stopping", "dvar", "--early_stopping_threshold", "1.5"), "must be in (0, 1)"),
    (("--dataset_name", "some/set", "--streaming", "--keep_best"), "--keep_best with --streaming needs --validation_data_dir"),
])
def test_bad_option_values_fail_in_one_line_before_the_model_loads(extra, message, tiny_sd1_path, training_images,
                                                                   tmp_path, capsys):
    argv = train_argv(tiny_sd1_path, training_images, tmp_path, *extra)
    if "--initializer_token" in extra:
        argv = [a for a in argv if a != "cat"]
        argv.remove("--initializer_token")
        argv += ["--initializer_token", ""]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_a_norm_target_that_is_not_one_fails_in_argparse_words(tiny_sd1_path, training_images, tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(train_argv(tiny_sd1_path, training_images, tmp_path, "--norm_mode", "preserve", "--norm_target", "-1"))
    assert caught.value.code == 2
    assert "'-1': give vocab_median, init, or a positive number" in capsys.readouterr().err


def test_hypernetworks_have_no_norm_options(tiny_sd1_path, training_images, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_hypernetwork_args(train_argv(tiny_sd1_path, training_images, tmp_path, "--norm_mode", "preserve",
                                           hypernetwork=True))
    assert "unrecognized arguments: --norm_mode" in capsys.readouterr().err
