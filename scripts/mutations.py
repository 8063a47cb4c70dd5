"""How strong are the tests? mutmut changes the code one small edit at a time; count the edits the tests catch.

For each target below (a module, the functions of it that are measured, and the tests aimed at them),
mutmut (pinned in requirements-mutation.txt, installed into .mutation-tool/ on first use) makes every
mutant of those functions in a temporary copy of this working tree and runs, for each mutant, the
target's tests that reach the mutated function. A mutant is *killed* when they fail (or time out),
*survives* when they pass, and has *no tests* when none reaches it. The score is killed / all mutants.
Survivors that no test can kill, because the edit changes nothing observable, are listed with the
reason in tests/mutation/equivalent.yaml (by mutant name, with the edit, so a moved mutant is not
excused by mistake). Results go to tests/mutation/scores.json and tests/mutation/scores.md (per
target: score, time, and each survivor's edit). Not part of CI: CPU-bound, minutes to an hour a target.

    python scripts/mutations.py                  # every target
    python scripts/mutations.py split serve      # some targets
    python scripts/mutations.py --list           # the targets, their functions and tests
    python scripts/mutations.py --render         # scores.md again from scores.json (equivalent.yaml edited)
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TOOL_DIR = REPO / ".mutation-tool"
REQUIREMENTS = REPO / "requirements-mutation.txt"
RESULTS = REPO / "tests" / "mutation"
PACKAGE = "transfer_study"
# What tests read from the project root besides src/ and tests/ (mutmut runs them in mutants/).
ALSO_COPY = ("params.yaml", "params.quick.yaml", "params.robust.yaml", "params.tuned.yaml", "references/",
             "requirements.lock", "conda.yaml", "data.dvc", "dvc.yaml", "profiles/", "README.md", "MLproject")
TARGET_SCORE = 0.85


@dataclass(frozen=True)
class Target:
    module: str  # file under src/transfer_study/
    functions: tuple[str, ...]  # mutmut's names within the module: "x_<function>", "xǁ<Class>ǁ<method>"
    tests: tuple[str, ...]  # pytest arguments that select the target's tests (node ids: -k would apply to all)
    what: str  # what a surviving mutant would get wrong


FAULTS = "tests/test_faults.py::test_"
TARGETS = {
    "split": Target("split.py", ("*",), ("tests/test_split.py",),
                    "which image trains, validates or tests; the learning-curve subsets"),
    "checkpoints": Target("checkpoints.py", ("*",),
                          ("tests/test_checkpoints.py", FAULTS + "resume_state_and_best_checkpoint_are_verified_before_use",
                           FAULTS + "full_disk_on_a_real_filesystem_gives_a_clear_error",
                           FAULTS + "full_disk_via_dev_full_gives_a_clear_error"),
                          "the resume fingerprint; corrupt or partly written checkpoints"),
    "serve-input": Target("serve.py", ("x_decode_image*", "x_images_from_request*", "x_verify_weights*",
                                       "x_prediction_frame*"),
                          ("tests/test_serve.py::test_request_checks_refuse_with_the_users_message",
                           "tests/test_serve.py::test_weights_are_checked_against_the_checksum_logged_with_them",
                           "tests/test_serve.py::test_the_answer_names_the_most_probable_class_and_every_probability",
                           FAULTS + "corrupt_model_artifact_fails_to_load_with_a_clear_message",
                           FAULTS + "pyfunc_refuses_paths_and_urls", FAULTS + "pyfunc_refuses_the_path_of_a_real_image",
                           FAULTS + "pyfunc_caps_the_whole_request"),
                          "what the served model refuses, and with which message"),
    "config-checks": Target("config.py", ("x__*", "x_load_params*", "x_model_input_size*", "x_launch_env*",
                                          "x_recorded_dataset_md5*", "x_retry_delay_scale*"),
                            ("tests/test_config.py", "tests/test_distributed.py::test_launch_env_reads_torchrun_variables",
                             FAULTS + "the_tests_backoff_scale_shortens_the_waits_not_the_budget"),
                            "which params are refused, and the message that names them"),
}


def install_tool() -> dict[str, str]:
    """mutmut in .mutation-tool/ (installed once per requirements-mutation.txt); gives the environment to run it in."""
    stamp = TOOL_DIR / "installed-from.txt"
    if not stamp.is_file() or stamp.read_text() != REQUIREMENTS.read_text():
        shutil.rmtree(TOOL_DIR, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(TOOL_DIR),
                        "-r", str(REQUIREMENTS)], check=True)
        stamp.write_text(REQUIREMENTS.read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join([str(TOOL_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads slow a shared CPU (Makefile)
    return env


def copy_worktree(dest: Path) -> Path:
    """The tracked and untracked (not ignored) files of this working tree."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def write_config(copy: Path, target: Target) -> None:
    """mutmut's settings for one target, in the copy's setup.cfg (pyproject.toml has no [tool.mutmut])."""
    def lines(values) -> str:
        return "".join(f"\n    {v}" for v in values)

    (copy / "setup.cfg").write_text(
        "[mutmut]\n"
        "source_paths=src/\n"
        f"only_mutate=src/{PACKAGE}/{target.module}\n"
        f"pytest_add_cli_args_test_selection={lines(target.tests)}\n"
        f"pytest_add_cli_args={lines(['-p', 'no:cacheprovider', '-m', 'slow or not slow'])}\n"
        f"also_copy={lines(ALSO_COPY)}\n"
        # torch is not fork-safe once it has run: workers fork from a process that only imported the tests
        "process_isolation=forkserver\n"
    )


def mutant_names(target: Target) -> list[str]:
    stem = f"{PACKAGE}.{target.module.removesuffix('.py')}"
    return [f"{stem}.{pattern}" for pattern in target.functions]


def run_target(name: str, target: Target, env: dict, max_children: int) -> dict:
    """Run mutmut on one target in a fresh copy; gives back its result entry."""
    with tempfile.TemporaryDirectory(prefix=f"mutations-{name}-") as tmp:
        copy = copy_worktree(Path(tmp))
        write_config(copy, target)
        mutmut = [sys.executable, "-m", "mutmut"]
        started = time.monotonic()
        done = subprocess.run(mutmut + ["run", "--max-children", str(max_children), *mutant_names(target)],
                              cwd=copy, env=env, capture_output=True, text=True)
        seconds = time.monotonic() - started
        meta = copy / "mutants" / "src" / PACKAGE / f"{target.module}.meta"
        if done.returncode != 0 or not meta.is_file():
            tail = (done.stdout + done.stderr).replace("\r", "\n")[-3000:]
            sys.exit(f"mutmut failed on target {name} (exit {done.returncode}):\n{tail}")
        sys.path.insert(0, str(TOOL_DIR))
        from mutmut.stats import status_by_exit_code

        codes = json.loads(meta.read_text())["exit_code_by_key"]
        chosen = {m: status_by_exit_code[c] for m, c in codes.items()
                  if any(fnmatch.fnmatchcase(m, p + "__mutmut_*") or fnmatch.fnmatchcase(m, p)
                         for p in mutant_names(target))}
        survivors = {}
        for mutant, status in sorted(chosen.items(), key=lambda item: natural_key(item[0])):
            if status not in ("killed", "timeout"):
                shown = subprocess.run(mutmut + ["show", mutant], cwd=copy, env=env, capture_output=True,
                                       text=True).stdout
                edit = [line for line in shown.splitlines()
                        if line[:1] in "+-" and not line.startswith(("+++", "---"))]
                survivors[mutant] = {"status": status, "edit": edit}
    killed = sum(status in ("killed", "timeout") for status in chosen.values())
    return {"module": target.module, "functions": list(target.functions), "tests": " ".join(target.tests),
            "what": target.what, "mutants": len(chosen), "killed": killed,
            "score": round(killed / max(len(chosen), 1), 4), "minutes": round(seconds / 60, 1),
            "survivors": survivors, "date": date.today().isoformat(), "commit": git_commit(),
            "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
            "tool": REQUIREMENTS.read_text().split("mutmut==")[1].split()[0]}


def natural_key(mutant: str) -> tuple:
    stem, _, number = mutant.rpartition("__mutmut_")
    return stem, int(number) if number.isdigit() else 0


def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "src", "tests"], cwd=REPO, capture_output=True,
                           text=True).stdout
    return head.strip() + ("+changes" if dirty.strip() else "")


def load_equivalent() -> dict:
    path = RESULTS / "equivalent.yaml"
    return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}


def render(results: dict, equivalent: dict) -> str:
    """scores.md: a table of the targets, then each survivor's edit and, when known, why it is equivalent."""
    out = ["# Mutation scores", "",
           "Written by `python scripts/mutations.py` (mutmut; see the script's docstring). Killed: the target's "
           "tests failed or timed out under the mutant. Times are wall clock on the machine named, which may "
           "have been shared.", "",
           "| target | module | mutants | killed | score | equivalent survivors | minutes | run |",
           "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        excused = sum(1 for m, s in r["survivors"].items() if _excused(m, s, equivalent))
        out.append(f"| {name} | {r['module']} | {r['mutants']} | {r['killed']} | {r['score']:.1%} | {excused} | "
                   f"{r['minutes']} | {r['date']}, {r['commit']}, mutmut {r['tool']}, {r['machine']} |")
    for name, r in results.items():
        out += ["", f"## {name}: {r['module']} ({r['what']})", "",
                f"Functions: `{'`, `'.join(r['functions'])}`. Tests: `{r['tests']}`.", ""]
        if not r["survivors"]:
            out.append("No survivors.")
        for mutant, survivor in r["survivors"].items():
            reason = _excused(mutant, survivor, equivalent)
            out.append(f"- `{mutant}` ({survivor['status']}{': equivalent, ' + reason if reason else ''})")
            out += [f"  `{line.strip()}`" for line in survivor["edit"]]
    return "\n".join(out) + "\n"


def _excused(mutant: str, survivor: dict, equivalent: dict) -> str | None:
    """The recorded reason why a survivor is equivalent, when its edit is still the recorded one."""
    entry = equivalent.get(mutant)
    if entry and [line.strip() for line in entry["edit"]] == [line.strip() for line in survivor["edit"]]:
        return entry["why"]
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help=f"targets to run (default: all of {', '.join(TARGETS)})")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite scores.md from scores.json (after editing equivalent.yaml)")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2, help="mutants tested at once")
    args = parser.parse_args()
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}; see --list")
    chosen = {name: TARGETS[name] for name in args.targets or TARGETS}
    if args.list:
        for name, t in chosen.items():
            print(f"{name:14} {t.module:15} {' '.join(t.functions):50} {' '.join(t.tests)}")
        return 0
    if platform.system() == "Windows":
        sys.exit("mutmut needs fork: run this under Linux, macOS or WSL")

    scores = RESULTS / "scores.json"
    results = json.loads(scores.read_text()) if scores.is_file() else {}
    if args.render:
        (RESULTS / "scores.md").write_text(render(results, load_equivalent()))
        return 0
    env = install_tool()
    for name, target in chosen.items():
        print(f"{name}: mutating {target.module} ({', '.join(target.functions)}) ...", flush=True)
        results[name] = run_target(name, target, env, args.max_children)
        r = results[name]
        print(f"{name}: {r['killed']}/{r['mutants']} killed ({r['score']:.1%}) in {r['minutes']} min", flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        ordered = {n: results[n] for n in TARGETS if n in results}
        scores.write_text(json.dumps(ordered, indent=2, ensure_ascii=False) + "\n")
        (RESULTS / "scores.md").write_text(render(ordered, load_equivalent()))
    low = [n for n in chosen if results[n]["score"] < TARGET_SCORE]
    if low:
        print(f"below {TARGET_SCORE:.0%}: {', '.join(low)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
