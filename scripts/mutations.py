"""How strong are the tests? Make deliberate code changes and count those the tests catch.

Each mutation replaces one exact snippet of one source file, in a temporary git copy of this
working tree, and runs only the tests named for it (one mutation at a time: CPU heavy, minutes
in all). A mutation is *caught* when those tests fail, *survives* when they pass, and is an
*error* when pytest could not run them (a snippet that no longer matches is an error too: update
the list when the code moves). Not part of CI.

    python scripts/mutations.py              # every mutation; prints the table and caught/total
    python scripts/mutations.py --list       # names, files and tests only
    python scripts/mutations.py NAME ...     # some of them
    python scripts/mutations.py --baseline   # first check the targeted tests pass unchanged
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "src/transfer_study"


@dataclass(frozen=True)
class Mutation:
    name: str
    module: str  # file under src/transfer_study/
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    promise: str  # what breaks


def _tests(file: str, keyword: str | None = None) -> tuple[str, ...]:
    return (f"tests/{file}",) + (("-k", keyword) if keyword else ())


RESUME = _tests("test_train.py", "interrupted_run_resumes")
FRESH = _tests("test_train.py", "start_fresh")
SERVE_CHECKS = ("tests/test_serve.py", "-k", "own_checks", "tests/test_faults.py", "-k", "pyfunc")

MUTATIONS = (
    # ---------------------------------------------------------------- resume and checkpoints
    Mutation("resume-skips-restore", "train.py", "        trainer.restore(state)\n", "        pass\n", RESUME,
             "resume restores the model"),
    Mutation("fingerprint-constant", "checkpoints.py",
             "    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]",
             '    return "000000000000"', FRESH, "resume only when params and data are unchanged"),
    Mutation("fingerprint-ignores-image-content", "checkpoints.py",
             '"data": sorted(zip(manifest["sha256"], manifest["split"], manifest["label"])),',
             '"data": sorted(zip(manifest["split"], manifest["label"])),', FRESH,
             "resume only when the data are unchanged"),
    Mutation("fingerprint-ignores-train-params", "checkpoints.py", '"train": dataclasses.asdict(params.train),',
             '"train": {"architectures": 0, "conditions": 0, "seeds": 0},', FRESH,
             "resume only when params are unchanged"),
    Mutation("stale-resume-folder-not-reported", "checkpoints.py", "    return sorted(p for p in checkpoint_dir.glob",
             "    return [] and sorted(p for p in checkpoint_dir.glob", FRESH, "a fresh start says so"),
    Mutation("checksum-not-compared", "checkpoints.py",
             "    if actual != expected:\n        raise UserError(f\"checkpoint '{path}' is corrupt",
             "    if False:\n        raise UserError(f\"checkpoint '{path}' is corrupt", _tests("test_checkpoints.py"),
             "corrupt checkpoints are refused"),
    Mutation("load-skips-verification", "checkpoints.py", "    verify_checksum(path, expected_sha256)\n    try:",
             "    try:", _tests("test_checkpoints.py"), "corrupt checkpoints are refused"),
    Mutation("missing-checksum-trusted", "checkpoints.py",
             "        if not sidecar.is_file():\n            raise",
             "        if not sidecar.is_file():\n            return file_sha256(path)\n            raise",
             _tests("test_checkpoints.py"), "a checkpoint without its checksum is not trusted"),
    Mutation("best-checkpoint-not-verified-on-resume", "train.py", "            work.check_best(state)\n",
             "            pass\n", _tests("test_faults.py", "verified_before_use"),
             "the best checkpoint a resume names is verified"),
    Mutation("failed-write-leaves-temp-file", "checkpoints.py",
             "        tmp.unlink(missing_ok=True)\n        sidecar_tmp.unlink(missing_ok=True)\n",
             "        sidecar_tmp.unlink(missing_ok=True)\n", _tests("test_faults.py", "full_disk"),
             "a full disk leaves no temp files and the old checkpoint intact"),
    Mutation("resume-skips-missing-epochs", "tracking.py", '            if row["epoch"] not in logged:',
             "            if False:", _tests("test_faults.py", "epochs_the_store_missed"),
             "a resume logs the epochs the store missed"),
    # ---------------------------------------------------------------- evaluate
    Mutation("mcnemar-exact-below-24", "inference.py", "EXACT_MCNEMAR_BELOW = 25", "EXACT_MCNEMAR_BELOW = 24",
             _tests("test_inference.py", "mcnemar"), "McNemar is exact below 25"),
    Mutation("mcnemar-exact-below-26", "inference.py", "EXACT_MCNEMAR_BELOW = 25", "EXACT_MCNEMAR_BELOW = 26",
             _tests("test_inference.py", "mcnemar"), "McNemar is exact below 25"),
    Mutation("mcnemar-no-continuity-correction", "inference.py", "statistic = max(abs(b - c) - 1, 0) ** 2 / (b + c)",
             "statistic = (b - c) ** 2 / (b + c)", _tests("test_inference.py", "mcnemar"),
             "chi-square with continuity correction"),
    Mutation("mcnemar-correction-below-zero", "inference.py", "statistic = max(abs(b - c) - 1, 0) ** 2 / (b + c)",
             "statistic = (abs(b - c) - 1) ** 2 / (b + c)", _tests("test_inference.py", "mcnemar"),
             "b = c gives p = 1"),
    Mutation("mcnemar-one-sided", "inference.py", "stats.binomtest(b, b + c, 0.5).pvalue",
             'stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue', _tests("test_inference.py", "mcnemar"),
             "two-sided p-value"),
    Mutation("bootstrap-one-tail-interval", "inference.py", "tail = (1 - confidence) / 2 * 100",
             "tail = (1 - confidence) * 100", _tests("test_inference.py", "bootstrap or percentile"),
             "a central 95% interval"),
    Mutation("bootstrap-first-chunk-repeated", "inference.py",
             "parts = [metric_fn(weights[i:i + chunk], y_true, y_pred, proba) for i in range(0, n, chunk)]",
             "parts = [metric_fn(weights[:chunk][:len(weights[i:i + chunk])], y_true, y_pred, proba) "
             "for i in range(0, n, chunk)]", _tests("test_inference.py", "bootstrap"),
             "every resample counts once"),
    Mutation("accuracy-interval-by-percentile-bootstrap", "inference.py", 'if name == "accuracy"', "if False",
             _tests("test_inference.py", "wilson"), "an accuracy interval never collapses to a point"),
    # ---------------------------------------------------------------- inference
    Mutation("seeds-counted-as-units", "inference.py", "assign(unit=runs[units.column],",
             'assign(unit=runs[units.column].astype(str) + "-" + runs["seed"].astype(str),',
             _tests("test_inference.py", "unit or simulat or clustered"), "seeds are averaged into their unit"),
    Mutation("no-split-correction", "inference.py",
             "factor = 1 / n + (np.asarray(test_over_train, dtype=float) if split_units else 0.0)", "factor = 1 / n",
             _tests("test_inference.py", "split or clustered"), "overlapping splits get the corrected variance"),
    Mutation("no-holm-correction", "inference.py",
             'table.loc[primary_rows, "p_adjusted"] = holm(table.loc[primary_rows, "p"].to_numpy())',
             'table.loc[primary_rows, "p_adjusted"] = table.loc[primary_rows, "p"]',
             _tests("test_inference.py", "primary"), "the primary family is Holm-corrected"),
    Mutation("one-class-runs-averaged-in", "inference.py", 'flagged = runs["single_class"].astype(bool)',
             'flagged = runs["single_class"].astype(bool) & False', _tests("test_inference.py", "single_class"),
             "single-class runs are kept out of verdicts"),
    Mutation("best-cell-chosen-on-test", "inference.py",
             'per_unit = at.groupby(["architecture", "condition", "replicate", "repeat"])["val_accuracy"].mean()',
             'per_unit = at.groupby(["architecture", "condition", "replicate", "repeat"])["test_accuracy"].mean()',
             _tests("test_inference.py", "validation"), "the best cells are chosen on validation"),
    Mutation("two-units-decide", "inference.py", "MIN_UNITS = 3", "MIN_UNITS = 2",
             _tests("test_inference.py", "too_few"), "fewer than 3 units decide nothing"),
    Mutation("evaluate-logs-to-a-missing-run", "evaluate.py", "        client.get_run(run_id)\n    except MlflowException:",
             "        pass\n    except MlflowException:", _tests("test_evaluate.py", "store_lacks"),
             "evaluate names a run the store lacks"),
    Mutation("predictions-label-out-of-range", "evaluate.py", "not values.between(0, num_classes - 1).all()",
             "not values.between(0, num_classes).all()", _tests("test_evaluate.py"),
             "predictions.csv holds class indices only"),
    # ---------------------------------------------------------------- split
    Mutation("split-keeps-ambiguous-content", "split.py", 'kept = items[~items["sha256"].isin(ambiguous)]',
             "kept = items", _tests("test_split.py"), "content under two labels is excluded"),
    Mutation("split-ignores-seed", "split.py", "return np.random.RandomState(seed if repeat == 0 else [seed, repeat])",
             "return np.random.RandomState(0 if repeat == 0 else [seed, repeat])", _tests("test_split.py"), "the split follows its seed"),
    Mutation("split-sizes-round-down", "split.py", "val = max(1, math.floor(n * params.val + 0.5))",
             "val = max(1, math.floor(n * params.val))", _tests("test_split.py"),
             "split sizes within one image of the ratios"),
    Mutation("manifest-without-val-accepted", "split.py", '    for split in ("train", "val"):',
             '    for split in ("train",):', _tests("test_split.py"), "a manifest without val rows is refused"),
    # ---------------------------------------------------------------- registry
    Mutation("champion-chosen-on-test", "registry.py", '["val_f1_macro", "_acc", "run"]',
             '["test_f1_macro", "_acc", "run"]', _tests("test_registry.py"), "champion chosen on validation"),
    Mutation("champion-ties-prefer-lower-accuracy", "registry.py", "ascending=[False, False, True]",
             "ascending=[False, True, True]", _tests("test_registry.py"), "ties break on accuracy, then name"),
    Mutation("former-champion-not-previous", "registry.py",
             "            client.set_registered_model_alias(name, PREVIOUS, former)", "            pass",
             _tests("test_registry.py"), "the former champion becomes @previous"),
    Mutation("rerun-registers-again", "registry.py",
             "    return min(matches, key=lambda v: int(v.version)) if matches else None", "    return None",
             _tests("test_registry.py"), "a rerun registers nothing new"),
    # ---------------------------------------------------------------- serve's input checks
    Mutation("serve-no-column-check", "serve.py", "        if IMAGE_COLUMN not in model_input.columns:",
             "        if False:", SERVE_CHECKS, "a request without the image column is a 400 saying so"),
    Mutation("serve-base64-not-validated", "serve.py", "base64.b64decode(value, validate=True)",
             "base64.b64decode(value)", SERVE_CHECKS, "bad base64 is refused as such"),
    Mutation("serve-empty-string-accepted", "serve.py", "if not isinstance(value, str) or not value.strip():",
             "if not isinstance(value, str):", SERVE_CHECKS, "an empty image is refused as such"),
    Mutation("serve-no-request-cap", "serve.py", "    if total > MAX_REQUEST_BASE64_CHARS:", "    if False:",
             SERVE_CHECKS, "the 64 M-character request cap"),
    Mutation("serve-no-image-cap", "serve.py", "    if len(value) > MAX_IMAGE_BASE64_CHARS:", "    if False:",
             SERVE_CHECKS, "the 40 M-character image cap"),
    Mutation("serve-bad-request-not-400", "serve.py", "        except BadRequest as exc:",
             "        except ZeroDivisionError as exc:", SERVE_CHECKS, "bad input is an HTTP 400 with our message"),
    Mutation("serve-weights-not-verified", "serve.py", "    if actual != expected:\n        raise CorruptModel",
             "    if False:\n        raise CorruptModel", _tests("test_faults.py", "corrupt_model"),
             "a corrupt model artifact is refused"),
    # ---------------------------------------------------------------- tracking
    Mutation("cannot-continue-run-raw-error", "tracking.py", "        if resume_run_id is None:\n            raise\n",
             "        raise\n", _tests("test_faults.py", "cannot_be_continued"),
             "a run that cannot be continued names the folder to delete"),
    Mutation("deleted-run-not-checked", "tracking.py",
             "        if resume_run_id is not None:\n            _check_not_deleted(tracking_uri, resume_run_id)\n", "",
             _tests("test_faults.py", "cannot_be_continued"), "a deleted run is named, not retried for 2 minutes"),
    Mutation("new-store-created-without-lock", "tracking.py", "        fcntl.flock(lock, fcntl.LOCK_EX)\n", "",
             _tests("test_tracking_server.py", "concurrent"), "processes sharing a new SQLite store all succeed"),
    Mutation("permanent-errors-retried", "tracking.py", "        return exc.error_code in TRANSIENT_ERROR_CODES",
             "        return True", _tests("test_faults.py", "retr"), "permanent tracking errors are not retried"),
    Mutation("mlflow-run-env-run-continued", "tracking.py", "        if run_id is None:\n            # Created here",
             "        if False:\n            # Created here",
             _tests("test_pipeline.py", "mlflow_run_main"), "`mlflow run -e main` records cells in the study's experiment"),
)


def copy_worktree(dest: Path) -> Path:
    """The tracked and untracked (not ignored) files of this working tree, committed in a new git repo
    (tests copy the repository with `git ls-files`)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git = ["git", "-c", "user.name=mutations", "-c", "user.email=mutations@localhost"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run(git + command, cwd=dest, check=True)
    return dest


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    """Run pytest on `tests` in the copy, its src first on the path; gives (exit code, seconds, output tail)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(copy / "src")
    # pytest takes one -k; several test files each with their own -k run as separate invocations.
    groups, current = [], []
    for arg in tests:
        if arg.startswith("tests/") and "-k" in current:
            groups.append(current)
            current = []
        current.append(arg)
    groups.append(current)
    started, code, tail = time.monotonic(), 0, ""
    for group in groups:
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                   "-m", "slow or not slow", *group], cwd=copy, env=env, capture_output=True,
                                  text=True, timeout=timeout)
            code, tail = done.returncode, (done.stdout + done.stderr)[-1500:]
        except subprocess.TimeoutExpired:
            code, tail = 1, f"timed out after {timeout:.0f}s"  # a hang is a failing test
        if code != 0:
            break
    return code, time.monotonic() - started, tail


def apply(copy: Path, mutation: Mutation) -> str | None:
    """Apply the mutation; gives back the original text, or None when the snippet does not match once."""
    path = copy / PACKAGE / mutation.module
    text = path.read_text()
    if text.count(mutation.old) != 1:
        return None
    path.write_text(text.replace(mutation.old, mutation.new))
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--baseline", action="store_true", help="first run every targeted test unchanged")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (default 600)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}; see --list")
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if args.list:
        for m in chosen:
            print(f"{m.name:40} {m.module:15} {' '.join(m.tests)}")
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="mutations-") as tmp:
        copy = copy_worktree(Path(tmp) / "repo")
        if args.baseline:
            for tests in dict.fromkeys(m.tests for m in chosen):
                code, seconds, tail = run_tests(copy, tests, args.timeout)
                print(f"baseline {' '.join(tests)}: exit {code} ({seconds:.0f}s)", flush=True)
                if code != 0:
                    print(tail)
                    return 2
        for m in chosen:
            original = apply(copy, m)
            if original is None:
                outcome, seconds, tail = "error", 0.0, f"snippet not found exactly once in {m.module}"
            else:
                try:
                    code, seconds, tail = run_tests(copy, m.tests, args.timeout)
                finally:
                    (copy / PACKAGE / m.module).write_text(original)
                outcome = {0: "SURVIVED", 1: "caught"}.get(code, "error")
            results.append({"name": m.name, "module": m.module, "outcome": outcome, "seconds": round(seconds),
                            "promise": m.promise, "tests": " ".join(m.tests)})
            print(f"{outcome:9} {m.name:40} {m.module:15} {seconds:5.0f}s  {m.promise}", flush=True)
            if outcome == "error":
                print("    " + tail.strip().replace("\n", "\n    "))
    caught = sum(r["outcome"] == "caught" for r in results)
    print(f"\ncaught {caught}/{len(results)} ({caught / max(len(results), 1):.0%}); "
          f"survived {sum(r['outcome'] == 'SURVIVED' for r in results)}, "
          f"errors {sum(r['outcome'] == 'error' for r in results)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
