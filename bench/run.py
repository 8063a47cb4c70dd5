"""Measure the project's performance on the machine at hand and print one markdown table.

    .venv/bin/python bench/run.py                      # every section (e2e: 4–15 min on 2 cores)
    .venv/bin/python bench/run.py --skip-e2e --out     # ... and write bench/results/<host>-<date>.json
    .venv/bin/python bench/run.py --only train,data    # some sections

Every figure has a baseline measured in the same invocation on the same data, and the table
gives the ratio (value ÷ baseline). Sections: train (training img/s per architecture ×
condition), data (the pipeline alone, and data/model ratios), e2e (the whole quick profile),
serve (mlflow models serve latency), scale (store and epoch cost as the dataset grows).
On a CPU the quick profile's sizes are used, on CUDA the study's. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
# Quieter logs from the MLflow parts (progress bars would bury the table).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import torch  # noqa: E402

from table import Row, markdown_table, write_json  # noqa: E402
from timing import machine_description  # noqa: E402
from timing import progress as log  # noqa: E402

SECTIONS = ("train", "data", "e2e", "serve", "scale")
QUICK_ARCHS = ("efficientnet_lite0", "resnet18")  # the quick profile's architectures
ALL_ARCHS = ("efficientnet_lite0", "resnet18", "vgg19", "inception_v3")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    p.add_argument("--skip-e2e", action="store_true", help="leave out the end-to-end run (4–15 min on 2 cores)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--profile", choices=("auto", "quick", "study"), default="auto",
                   help="image sizes: params.quick.yaml's or params.yaml's (auto: quick on CPU, study on CUDA)")
    p.add_argument("--quick", dest="profile", action="store_const", const="quick", help="= --profile quick")
    p.add_argument("--all-archs", action="store_true",
                   help="also vgg19 and inception_v3 on a CPU (always on CUDA)")
    p.add_argument("--archs", help="comma-separated architectures (overrides the default set)")
    p.add_argument("--conditions", default="scratch,frozen,finetune")
    p.add_argument("--warmup", type=int, help="untimed batches before each window (3 on CPU, 10 on CUDA)")
    p.add_argument("--batches", type=int, help="batches per timed window (8 on CPU, 20 on CUDA)")
    p.add_argument("--windows", type=int, help="timed windows per path; the median is reported (3)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--serve-seconds", type=float, default=30.0, help="duration of each load test")
    p.add_argument("--tracking-uri", help="store holding the quick profile's @champion "
                                          "(default: the project's, as transfer-study uses)")
    p.add_argument("--scale-per-class", help="per-class sizes of the scale section "
                                             "(default 300,3000 on CPU; 300,3000,6000 on CUDA)")
    p.add_argument("--scale-train", action=argparse.BooleanOptionalAction, default=None,
                   help="also time one frozen-head epoch per size (default: on CUDA only)")
    p.add_argument("--fmnist-source", type=Path, help="folder of Fashion-MNIST idx files for the scale section")
    p.add_argument("--weights-dir", type=Path, help="folder of ImageNet weights (torchvision's file names)")
    p.add_argument("--e2e-epochs", type=int, help="smoke-test the e2e section with fewer epochs")
    p.add_argument("--e2e-timeout", type=float, default=3600)
    p.add_argument("--out", nargs="?", const="auto",
                   help="also write JSON (default path: bench/results/<host>-<date>.json)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, stores)")
    p.add_argument("--root", type=Path, default=ROOT, help="the project whose data is measured (tests: a tiny one)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    root = args.root.resolve()
    from transfer_study.config import UserError, tracking_uri
    from workspace import BatchPlan, Workspace, profile_params_file, require_split_data

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = args.profile if args.profile != "auto" else ("study" if cuda else "quick")
    sections = [s for s in args.only.split(",") if s and not (s == "e2e" and args.skip_e2e)]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        print(f"error: unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}", file=sys.stderr)
        return 2
    archs = (args.archs.split(",") if args.archs else
             list(ALL_ARCHS if (cuda or args.all_archs) else QUICK_ARCHS))
    plan = BatchPlan(warmup=args.warmup or (10 if cuda else 3), batches=args.batches or (20 if cuda else 8),
                     windows=args.windows or 3)
    try:
        require_split_data(root, profile_params_file(profile))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    machine = machine_description(device)
    machine["env"] = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ}
    settings = {"sections": sections, "profile": profile, "archs": archs, "conditions": args.conditions,
                "plan": plan.__dict__, "serve_seconds": args.serve_seconds}
    rows: dict[str, list[Row]] = {s: [] for s in SECTIONS}
    tmp = Path(tempfile.mkdtemp(prefix="transfer-study-bench-"))
    started = time.perf_counter()

    def section(name: str, fn) -> None:
        """Run one section; a failure becomes a row, and the other sections still run."""
        log(f"section {name} ...")
        t0 = time.perf_counter()
        try:
            rows[name] += fn()
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
            traceback.print_exc()
            rows[name].append(Row(name, "section failed", "", None, note=f"{type(exc).__name__}: {exc}"[:300]))
        log(f"section {name} done in {time.perf_counter() - t0:.0f} s")

    train_results, data_results = {}, {}
    ws = None
    if {"train", "data", "e2e"} & set(sections):
        ws = Workspace(root, device, profile, archs, args.conditions.split(","), plan, tmp, args.weights_dir)

    if "data" in sections:
        import data_speed

        def data_section():
            section_rows, results = data_speed.run(ws)
            data_results.update(results)
            return section_rows
        section("data", data_section)
    if "train" in sections:
        import train_speed

        def train_section():
            section_rows, results = train_speed.run(ws)
            train_results.update(results)
            return section_rows
        section("train", train_section)
    if train_results and data_results:
        import data_speed

        rows["data"] += data_speed.data_model_rows(train_results, data_results)
    for name, needs in (("e2e", ("mlflow", "click")), ("serve", ("mlflow",))):
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if name in sections and missing:  # e.g. the GPU machine: torch, torchvision, pandas, sklearn only
            sections.remove(name)
            rows[name].append(Row(name, "skipped", "", None, note=f"{', '.join(missing)} not installed here"))
    if "e2e" in sections:
        import e2e_time

        section("e2e", lambda: e2e_time.run(root, ws.params if profile == "quick" else _quick_params(root),
                                            "params.quick.yaml", tmp, train_results if profile == "quick" else {},
                                            len(ws.train_rows), args.e2e_timeout, args.e2e_epochs))
    if "serve" in sections:
        import serve_speed

        section("serve", lambda: serve_speed.run(root, _quick_params(root), args.tracking_uri or tracking_uri(root),
                                                 args.serve_seconds, tmp))
    if "scale" in sections:
        import scaling

        per_class = [int(x) for x in (args.scale_per_class or ("300,3000,6000" if cuda else "300,3000")).split(",")]
        size = _profile_params(root, profile).train.image_size["efficientnet_lite0"]
        scale_train = cuda if args.scale_train is None else args.scale_train
        section("scale", lambda: scaling.run(per_class, size, device, tmp, scale_train,
                                             fmnist_source=args.fmnist_source))

    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    all_rows = [r for s in SECTIONS for r in rows[s]]
    print(_header(machine, profile, plan, time.perf_counter() - started))
    print(markdown_table(all_rows))
    print(_legend())
    if args.out:
        out = Path(args.out) if args.out != "auto" else (
            BENCH_DIR / "results" / f"{machine['host']}-{datetime.date.today().isoformat()}.json")
        write_json(out, machine, settings, all_rows)
        log(f"wrote {out}")
    if args.keep:
        log(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    failed = [r for r in all_rows if r.measure == "section failed" or r.note.startswith("failed")]
    return 1 if failed else 0


def _profile_params(root: Path, profile: str):
    from transfer_study.config import load_params

    from workspace import profile_params_file

    return load_params(root / profile_params_file(profile))


def _quick_params(root: Path):
    return _profile_params(root, "quick")


def _header(machine: dict, profile: str, plan, seconds: float) -> str:
    gpu = f", GPU {machine['gpu']}" if "gpu" in machine else ""
    env = "".join(f", {k}={v}" for k, v in machine.get("env", {}).items())
    return (f"\n## transfer-study bench: {machine['host']}\n\n"
            f"{machine['cpu']}, {machine['cores']} cores usable, torch {machine['torch']} "
            f"({machine['torch_threads']} threads{env}), device {machine['device']}{gpu}; "
            f"{profile} profile sizes; windows of {plan.batches} batches of 32 after {plan.warmup} warm-up, "
            f"median of {plan.windows}; load average {machine['load_average']} at start, "
            f"{machine['load_average_end']} at end; {seconds / 60:.1f} min in all.\n")


def _legend() -> str:
    return """
ratio = value ÷ baseline (above 1 is better for img/s and req/s, below 1 for s, ms and MB).
Baselines, each measured in the same run: train/data: ImageFolder + PIL transforms in 2 workers,
fp32, frozen backbone with gradients on (bench/baseline.py); e2e: the pipeline's own epoch
loops (history.csv), and the import-only process's peak RSS; serve: a no-op pyfunc served the
same way; scale: the smallest dataset, extrapolated linearly (times) or as is (memory).
"""


if __name__ == "__main__":
    sys.exit(main())
