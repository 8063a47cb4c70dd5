"""Stage `check-params`: every DVC pipeline's params file, checked before any stage of it runs.

DVC deletes a stage's outputs first and reads the params the stage lists afterwards, so a
params file that lost a key (a typo such as `epoch: 3`) used to cost the trained models, and a
misspelt key added beside the right one went unnoticed. This stage runs first (dvc.yaml's
validate stage depends on its note, and every other stage of both pipelines on validate's
outputs), tracks every params file whole, and fails the run, with the param and the fix, when
- a file fails config.py's checks (types, values, unknown keys with a did-you-mean);
- a file lacks a param that its pipeline's stages list (DVC would stop after deleting outputs);
- two profiles that share the crops (the same paths.cropped) disagree on how they are made
  (training on them would stop, after DVC deleted its models);
- preprocess.targets names a class ImageNet does not have.
The pipelines and their params files are PIPELINES; the parsing of dvc.yaml is pure.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from .config import ConfigError, Params, load_params, require_params

# A pipeline file → the params file its stages read (profiles/quick/dvc.yaml names its own in each stage).
PIPELINES = {"dvc.yaml": "params.yaml", "profiles/quick/dvc.yaml": "params.quick.yaml"}
CHECKED_NOTE = "params.checked"
NOTE_TEXT = ("Written by dvc.yaml's check-params stage (`transfer-study check-params`) once every DVC pipeline's\n"
             "params file passed the project's checks. The other stages depend on it, so a bad params file stops\n"
             "`dvc repro` before any stage deletes its outputs. Its content never changes.\n")


def tracked_params(pipeline: dict, pipeline_dir: str) -> dict[str, list[str]]:
    """The params each stage of a parsed dvc.yaml lists, by params file (a path from the project
    root): a plain entry belongs to the params.yaml in the stage's wdir (DVC's default), a
    `{file: [keys]}` entry to that file; a file listed without keys is tracked whole and requires nothing."""
    tracked: dict[str, list[str]] = {}
    for stage in (pipeline.get("stages") or {}).values():
        wdir = Path(pipeline_dir) / stage.get("wdir", ".")
        for entry in stage.get("params") or []:
            groups = {"params.yaml": [entry]} if isinstance(entry, str) else entry
            for file, keys in groups.items():
                name = _normal(wdir / file)
                for key in keys or []:
                    if key not in tracked.setdefault(name, []):
                        tracked[name].append(key)
    return tracked


def _normal(path: Path) -> str:
    """`profiles/quick/../../params.quick.yaml` → `params.quick.yaml` (no file system access)."""
    parts: list[str] = []
    for part in path.parts:
        if part == "..":
            parts.pop()
        elif part != ".":
            parts.append(part)
    return Path(*parts).as_posix()


def shared_crops_differences(a: Params, b: Params) -> list[str]:
    """How two profiles that read the same crops (paths.cropped) disagree on how they are made; [] if
    they do not share crops or agree."""
    if a.paths.cropped != b.paths.cropped:
        return []
    return [f"{f.name}: {getattr(a.preprocess, f.name)!r} vs {getattr(b.preprocess, f.name)!r}"
            for f in dataclasses.fields(a.preprocess) if getattr(a.preprocess, f.name) != getattr(b.preprocess, f.name)]


def check_pipelines(root: Path) -> list[str]:
    """Check each pipeline of PIPELINES that exists under root; gives back one line per params
    file checked. Raises ConfigError naming the file, the param and the fix."""
    from .preprocess import target_classes

    root = Path(root)
    tracked: dict[str, dict[str, list[str]]] = {}  # params file → pipeline → the keys it lists
    for pipeline_file, params_file in PIPELINES.items():
        path = root / pipeline_file
        if not path.is_file():
            continue
        try:
            pipeline = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"'{pipeline_file}' is not valid YAML: {exc}") from None
        tracked.setdefault(params_file, {})
        for file, keys in tracked_params(pipeline, str(Path(pipeline_file).parent)).items():
            tracked.setdefault(file, {})[pipeline_file] = keys
    checked: dict[str, Params] = {}
    for file, pipelines in tracked.items():
        checked[file] = load_params(root / file)  # unknown keys first: a misspelt key is also a missing one
        for pipeline_file, keys in pipelines.items():
            require_params(root / file, keys, pipeline_file)
    for file, params in checked.items():
        try:
            target_classes(params.preprocess.targets)
        except ConfigError as exc:
            raise ConfigError(f"{file}: {exc}") from None
    _check_shared_crops(checked)
    return [f"{file}: checked" for file in checked]


def _check_shared_crops(checked: dict[str, Params]) -> None:
    files = list(checked)
    for i, first in enumerate(files):
        for second in files[i + 1:]:
            differences = shared_crops_differences(checked[first], checked[second])
            if differences:
                raise ConfigError(
                    f"{first} and {second} share the crops in '{checked[first].paths.cropped}' but not their "
                    f"preprocess settings ({'; '.join(differences)}); set the same preprocess section in both "
                    f"(the crops are made with {first}'s)")


def write_note(root: Path) -> Path:
    """The stage's output: a note with fixed content, so the stages after it rerun only for their own params."""
    note = Path(root) / CHECKED_NOTE
    note.write_text(NOTE_TEXT)
    return note
