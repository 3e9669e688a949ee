"""Per-stage training features: optimizers, learning-rate schedules with warm-up, gradient
clipping, EMA weights, early stopping, best/last stage models, TensorBoard and W&B logs.

The runner tests train the small linear model of test_checkpoints with real checkpoints;
the schedules are compared with torch's own schedulers."""

import math
import os

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stagewise.config import check_stage, stage_from_file
from stagewise.training import checkpoints
from stagewise.training.monitor import TAGS, Monitor
from stagewise.training.optim import LearningRate, TorchRecipe, clip_gradients, torch_optimizer
from stagewise.training.runner import StageStopped
from test_checkpoints import EPOCHS, STAGE, assert_same_weights, train, validation_batches, without_times


def optimizer_for(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def our_rates(settings, epochs, losses=None):
    """The learning rate of each epoch 1..epochs from LearningRate."""
    optimizer = optimizer_for()
    schedule = LearningRate(optimizer, settings, epochs)
    rates = []
    for epoch in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        schedule.step(losses[epoch] if losses else 0.0)
    return rates


def torch_rates(make, epochs, losses=None):
    optimizer = optimizer_for()
    scheduler = make(optimizer)
    rates = []
    for epoch in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        scheduler.step(losses[epoch]) if losses else scheduler.step()
    return rates


LOSSES = [5.0, 4.0, 3.9, 3.95, 3.97, 3.0, 3.1, 3.2, 3.3, 3.4, 2.0, 2.1]
SCHEDULES = [
    ({"type": "cosine"}, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=12), None),
    ({"type": "cosine", "min_factor": 0.1}, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 12, 0.1), None),
    ({"type": "step", "step_size": 4, "gamma": 0.5}, lambda o: torch.optim.lr_scheduler.StepLR(o, 4, 0.5), None),
    ({"type": "exponential", "gamma": 0.8}, lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.8), None),
    ({"type": "reduce_on_plateau", "factor": 0.5, "patience": 2, "threshold": 0.01},
     lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=2, threshold=0.01), LOSSES),
]


@pytest.mark.parametrize("settings, make, losses", SCHEDULES, ids=lambda v: v["type"] if isinstance(v, dict) else "")
@pytest.mark.filterwarnings("ignore:Detected call of")
def test_each_schedule_gives_torchs_learning_rates(settings, make, losses):
    assert our_rates(settings, 12, losses) == pytest.approx(torch_rates(make, 12, losses), rel=1e-12)


def test_a_linear_warm_up_precedes_the_schedule_which_then_counts_from_its_end():
    rates = our_rates({"type": "cosine", "warmup_epochs": 3}, 12)
    assert rates[:3] == pytest.approx([0.25, 0.5, 0.75])
    assert rates[3:] == pytest.approx(torch_rates(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 9), 9))


@pytest.mark.parametrize("kind, options, expected", [
    ("adamw", {"weight_decay": 0.05, "betas": [0.8, 0.9]}, torch.optim.AdamW),
    ("sgd", {"momentum": 0.9, "nesterov": True}, torch.optim.SGD),
    ("adam", {"eps": 1e-6}, torch.optim.Adam),
])
def test_each_optimizer_gets_its_arguments(kind, options, expected):
    model = torch.nn.Linear(2, 1)
    optimizer = torch_optimizer(model, {"optimizer": {"type": kind, "learning_rate": 0.01, **options}})
    assert type(optimizer) is expected
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.01
    for key, value in options.items():
        assert group[key] == (tuple(value) if isinstance(value, list) else value)


def test_an_argument_of_another_optimizer_or_a_long_warm_up_is_a_config_error():
    stage = {"epochs": 5, "optimizer": {"type": "adam", "learning_rate": 0.1, "momentum": 0.9},
             "scheduler": {"type": "cosine"}}
    with pytest.raises(ValueError, match=r"training.stage_1.optimizer.momentum: not an argument of optimizer type "
                                         r"'adam' \(it takes amsgrad, betas, eps, weight_decay\)"):
        check_stage("stage_1", stage)
    stage = {**stage, "optimizer": {"type": "sgd", "learning_rate": 0.1}, "scheduler": {"type": "step", "factor": 2}}
    with pytest.raises(ValueError, match="training.stage_1.scheduler.factor: not an argument of scheduler type 'step'"):
        check_stage("stage_1", stage)
    stage["scheduler"] = {"type": "cosine", "warmup_epochs": 5}
    with pytest.raises(ValueError, match=r"training.stage_1.scheduler.warmup_epochs: 5 must be below epochs \(5\)"):
        check_stage("stage_1", stage)


def test_a_stage_file_for_append_stage_gets_the_same_checks_and_the_schema_defaults(tmp_path):
    stage = {"epochs": 5, "batch_size": 10, "asd": "set", "freeze_svd": False,
             "optimizer": {"type": "sgd", "learning_rate": 0.1}, "scheduler": {"type": "cosine"}}
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(stage))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(stage | {"optimizer": {"type": "sgd", "learning_rate": 0.1,
                                                                              "betas": [0.9, 0.99]}}))
    assert stage_from_file(tmp_path / "good.yaml")["stage_model"] == "last"
    with pytest.raises(ValueError, match=r"bad.yaml: stage setting optimizer.betas: not an argument of optimizer"):
        stage_from_file(tmp_path / "bad.yaml")
    (tmp_path / "broken.yaml").write_text("epochs: [5\nbatch_size: 10\n")
    with pytest.raises(ValueError) as broken:
        stage_from_file(tmp_path / "broken.yaml")
    assert "broken.yaml: cannot read stage settings (while parsing" in str(broken.value)
    assert "\n" not in str(broken.value)  # one line, though YAML's message has several


def test_gradient_clipping_by_norm_and_by_value():
    weight = torch.nn.Parameter(torch.zeros(4))
    weight.grad = torch.tensor([3.0, -4.0, 0.0, 0.0])
    assert clip_gradients([weight], {"type": "norm", "max": 1.0}) == pytest.approx(5.0)
    assert weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    weight.grad = torch.tensor([3.0, -4.0, 0.5, 0.0])
    assert clip_gradients([weight], {"type": "value", "max": 1.0}) == pytest.approx(math.sqrt(25.25))
    assert weight.grad.tolist() == [1.0, -1.0, 0.5, 0.0]
    weight.grad = torch.tensor([3.0, -4.0, 0.0, 0.0])
    assert clip_gradients([weight], None) == pytest.approx(5.0)
    assert weight.grad.tolist() == [3.0, -4.0, 0.0, 0.0]


EMA = {"ema_decay": 0.8, "gradient_clip": {"type": "norm", "max": 0.5}, "optimizer": {"type": "sgd",
       "learning_rate": 0.1, "momentum": 0.9}, "scheduler": {"type": "step", "step_size": 2, "warmup_epochs": 1}}


def test_ema_weights_are_validated_become_the_stage_model_and_resume_bit_for_bit(tmp_path):
    reference, reference_history = train(tmp_path / "once", settings=EMA)
    ema_weights, epoch = reference.stage_model
    assert epoch == EPOCHS
    assert not torch.equal(ema_weights["weight"], reference.weight)  # the EMA, not the raw weights
    state = checkpoints.load(tmp_path / "once" / checkpoints.LATEST)
    assert torch.equal(state["model"]["weight"], reference.weight)  # the checkpoint keeps both
    assert torch.equal(state["recipe"]["ema"]["module.weight"], ema_weights["weight"])
    ema_model = type(reference)()
    ema_model.load_state_dict(ema_weights)
    plain = TorchRecipe(ema_model, {**STAGE, "ema_decay": None})
    assert plain.validation_loss(validation_batches()) == reference_history[-1]["validation_loss"]

    for _ in range(EPOCHS):
        try:
            resumed, history = train(tmp_path / "stopped", settings=EMA, max_epochs_per_run=2)
            break
        except StageStopped:
            pass
    assert_same_weights(resumed, reference)
    assert all(torch.equal(resumed.stage_model[0][k], v) for k, v in ema_weights.items())
    assert without_times(history) == without_times(reference_history)


def test_early_stopping_ends_the_stage_and_its_state_survives_each_resume(tmp_path):
    stop = {"early_stopping": {"metric": "validation_loss", "patience": 2, "min_delta": 1e6, "mode": "min"}}
    _, history = train(tmp_path / "once", settings=stop, epochs=8)
    assert [row["epoch"] for row in history] == [1, 2, 3]  # epoch 1 is the best; 2 and 3 do not improve by 1e6
    runs = 0
    while True:
        runs += 1
        try:
            _, resumed = train(tmp_path / "stopped", settings=stop, epochs=8, max_epochs_per_run=1)
            break
        except StageStopped:
            assert runs < 8
    assert runs == 3 and without_times(resumed) == without_times(history)
    assert checkpoints.load(tmp_path / "stopped" / checkpoints.LATEST)["stopped_early"]


def test_the_stage_model_is_the_best_or_the_last_epoch_as_configured(tmp_path):
    noisy = {"optimizer": {"type": "sgd", "learning_rate": 0.3}, "scheduler": {"type": "constant"}}
    last, history = train(tmp_path / "last", settings=noisy, epochs=8)
    best, _ = train(tmp_path / "best", settings=noisy, epochs=8, stage_model="best")
    losses = [row["validation_loss"] for row in history]
    best_epoch = losses.index(min(losses)) + 1
    assert best_epoch < 8, "this setting was chosen so that the last epoch is not the best"
    saved = checkpoints.load(tmp_path / "best" / checkpoints.BEST)
    assert saved["epoch"] == best_epoch and saved["validation_loss"] == min(losses)
    assert best.stage_model[1] == best_epoch
    assert all(torch.equal(best.stage_model[0][k], v) for k, v in saved["model"].items())
    assert last.stage_model[1] == 8 and torch.equal(last.stage_model[0]["weight"], last.weight)
    assert not torch.equal(best.stage_model[0]["weight"], last.weight)


def scalars(folder):
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_every_epoch_once_even_after_a_job_logged_past_its_checkpoint(tmp_path):
    folder = tmp_path / "tensorboard" / "stage_0"
    train(tmp_path / "checkpoints", epochs=4, monitor=Monitor(folder, "stage_0"))
    first = scalars(folder)
    assert set(first) == set(TAGS.values())
    assert [step for step, _ in first["loss/validation"]] == [1, 2, 3, 4]
    # A job killed after logging epochs 3 and 4 but before their checkpoints: the next job resumes at 2.
    resumed = Monitor(folder, "stage_0")
    resumed.begin(2)
    for epoch in (3, 4):
        resumed.log(dict.fromkeys(TAGS, -1.0) | {"epoch": epoch})
    resumed.close()
    again = scalars(folder)
    assert [step for step, _ in again["loss/validation"]] == [1, 2, 3, 4]
    assert again["loss/validation"][:2] == first["loss/validation"][:2]
    assert [value for _, value in again["time/data"][2:]] == [-1.0, -1.0]


def test_a_resumed_job_continues_the_same_wandb_run(tmp_path, monkeypatch):
    """Real wandb in offline mode (no account, no network): the run id is kept in local_settings.yaml."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    local_settings = tmp_path / "local_settings.yaml"
    local_settings.write_text(yaml.safe_dump({"device": "cpu"}))
    ids = []
    for epochs_done in (0, 1):
        monitor = Monitor(tmp_path / "tensorboard", "stage_0", {"project": "stagewise-test", "mode": "offline"},
                          local_settings, {"seed": 1})
        monitor.begin(epochs_done)
        monitor.log(dict.fromkeys(TAGS, 1.0) | {"epoch": epochs_done + 1})
        ids.append(monitor.wandb_run.id)
        monitor.close()
    kept = yaml.safe_load(local_settings.read_text())
    assert kept["device"] == "cpu" and ids == [kept["wandb_run_ids"]["stage_0"]] * 2
    # Offline run folders are named offline-run-<start second>-<id>: both jobs wrote under the one id
    # (into one folder when they started in the same second).
    runs = [name for name in os.listdir(tmp_path / "wandb" / "wandb") if name.startswith("offline-run-")]
    assert runs and {name.rsplit("-", 1)[1] for name in runs} == {ids[0]}, runs
