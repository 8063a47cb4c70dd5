"""Real `dvc` runs of the pipeline in temporary copies of the repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import FMNIST_DIR, REPO_ROOT
from postgres import free_port
from repo import commit, copy_repo, copy_reproduced, run_tool, tool_env, use_tiny_params

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_then_is_clean(reproduced_repo, tmp_path):
    """`dvc repro` on a fetched dataset (the session's reproduced repository) runs every stage and
    leaves the pipeline up to date; a change reruns only what depends on it (in a copy)."""
    log = reproduced_repo.repro_log
    for stage in ("check-params", "validate", "preprocess", "split", "train@efficientnet_lite0-frozen", "evaluate",
                  "report", "register"):
        assert f"Running stage '{stage}'" in log, stage
    root = copy_reproduced(reproduced_repo, tmp_path / "repo")
    env = tool_env(root)

    assert len(list((root / "data/cropped").glob("*/*.png"))) == 36
    assert (root / "data/split/manifest.csv").is_file()
    run = json.loads((root / "models/efficientnet_lite0-frozen/s0/run.json").read_text())
    assert run["architecture"] == "efficientnet_lite0"
    assert (root / "models/small_cnn-frozen/EXCLUDED").is_file(), "the excluded cell's stage left no out"
    assert (root / "evaluation/metrics.json").is_file() and (root / "reports/table1.md").is_file()
    champion = json.loads((root / "registry/champion.json").read_text())
    assert champion["run_id"] == run["run_id"]
    assert (root / "mlflow.db").is_file(), "runs were not recorded in the project's SQLite store"
    status = run_tool([str(BIN / "dvc"), "status", "dvc.yaml"], root, env)  # the quick profile's has not run
    assert "up to date" in status.stdout, status.stdout

    metrics = run_tool([str(BIN / "dvc"), "metrics", "show"], root, env)
    assert "validation.json" in metrics.stdout and "metrics.json" in metrics.stdout

    # The train stages depend only on what training runs: editing the HTTP client retrains nothing.
    client = root / "src/transfer_study/client.py"
    client.write_text(client.read_text() + "\n# an edit to the prediction client\n")
    status = run_tool([str(BIN / "dvc"), "status", "train"], root, env)
    assert "up to date" in status.stdout, status.stdout

    # A split param changes: only split and what depends on it run again.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["split"]["seed"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = run_tool([str(BIN / "dvc"), "repro"], root, env)
    log = rerun.stdout + rerun.stderr
    assert "Running stage 'split'" in log
    assert "Running stage 'preprocess'" not in log and "Running stage 'validate'" not in log
    assert "Running stage 'train@efficientnet_lite0-frozen'" in log


@pytest.mark.slow
def test_fetch_matches_the_committed_data_dvc(tmp_path):
    """Fetching on a fresh clone reproduces data.dvc's hash: `dvc status` is clean, twice."""
    if not FMNIST_DIR.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    root = copy_repo(tmp_path / "repo")
    env = tool_env(root)
    committed = (root / "data.dvc").read_bytes()
    for attempt in range(2):
        shutil.rmtree(root / "data" / "raw", ignore_errors=True)
        shutil.rmtree(root / ".dvc" / "cache", ignore_errors=True)
        run_tool([str(BIN / "transfer-study"), "data", "fetch"], root, env)
        # As `make data` does: cache the fetched folder; data.dvc must not change.
        run_tool([str(BIN / "dvc"), "commit", "--force", "--quiet", "data.dvc"], root, env)
        assert (root / "data.dvc").read_bytes() == committed, f"fetch {attempt + 1} changed the dataset's hash"
        status = run_tool([str(BIN / "dvc"), "status", "data.dvc"], root, env)
        assert "up to date" in status.stdout, f"fetch {attempt + 1}: {status.stdout}"


@pytest.mark.slow
def test_mlflow_run_main_runs_the_pipeline_and_records_it_in_the_store(tmp_path):
    """`mlflow run . -e main --env-manager local`: MLproject's main runs every stage (tiny params);
    the cell's run lands in the study's experiment, apart from `mlflow run`'s own run."""
    from mlflow.tracking import MlflowClient

    if not FMNIST_DIR.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    root = copy_repo(tmp_path / "repo")
    use_tiny_params(root)
    uri = f"sqlite:///{tmp_path / 'projects.db'}"
    run_tool([str(BIN / "mlflow"), "run", ".", "-e", "main", "--env-manager", "local"], root,
             tool_env(root) | {"MLFLOW_TRACKING_URI": uri})
    summary = json.loads((root / "data/validation.json").read_text())
    assert summary["total_images"] == 36 and summary["passed"] is True

    client = MlflowClient(uri)
    (project_run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert project_run.data.tags["mlflow.project.entryPoint"] == "main" and project_run.info.status == "FINISHED"
    (cell_run,) = client.search_runs([client.get_experiment_by_name("transfer-study").experiment_id])
    assert cell_run.info.run_name == "efficientnet_lite0-frozen-s0" and cell_run.info.status == "FINISHED"
    assert cell_run.info.run_id != project_run.info.run_id
    assert {"val_acc", "best_val_acc", "test_accuracy"} <= set(cell_run.data.metrics)  # train and evaluate
    run_info = json.loads((root / "models/efficientnet_lite0-frozen/s0/run.json").read_text())
    assert run_info["run_id"] == cell_run.info.run_id
    assert run_info["experiment_id"] == cell_run.info.experiment_id
    champion = client.get_model_version_by_alias("clothing-classifier", "champion")
    assert champion.run_id == cell_run.info.run_id

OWN_DATA_FENCE = "```bash own-data\n"
PRINTS = "#  > "  # README's mark for a line a command prints; `…` stands for any text


def readme_own_data_script() -> str:
    """The shell block under README's "Your own images": the steps a user runs, as CI runs them."""
    readme = (REPO_ROOT / "README.md").read_text()
    assert readme.count(OWN_DATA_FENCE) == 1, "README needs exactly one ```bash own-data block"
    section = readme[readme.index("## Your own images"):]
    start = section.index(OWN_DATA_FENCE) + len(OWN_DATA_FENCE)
    return section[start:section.index("\n```", start)]


def readme_serve_block() -> str:
    """The block after the own-data steps that serves the user's model."""
    section = (REPO_ROOT / "README.md").read_text().split("## Your own images")[1]
    start = section.index("```bash\n", section.index(OWN_DATA_FENCE) + len(OWN_DATA_FENCE)) + len("```bash\n")
    return section[start:section.index("\n```", start)]


def printed_lines(block: str) -> list[str]:
    """The lines a README block says its commands print (marked `#  > `)."""
    return [line.strip().removeprefix(PRINTS.strip()).strip() for line in block.splitlines()
            if line.strip().startswith(PRINTS.strip())]


def unmatched(expected: list[str], log: str) -> list[str]:
    """The expected lines (`…`: any text) that no line of `log` matches whole."""
    lines = [line.strip() for line in log.splitlines()]
    patterns = {e: re.compile(".*".join(re.escape(part.strip()) for part in e.split("…"))) for e in expected}
    return [e for e, pattern in patterns.items() if not any(pattern.fullmatch(line) for line in lines)]


def test_printed_lines_match_whole_lines_with_ellipses():
    log = "champion: x version 3, single of r; val\nx a 1 b"
    assert unmatched(["champion: x version …, … of …; val", "a … b"], log) == ["a … b"]  # whole lines only
    assert printed_lines("#  > one\n# two\n  #  > three …\n") == ["one", "three …"]


def _own_photos(folder: Path, per_class: int = 8) -> Path:
    """A tiny photo set a user might have: a coloured shape on a plain background, PNG and JPEG."""
    from PIL import Image, ImageDraw

    shapes = {"circles": (200, 40, 40), "squares": (40, 150, 60), "triangles": (40, 70, 200)}
    for k, (name, colour) in enumerate(shapes.items()):
        (folder / name).mkdir(parents=True)
        for n in range(per_class):
            image = Image.new("RGB", (64, 48), (235, 232, 225))
            x, y, r = 16 + (5 * n + k) % 32, 14 + (3 * n) % 20, 8 + n % 4
            draw = ImageDraw.Draw(image)
            if name == "circles":
                draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
            elif name == "squares":
                draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
            else:
                draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
            image.save(folder / name / f"{name[:-1]}{n}.{'jpg' if n % 2 else 'png'}")
    return folder


def _run_models(root: Path) -> dict[str, bytes]:
    """Every trained run's run.json and best.pt under the quick profile's models, by path."""
    models = root / "outputs/quick/models"
    return {p.relative_to(models).as_posix(): p.read_bytes() for p in sorted(models.glob("*/s*/*"))
            if p.name in ("run.json", "best.pt")}


def _serve_as_readme_says(root: Path, env: dict, photo: Path) -> str:
    """`make serve` in the project, as the README's serve block runs it (on a free port); gives back
    what it printed, the port written as README's 5001, after `transfer-study predict` classified
    `photo` through it."""
    port = free_port()
    (root / ".venv" / ".installed").touch()  # `make setup` ran: the test's environment is the venv
    log = (root / "serve.log").open("w+")
    server = subprocess.Popen(["make", "--no-print-directory", "serve", f"PORT={port}"], cwd=root, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, Path(log.name).read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline, "make serve did not answer /ping in 240 s:\n" + Path(log.name).read_text()
                time.sleep(1)
        predict = [str(BIN / "transfer-study"), "predict", "--url", f"http://127.0.0.1:{port}", str(photo)]
        predicted = run_tool(predict, root, env)
        assert predicted.stdout.split("\n")[1].split()[1] in ("circles", "squares", "triangles"), predicted.stdout
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    return Path(log.name).read_text().replace(f":{port} ", ":5001 ")


@pytest.mark.slow
def test_readme_own_data_steps_print_what_they_say_and_a_typo_loses_nothing(tmp_path):
    """README's own-data block, run as written on a tiny photo set: each line it says a command
    prints is printed, every file it edits is committed, the user's model is registered under the
    user's name and `make serve` serves it. Then the issue's typo (`epochs` → `epoch`) stops
    `dvc repro` with the did-you-mean before any stage deletes a trained model, `dvc checkout`
    brings deleted models back, a rerun runs nothing and registers nothing, and the plots page
    finds the learning curve and needs no internet. (About 3-4 minutes on the 2-core VM.)"""
    from mlflow import MlflowClient

    root = copy_repo(tmp_path / "repo")
    use_tiny_params(root, "params.quick.yaml")  # one run, and an excluded cell
    commit(root, "tiny quick profile")
    (root / ".venv" / "bin").mkdir(parents=True)  # the block activates .venv: this test's environment
    (root / ".venv" / "bin" / "activate").write_text(f'export PATH="{BIN}:$PATH"\n')
    photos = _own_photos(tmp_path / "my-photos")
    env = tool_env(root) | {"PHOTOS": str(photos), "GIT_AUTHOR_NAME": "t",
                        "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    script = readme_own_data_script()
    result = run_tool(["bash", "-e", "-o", "pipefail", "-c", script], root, env)
    log = result.stdout + result.stderr

    assert len(printed_lines(script)) >= 7
    assert unmatched(printed_lines(script), log) == [], log[-4000:]
    run = json.loads((root / "outputs/quick/models/efficientnet_lite0-frozen/s0/run.json").read_text())
    assert (root / "outputs/quick/models/small_cnn-frozen/EXCLUDED").is_file()
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert client.get_model_version_by_alias("my-photos-quick", "champion").run_id == run["run_id"]
    assert client.get_experiment_by_name("my-photos-quick") is not None
    assert not client.search_registered_models("name = 'clothing-classifier-quick'")
    committed = run_tool(["git", "status", "--porcelain", "--untracked-files=no"], root, env)
    assert committed.stdout == "", f"edited but not committed by the README's steps:\n{committed.stdout}"
    assert "garment" not in (root / "data.dvc").read_text().lower()  # its header fits the user's data too

    served = _serve_as_readme_says(root, env, next(photos.glob("circles/*.png")))
    assert unmatched(printed_lines(readme_serve_block()), served) == [], served

    # The typo: DVC would delete the trained models, then stop at the missing param.
    trained = _run_models(root)
    quick = root / "params.quick.yaml"
    good = quick.read_text()
    assert re.search(r"^  epochs: 1$", good, re.MULTILINE)
    for typo in (re.sub(r"^  epochs: 1$", "  epoch: 3", good, flags=re.MULTILINE),  # replaced
                 re.sub(r"^  epochs: 1$", "  epochs: 1\n  epoch: 3", good, flags=re.MULTILINE)):  # added beside
        quick.write_text(typo)
        failed = run_tool([str(BIN / "dvc"), "repro", "profiles/quick/dvc.yaml"], root, env, check=False)
        assert failed.returncode != 0
        assert "params.quick.yaml: unknown param(s) train.epoch (did you mean train.epochs?)" in failed.stderr
        assert "Running stage 'train" not in failed.stdout
        assert _run_models(root) == trained, "a trained model was deleted or changed"
    quick.write_text(good)

    # A deleted (or retrained) model comes back from DVC's cache with one command.
    shutil.rmtree(root / "outputs/quick/models")
    run_tool([str(BIN / "dvc"), "checkout", "profiles/quick/dvc.yaml"], root, env)
    assert _run_models(root) == trained

    # `make quick` again: the check reruns (the failed runs removed its note), nothing else, and
    # re-registering an unchanged model adds no version.
    again = run_tool([str(BIN / "dvc"), "repro", "profiles/quick/dvc.yaml"], root, env)
    ran = re.findall(r"Running stage '([^']+)'", again.stdout)
    assert ran == ["check-params"], again.stdout
    status = run_tool([str(BIN / "dvc"), "status", "profiles/quick/dvc.yaml"], root, env)
    assert "up to date" in status.stdout, status.stdout
    versions = len(client.search_model_versions("name = 'my-photos-quick'"))  # the run's, and the served one
    run_tool([str(BIN / "dvc"), "repro", "--force", "--single-item", "profiles/quick/dvc.yaml:register"], root, env)
    assert len(client.search_model_versions("name = 'my-photos-quick'")) == versions
    shown = run_tool([str(BIN / "dvc"), "exp", "show", "--json"], root, env)
    assert "outputs/quick/evaluation/metrics.json" in shown.stdout

    # The plots of the quick pipeline: found where its stages wrote them, drawn without internet.
    plots = run_tool([str(BIN / "dvc"), "plots", "show", "profiles/quick/dvc.yaml", "-o", str(tmp_path / "plots")],
                     root, env)
    assert "failed to load" not in plots.stdout + plots.stderr, plots.stdout + plots.stderr
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "learning_curve.csv" in page and "vegaEmbed(" in page
    assert not re.search(r"<script[^>]*\bsrc=", page), "the plots page loads a script from elsewhere"


@pytest.mark.slow
def test_the_quick_pipeline_draws_replicates_scores_the_external_set_and_rebuilds_them_byte_for_byte(tmp_path):
    """A real `dvc repro` of the quick profile's replicates, validate and preprocess stages (tiny: 6
    images a class, 2 replicates, 2 external images a class, one small-CNN epoch per replicate); the
    replicates, deleted, come back with the same hashes, so nothing after them reruns. ~1 min."""
    if not FMNIST_DIR.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    root = copy_repo(tmp_path / "repo")
    (root / "data.dvc").unlink()  # a smaller default dataset than the committed version
    params = yaml.safe_load((root / "params.quick.yaml").read_text())
    params["data"].update(per_class=6, replicates=2, external_per_class=2)
    params["train"].update(architectures=["small_cnn"], conditions=["scratch"], exclude=[],
                           early_stopping={"patience_steps": 1, "min_steps": 0, "max_steps": 1})
    params["evaluate"]["bootstrap_samples"] = 100
    (root / "params.quick.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = tool_env(root)
    run_tool([str(BIN / "transfer-study"), "--params", "params.quick.yaml", "data", "fetch"], root, env)
    log = run_tool([str(BIN / "dvc"), "repro", "profiles/quick/dvc.yaml"], root, env).stdout
    assert "Running stage 'profiles/quick/dvc.yaml:replicates'" in log and "external test set: 12 images" in log

    manifest = pd.read_csv(root / "outputs/quick/split/manifest.csv")
    assert manifest.groupby("replicate")["path"].count().to_dict() == {0: 36, 1: 36}
    assert (manifest.loc[manifest["replicate"].isna(), "split"] == "external").sum() == 12
    runs = pd.read_csv(root / "outputs/quick/evaluation/runs.csv").set_index("run")
    assert list(runs.index) == ["small_cnn-scratch-s0", "small_cnn-scratch-s0-rep1"]
    assert (runs["n_external"] == 12).all() and runs["external_accuracy"].notna().all()
    assert (runs["max_epochs"] == 1).all() and runs["hit_cap"].dtype == bool
    assert "up to date" in run_tool([str(BIN / "dvc"), "status", "profiles/quick/dvc.yaml"], root, env).stdout

    for folder in ("data/pool", "data/replicates", "data/external"):
        shutil.rmtree(root / folder)
    again = run_tool([str(BIN / "dvc"), "repro", "profiles/quick/dvc.yaml"], root, env).stdout
    assert "Running stage 'profiles/quick/dvc.yaml:replicates'" in again
    assert "Running stage 'profiles/quick/dvc.yaml:validate'" not in again, "the rebuilt replicates differ"
    assert "up to date" in run_tool([str(BIN / "dvc"), "status", "profiles/quick/dvc.yaml"], root, env).stdout


def test_the_quick_pipeline_tracks_what_the_study_pipeline_tracks():
    """profiles/quick/dvc.yaml repeats every stage of dvc.yaml for the quick profile: the same code
    deps and the same params, so neither reruns less than it should; its replicates stage is its own."""
    study = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    quick = yaml.safe_load((REPO_ROOT / "profiles/quick/dvc.yaml").read_text())["stages"]
    assert set(quick) == set(study) - {"check-params"} | {"replicates"}  # the study's check-params checks both
    assert "src/transfer_study/replicates.py" not in str(study), "the study's stages must not run replicate code"
    for name, stage in quick.items():
        if name == "replicates":
            continue
        assert stage["wdir"] == "../..", name
        assert stage["cmd"].startswith("transfer-study --params params.quick.yaml "), name
        assert stage["cmd"].split("params.quick.yaml ", 1)[1] == study[name]["cmd"].removeprefix("transfer-study "), name
        code = [d for d in stage["deps"] if d.startswith("src/")]
        assert code == [d for d in study[name]["deps"] if d.startswith("src/")], name
        assert stage["params"] == [{"params.quick.yaml": study[name]["params"]}], name
