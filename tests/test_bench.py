"""bench/: its pure helpers (clocks, percentiles, the table), and its scripts at a tiny size: every
section of bench/run.py and the GPU machine's bench/gpu_study.py --smoke, so that a crash in them
fails CI (their figures are measured by `make bench` and on a GPU machine, not here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from table import Row, fmt, markdown_table  # noqa: E402
from timing import SteadyStateBatches, alternate_windows, percentile  # noqa: E402


def _batches(sizes):
    return lambda: iter([(torch.zeros(n), torch.zeros(n)) for n in sizes])


def test_steady_state_skips_warmup_times_windows_and_starts_new_epochs():
    # An epoch of 3 batches (the last one partial), 2 warm-up batches, then 2 windows of 2 batches.
    source = SteadyStateBatches(_batches([4, 4, 1]), warmup=2, batches=2, windows=2, device=torch.device("cpu"))
    seen = [len(labels) for _, labels in source]
    assert seen == [4, 4, 1, 4, 4, 1]  # the source was remade twice: new epochs
    assert len(source.rates) == 2 and all(rate > 0 for rate in source.rates)


def test_steady_state_stops_a_consumer_loop_after_the_last_window():
    source = SteadyStateBatches(_batches([2] * 100), warmup=1, batches=3, windows=1, device=torch.device("cpu"))
    assert sum(1 for _ in source) == 4


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([5.0, 1.0], 50) == 1.0


def test_alternate_windows_runs_paths_in_turn_and_takes_medians():
    order = []

    def window(name, rates):
        def run():
            order.append(name)
            return rates.pop(0)
        return run

    fast, base = alternate_windows(window("fast", [1.0, 9.0, 5.0]), window("base", [2.0, 4.0, 3.0]), 3)
    assert order == ["fast", "base"] * 3
    assert fast["img_s"] == 5.0 and base["img_s"] == 3.0


def test_row_ratio_and_table():
    row = Row("train", "resnet18 scratch 64 px", "img/s", 300.0, 100.0, target="≥ 3×", met=True)
    assert row.ratio == pytest.approx(3.0)
    assert Row("serve", "x", "ms", 5.0, None).ratio is None
    assert Row("serve", "x", "ms", 5.0, float("nan")).ratio is None
    table = markdown_table([row])
    assert "| train | resnet18 scratch 64 px | img/s | 300 | 100 | 3.00× | ≥ 3× ✓ |" in table
    assert fmt(12345.6) == "12,346" and fmt(None) == "–" and fmt(0.01234) == "0.0123"


# --------------------------------------------------------------------------------------------
# The scripts themselves at a tiny size: a crash in any section or in the GPU script fails CI
# --------------------------------------------------------------------------------------------

SIX_CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "shirt")


@pytest.mark.slow
def test_the_gpu_script_runs_every_step_on_a_cpu(tmp_path, tracking_uri, use_torch_home):
    """bench/gpu_study.py --smoke as the GPU machine would run it (at 1 epoch of 2 batches): data
    stages, the throughput pass, the study's cells (ResNet-18 in both conditions and the small CNN;
    VGG-19 and Inception write gigabytes of checkpoints at any size and train in test_train.py),
    evaluate, report, register; every row ok, and the versions in the results."""
    import json

    import gpu_study
    from conftest import make_raw_project

    make_raw_project(tmp_path, per_class=8, classes=SIX_CLASSES)
    code = gpu_study.main(["--smoke", "--root", str(tmp_path), "--jobs", "3", "--budget-s", "900",
                           "--archs", "resnet18,small_cnn"])
    results = json.loads((tmp_path / "gpu-study" / "gpu-study.json").read_text())
    cells = ["resnet18-scratch", "resnet18-frozen", "small_cnn-scratch"]
    assert [r["cell"] for r in results["throughput"]] == cells
    assert all(r["status"] == "ok" and r["img_s"] > 0 and r["recipe_img_s"] > 0 for r in results["throughput"])
    assert sorted(r["cell"] for r in results["cells"]) == sorted(cells)
    assert all(r["status"] == "ok" and r["epochs"] == 1 and r["finish_s"] is not None for r in results["cells"])
    assert list(results["steps"]) == ["validate", "preprocess", "split", "evaluate", "report", "register"]
    assert all(step["status"] == "ok" for step in results["steps"].values())
    assert results["header"]["torch"] == torch.__version__ and "torchvision" in results["header"]
    assert results["header"]["study_wall_s"] > 0 and code == 0
    table = (tmp_path / "gpu-study" / "gpu-study.md").read_text()
    assert f"torch {torch.__version__}" in table and "| resnet18-frozen | 32 |" in table
    assert list((tmp_path / "bench" / "results").glob("gpu-study-*-smoke.md"))


def _gpu_study_results(tmp_path):
    import gpu_study

    header = gpu_study.environment() | {"jobs": 2, "smoke": True, "budget_s": 6.0, "placeholders": []}
    (tmp_path / "logs").mkdir(parents=True)
    return gpu_study.Results(tmp_path, header)


def test_the_gpu_script_keeps_every_cell_row_when_one_fails_or_the_budget_ends(tmp_path, monkeypatch):
    """Cells run as processes: one exits 3, one finishes, one is still training when the budget
    ends (stopped with Ctrl-C). Each keeps its own row, written to disk as it ends."""
    import json
    import sys
    import textwrap

    import gpu_study
    from transfer_study.cells import Cell

    fake = tmp_path / "fake_cli.py"
    fake.write_text(textwrap.dedent("""
        import pathlib, sys, time
        arch = sys.argv[sys.argv.index("--arch") + 1]
        if arch == "vgg19":
            sys.exit(3)
        if arch == "inception_v3":
            time.sleep(60)
        run = pathlib.Path("models") / f"{arch}-scratch" / "s0"
        run.mkdir(parents=True)
        (run / "history.csv").write_text("epoch,seconds\\n1,2.0\\n2,1.0\\n3,1.0\\n")
        print("[x] run folder written and model logged in 0.7s")
    """))
    monkeypatch.setattr(gpu_study, "CLI", [sys.executable, str(fake)])
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "manifest.csv").write_text("path,split\n" + "a.png,train\n" * 8 + "b.png,val\n")
    params = {"paths": {"outputs": ".", "manifest": "split/manifest.csv"}}
    results = _gpu_study_results(tmp_path / "work")
    cells = [Cell(arch, "scratch", 0) for arch in ("vgg19", "resnet18", "inception_v3")]
    gpu_study.train_cells(cells, tmp_path / "params.yaml", params, tmp_path, tmp_path / "work", 3, results,
                          gpu_study.Deadline(3.0), [])
    rows = {r["cell"]: r for r in json.loads((tmp_path / "work" / "gpu-study.json").read_text())["cells"]}
    assert rows["vgg19-scratch"]["status"].startswith("failed (3;")
    assert rows["resnet18-scratch"]["status"] == "ok"
    assert rows["resnet18-scratch"]["s_per_epoch"] == 1.0 and rows["resnet18-scratch"]["train_img_s"] == 8
    assert rows["resnet18-scratch"]["finish_s"] == 0.7 and rows["resnet18-scratch"]["epochs"] == 3
    assert rows["inception_v3-scratch"]["status"] == "stopped: budget spent"
    assert "| vgg19-scratch |" in (tmp_path / "work" / "gpu-study.md").read_text()


def test_the_gpu_script_stops_cleanly_with_a_partial_table_when_the_budget_is_spent(tmp_path):
    import json

    import gpu_study

    code = gpu_study.main(["--smoke", "--root", str(tmp_path), "--budget-s", "0", "--archs", "small_cnn"])
    results = json.loads((tmp_path / "gpu-study" / "gpu-study.json").read_text())
    assert code == 0, "a spent budget is a clean stop"
    assert results["steps"]["validate"]["status"] == "not run: budget spent"
    assert results["header"]["stopped"].startswith("the budget ran out")
    assert "the budget ran out" in (tmp_path / "gpu-study" / "gpu-study.md").read_text()


def _tiny_bench_project(root: Path) -> Path:
    """A project bench/run.py can measure in seconds: 3 classes of 6 crops (80 px) and their raw
    images, and a quick profile of one small-CNN run of 1 epoch (the e2e section runs it whole)."""
    import dataclasses

    import yaml
    from conftest import make_raw_project, make_split_project

    from transfer_study.config import PreprocessParams

    make_split_project(root)
    make_raw_project(root)
    params = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.quick.yaml").read_text())
    params["train"].update(architectures=["small_cnn"], conditions=["scratch"], exclude=[], seeds=[0], epochs=1)
    params["split"].update(train_fractions=[1.0], repeats=1)
    params["preprocess"] = dataclasses.asdict(PreprocessParams(size=80))  # as make_split_project's crops say
    params["evaluate"]["bootstrap_samples"] = 100
    params["paths"].update(manifest="data/split/manifest.csv", outputs="outputs/quick", cropped="data/cropped")
    params["data"].update(replicates=1, external_per_class=0)  # one dataset: the project's crops
    for name in ("params.yaml", "params.quick.yaml"):
        (root / name).write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.mark.slow
def test_every_bench_section_runs_at_a_tiny_size(tmp_path, tracking_uri, use_torch_home, capsys):
    """bench/run.py with every section (train, data, e2e, serve, scale) on a tiny project: no
    section fails and each gives its rows. The figures mean nothing at this size."""
    import run

    root = _tiny_bench_project(tmp_path / "project")
    code = run.main(["--root", str(root), "--archs", "resnet18,small_cnn", "--conditions", "scratch,frozen",
                     "--warmup", "1", "--batches", "1", "--windows", "1", "--serve-seconds", "1",
                     "--scale-per-class", "4,8", "--e2e-epochs", "30"])
    table = capsys.readouterr().out
    assert "section failed" not in table and "| failed" not in table, table
    for row in ("| train | resnet18 scratch 64 px |", "| train | resnet18 frozen 64 px |",
                "| train | small_cnn scratch 28 px |", "| data | pipeline alone 64 px |",
                "| data | data/model ratio resnet18 frozen |", "| e2e | quick profile pipeline",
                "| serve | p50 latency, 8 clients |", "| scale | store build, 48 images"):
        assert row in table, row
    assert "CPU time" in table  # the load-independent figure beside the wall-clock one
    assert code == 0
