"""plan.py: the estimate's arithmetic, the disk rule, the profile choice, the checks that must fail
before any training, and the estimate against a real training run."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import yaml
from conftest import make_split_project, tiny_params

from transfer_study import cli, models, plan
from transfer_study.cells import Cell
from transfer_study.config import AugmentParams, ConfigError, SplitParams, TrainParams, UserError

SIZES = plan.SplitSizes(train=100, val=20, test=20, source="test")
TIMING = plan.ModelTiming(train_step_s=2.0, predict_s_per_image=0.01, timed_batch=32)


# --------------------------------------------------------------------------- pure parts


def test_expected_split_sizes_add_up_to_the_images():
    sizes = plan.expected_split_sizes(1800, SplitParams(), "params")
    assert (sizes.train, sizes.val, sizes.test) == (1260, 270, 270)
    odd = plan.expected_split_sizes(7, SplitParams(), "params")
    assert odd.total == 7


def test_a_scratch_cell_costs_its_steps_and_passes():
    t = TrainParams(epochs=3, batch_size=32, image_size={"resnet18": 64})
    e = plan.estimate_cell(Cell("resnet18", "scratch", 0), t, SIZES, TIMING)
    # 4 steps of 2 s (the last one partial) + 20 val images × 0.01 s per epoch; then 140 images once
    assert e.epoch_s == pytest.approx(4 * 2.0 + 20 * 0.01)
    assert e.total_s == pytest.approx(3 * e.epoch_s + 140 * 0.01)
    assert e.train_images_per_s == pytest.approx(16.0) and e.image_size == 64


def test_a_frozen_cell_steps_at_the_forward_pass_rate_and_caches_features_without_augmentation():
    t = TrainParams(epochs=3, batch_size=32, image_size={"resnet18": 64})
    augmented = plan.estimate_cell(Cell("resnet18", "frozen", 0), t, SIZES, TIMING)
    assert augmented.epoch_s == pytest.approx(4 * 32 * 0.01 + 20 * 0.01)
    still = dataclasses.replace(t, augment=AugmentParams(rotation=0.0, translate=0.0, hflip=False))
    cached = plan.estimate_cell(Cell("resnet18", "frozen", 0), still, SIZES, TIMING)
    assert cached.epoch_s == pytest.approx(20 * 0.01)  # the head's epochs cost next to nothing
    assert cached.total_s == pytest.approx(3 * 20 * 0.01 + (100 + 140) * 0.01)


def test_a_learning_curve_cell_trains_on_its_share_of_the_images():
    t = TrainParams(epochs=1, batch_size=32, image_size={"resnet18": 64})
    e = plan.estimate_cell(Cell("resnet18", "scratch", 0, fraction=0.25), t, SIZES, TIMING)
    assert e.epoch_s == pytest.approx(1 * 2.0 + 20 * 0.01)  # 25 images: one step


def test_max_batches_per_epoch_caps_the_steps():
    t = TrainParams(epochs=1, batch_size=32, image_size={"resnet18": 64}, max_batches_per_epoch=1)
    e = plan.estimate_cell(Cell("resnet18", "scratch", 0), t, SIZES, TIMING)
    assert e.epoch_s == pytest.approx(2.0 + 20 * 0.01)


def test_step_seconds_separates_the_fixed_part_and_bounds_noise():
    assert plan.step_seconds(32, [(2, 0.5), (32, 1.5)]) == 1.5  # timed at the real batch: as measured
    # 0.5 s at 2 images, 0.8 s at 8: 0.05 s per image beyond a fixed part, so 32 images take 2.0 s
    assert plan.step_seconds(32, [(2, 0.5), (8, 0.8)]) == pytest.approx(0.8 + 0.05 * 24)
    # noise making the larger batch look no slower: at least half its average per image
    assert plan.step_seconds(32, [(2, 0.9), (8, 0.8)]) == pytest.approx(0.8 + 0.05 * 24)
    # at most its average per image
    assert plan.step_seconds(32, [(2, 0.1), (8, 0.8)]) == pytest.approx(0.8 * 4)
    assert plan.step_seconds(32, [(2, 0.5)]) == pytest.approx(8.0)


class SleepingTrainer:
    """Stands in for trainer.Trainer: a step on n images takes fixed_s + per_image_s × n."""

    def __init__(self, fixed_s: float, per_image_s: float):
        import torch

        self.device, self.fixed_s, self.per_image_s = torch.device("cpu"), fixed_s, per_image_s
        self.sizes: list[int] = []

    def train_epoch(self, loader, progress):
        for images, labels in loader:
            self.sizes.append(len(labels))
            time.sleep(self.fixed_s + self.per_image_s * len(labels))
        return 0.0, 0.0


def test_timing_grows_the_batch_to_the_real_one_when_steps_are_quick():
    trainer = SleepingTrainer(fixed_s=0.02, per_image_s=0.001)
    timed = plan.time_growing_batches(trainer, 8, 3, batch_size=32, budget_s=5.0)
    assert [images for images, _ in timed] == [2, 8, 16, 32]
    assert trainer.sizes == [2, 2, 2, 8, 8, 16, 16, 32, 32]  # one warm-up step, then two steps per size
    assert plan.step_seconds(32, timed) == pytest.approx(0.02 + 0.032, rel=0.5)


def test_timing_of_a_slow_model_stops_within_the_budget_and_keeps_the_fixed_part_apart():
    trainer = SleepingTrainer(fixed_s=0.2, per_image_s=0.01)
    timed = plan.time_growing_batches(trainer, 8, 3, batch_size=32, budget_s=0.8)
    assert [images for images, _ in timed] == [2, 8]  # two sizes always; 16 would not fit
    # proportional scaling from 2 images would say 32 × 0.11 s = 3.5 s; the step takes 0.52 s
    assert plan.step_seconds(32, timed) == pytest.approx(0.2 + 0.01 * 32, rel=0.5)
    rough = plan.time_growing_batches(SleepingTrainer(0.2, 0.01), 8, 3, batch_size=32, min_sizes=1, budget_s=0.8)
    assert [images for images, _ in rough] == [2]  # the rough estimate of a profile that will not run


def test_disk_rule_counts_kept_copies_the_largest_resume_state_and_the_stores():
    cells = [plan.CellFootprint("a", parameters=1000, trainable=1000),
             plan.CellFootprint("b", parameters=3000, trainable=10)]
    needed = plan.disk_needed(cells, store_bytes=500)
    kept = 5 * (1000 + 3000)
    training = max(2 * (1000 + 2000) + 1000, 2 * (3000 + 20) + 3000)
    assert needed == (kept + training) * 4 + 500
    assert plan.store_bytes(10, {32, 64}) == 10 * 3 * (32 * 32 + 64 * 64)


def test_too_little_disk_names_the_folder_the_sizes_and_the_fix(tmp_path):
    plan.check_disk(2_000_000_000, 3_000_000_000, tmp_path)
    with pytest.raises(UserError) as error:
        plan.check_disk(5_000_000_000, 1_000_000_000, tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "1.0 GB free" in message and "5.0 GB" in message
    assert "train.exclude" in message


def test_frozen_footprint_trains_only_the_head():
    t = TrainParams(image_size={"resnet18": 64})
    scratch = plan.footprint(Cell("resnet18", "scratch", 0), t, 6)
    frozen = plan.footprint(Cell("resnet18", "frozen", 0), t, 6)
    assert scratch.parameters == scratch.trainable == frozen.parameters > 11_000_000
    assert frozen.trainable == 512 * 6 + 6


def test_make_run_picks_the_quick_profile_without_a_gpu_and_says_so():
    profile, reason = plan.choose_profile(None, cuda=False)
    assert profile == "quick"
    assert "no CUDA GPU" in reason and "PROFILE=study" in reason
    assert plan.choose_profile(None, cuda=True)[0] == "study"
    assert plan.choose_profile("study", cuda=False)[0] == "study"  # asked for explicitly
    assert plan.choose_profile("quick", cuda=True)[0] == "quick"
    with pytest.raises(ConfigError, match="PROFILE=big"):
        plan.choose_profile("big", cuda=True)


def test_ui_and_serve_open_the_profile_registered_last_whatever_the_machine():
    """The issue's case: quick run on a GPU machine; `make serve` without PROFILE served the study's model."""
    records = {"study": "registry/champion.json", "quick": "outputs/quick/registry/champion.json"}  # oldest first
    profile, reason = plan.profile_to_open(None, cuda=True, registered=records)
    assert profile == "quick" and "last registered (outputs/quick/registry/champion.json)" in reason
    assert "PROFILE=study opens the other" in reason
    assert plan.profile_to_open("study", cuda=False, registered=records)[0] == "study"  # asked for
    assert plan.profile_to_open(None, cuda=True, registered={})[0] == "study"  # nothing registered yet


def test_profiles_map_to_their_params_files():
    assert plan.profile_of("params.quick.yaml") == "quick" and plan.profile_of("params.yaml") == "study"
    assert plan.profile_of("mine.yaml") is None


def test_durations_read_as_people_say_them():
    assert plan.format_duration(0.2) == "1 s"
    assert plan.format_duration(42) == "42 s"
    assert plan.format_duration(12 * 60 + 10) == "12 min"
    assert plan.format_duration(3 * 3600 + 28 * 60) == "3 h 28 min"
    assert plan.format_duration(53 * 3600) == "2 d 5 h"


def test_the_printed_plan_gives_each_cell_the_total_and_every_check(tmp_path):
    t = TrainParams(epochs=3, batch_size=32, image_size={"resnet18": 64})
    estimate = plan.estimate_cell(Cell("resnet18", "frozen", 0), t, SIZES, TIMING)
    overhead = plan.pipeline_overhead([estimate.cell], process_start_s=10.0)
    printed = plan.format_plan(plan.Plan(
        "params.quick.yaml", "cpu (2 threads)", [estimate], SIZES, 3.2, overhead,
        ["data/raw: 140 images in 3 class folders"],
        [plan.WeightsStatus("resnet18", None, "https://example.org/r.pth")], (2_000_000_000, 9_000_000_000, tmp_path)))
    assert printed.startswith("plan for params.quick.yaml: 1 cell on cpu (2 threads)")
    # 3 epochs × (4 steps × 32 images + 20 val images) × 0.01 s + 140 images × 0.01 s
    assert "resnet18-frozen-s0" in printed and "total: about 6 s" in printed
    # and the whole run: 4 processes (1 train, evaluate, report, register) × 10 s + 1 run's bookkeeping
    assert overhead.total_s == 4 * 10.0 + plan.RUN_BOOKKEEPING_S
    assert "the whole run: about 48 s, with 4 stage processes starting in 10 s each (timed here)" in printed
    assert "training downloads it from https://example.org/r.pth" in printed
    assert f"disk: about 2.0 GB for checkpoints, models and image stores; 9.0 GB free at {tmp_path}" in printed


# --------------------------------------------------------------------------- checks


def test_missing_weights_offline_name_the_cell_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    cells = [Cell("resnet18", "scratch", 0), Cell("resnet18", "frozen", 0)]
    with pytest.raises(models.WeightsMissing) as error:
        plan.check_weights(cells, None, reachable=lambda url: False)
    message = str(error.value)
    assert "resnet18-frozen-s0" in message and models.weights_file("resnet18") in message
    assert "transfer-study weights fetch" in message and "train.weights_dir" in message

    online = plan.check_weights(cells, None, reachable=lambda url: True)
    assert online == [plan.WeightsStatus("resnet18", None, models.weights_url("resnet18"))]
    assert plan.check_weights([Cell("resnet18", "scratch", 0)], None, reachable=lambda url: False) == []


def test_present_weights_are_found_without_asking_the_network(use_torch_home):
    def no_network(url):
        raise AssertionError("the network was asked for a file that is here")

    [status] = plan.check_weights([Cell("resnet18", "frozen", 0)], None, reachable=no_network)
    assert status.path == use_torch_home / "hub" / "checkpoints" / models.weights_file("resnet18")


def test_skip_data_without_crops_says_what_to_run(tmp_path):
    params = tiny_params()
    state = plan.read_data_state(params, tmp_path)
    assert plan.planned_sizes(state, params)[0].total == 1800  # the default dataset's size, from params
    with pytest.raises(UserError, match="dvc repro preprocess"):
        plan.data_lines(state, params, skip_data=True)
    assert any("split stage builds it" in line for line in plan.data_lines(state, params, skip_data=False))


def test_the_plan_counts_raw_images_as_validate_does(tmp_path):
    """The issue's 101 vs 96: files that are not images, and images validate excluded, are not counted."""
    raw = tmp_path / "data" / "raw"
    for label in ("flowers", "temples"):
        (raw / label).mkdir(parents=True)
        for n in range(3):
            (raw / label / f"{n}.jpg").write_bytes(b"pretend JPEG")
    (raw / "flowers" / "notes.txt").write_text("not an image")
    (raw / "temples" / "empty.jpg").write_bytes(b"")
    params = tiny_params()
    assert plan.read_data_state(params, tmp_path).raw_images == 7  # before validation: every image file
    (tmp_path / "data" / "validation.json").write_text(json.dumps(
        {"excluded": ["data/raw/flowers/notes.txt", "data/raw/temples/empty.jpg"]}))
    state = plan.read_data_state(params, tmp_path)
    assert (state.raw_images, state.raw_classes) == (6, 2)


def test_data_state_counts_the_manifest_without_opening_images(tmp_path):
    make_split_project(tmp_path)
    state = plan.read_data_state(tiny_params(), tmp_path)
    sizes, classes = plan.planned_sizes(state, tiny_params())
    assert (sizes.train, sizes.val, sizes.test, classes) == (12, 3, 3, 3)


def _project_params(project: Path, **train) -> Path:
    """A params file for a project made by make_split_project."""
    raw = {"train": {"architectures": ["resnet18"], "conditions": ["scratch", "frozen"], "epochs": 1,
                     "batch_size": 4, "num_workers": 0, "image_size": {"resnet18": 32}} | train,
           "preprocess": {"size": 80}, "tracking": {"experiment": "plan-test"}}
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_pipeline_stops_at_the_preflight_for_missing_weights_offline(tmp_path, monkeypatch):
    make_split_project(tmp_path)
    _project_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(plan, "url_reachable", lambda url, timeout=0: False)
    started = time.perf_counter()

    with pytest.raises(models.WeightsMissing, match="resnet18-frozen-s0"):
        cli.cli.main(["pipeline", "--skip-data"], standalone_mode=False)

    assert time.perf_counter() - started < 30  # seconds, not the scratch cell's training first
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was started
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "models").exists()


# --------------------------------------------------------------------------- the estimate


@pytest.mark.slow
def test_the_estimate_is_within_a_factor_of_two_of_a_real_run(tmp_path, tracking_uri):
    import torch

    from transfer_study.train import pick_device, train_cell

    # One thread for both: on a busy 2-core machine two threads wait on each other at every
    # operation, which makes any short timing, and the run itself, vary several-fold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_split_project(tmp_path, per_class=20)  # 54 train, 3 val, 3 test images
        params = tiny_params(architectures=("resnet18",), conditions=("scratch",), epochs=2, batch_size=8)
        cell = Cell("resnet18", "scratch", 0)
        sizes, classes = plan.planned_sizes(plan.read_data_state(params, tmp_path), params)
        device = pick_device()  # the device train_cell trains on
        before = plan.estimate_cells(params, [cell], sizes, classes, device)[0]
        run_dir = train_cell(params, cell, tmp_path, tracking_uri)
        after = plan.estimate_cells(params, [cell], sizes, classes, device)[0]  # brackets the run's load
    finally:
        torch.set_num_threads(threads)

    measured = json.loads((run_dir / "metrics.json").read_text())["seconds"]  # the epochs' training + validation
    estimated = params.train.epochs * (before.epoch_s + after.epoch_s) / 2
    assert 0.5 < estimated / measured < 2.0, f"estimated {estimated:.1f} s, measured {measured:.1f} s"
