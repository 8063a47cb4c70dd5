"""`transfer-study`: one thin command per pipeline stage; the logic lives in the stage modules."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from . import config
from .config import UserError
from .launch import HOST, SERVE_PORT, UI_PORT


def _params(ctx: click.Context) -> config.Params:
    """Params, read once on first use (commands such as `predict` need none)."""
    obj = ctx.find_root().obj
    if "params" not in obj:
        obj["params"] = config.load_params(obj["params_path"])
    return obj["params"]


def _root() -> Path:
    return config.project_root()


@click.group()
@click.option("--params", "params_path", default="params.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="Params file (e.g. params.quick.yaml for the quick profile).")
@click.pass_context
def cli(ctx: click.Context, params_path: str) -> None:
    """Train a CNN from scratch or transfer an ImageNet-pretrained one? The study's pipeline."""
    ctx.ensure_object(dict)
    ctx.obj["params_path"] = params_path


@cli.command("check-params")
def check_params() -> None:
    """Check every DVC pipeline's params file as its stages will read it (dvc.yaml's first stage)."""
    from .params_check import check_pipelines, write_note

    lines = check_pipelines(_root())
    note = write_note(_root())
    click.echo("\n".join(lines + [f"wrote {note.name}"]))


@cli.command("imagenet-classes")
@click.argument("word", required=False, default="")
def imagenet_classes(word: str) -> None:
    """List ImageNet's class names (those containing WORD), for preprocess.targets."""
    from .config import OBJECTNESS, TARGET_GROUPS
    from .preprocess import imagenet_categories

    names = [n for n in imagenet_categories() if word.lower() in n.lower()]
    click.echo("\n".join(names) if names else f"no ImageNet class name contains {word!r}")
    click.echo(f"(groups: {', '.join(TARGET_GROUPS)}; any object: [{OBJECTNESS}])", err=True)


@cli.group()
def data() -> None:
    """The raw dataset: fetch the default one, validate any."""


@data.command("fetch")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: paths.raw).")
@click.option("--source", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder holding Fashion-MNIST's idx files (default: Debian's, then upstream).")
@click.pass_context
def data_fetch(ctx: click.Context, dest: Path | None, source: Path | None) -> None:
    """Write the default dataset (Fashion-MNIST's six garment classes) to data/raw/<class>/."""
    from .data import fetch_dataset

    params = _params(ctx)
    summary = fetch_dataset(dest or Path(params.paths.raw), params.data, source or _opt_path(params.data.source))
    click.echo(f"fetched {summary}")


@data.command("validate")
@click.option("--strict", is_flag=True, help="Treat warnings as errors.")
@click.option("--verbose", is_flag=True, help="List every conversion and upscaled image, per file.")
@click.pass_context
def data_validate(ctx: click.Context, strict: bool, verbose: bool) -> None:
    """Check data/raw before anything trains; write the summary metric (paths.validation)."""
    from .data import validate_and_report

    params = _params(ctx)
    validate_and_report(Path(params.paths.raw), Path(params.paths.validation), params.validate, strict=strict,
                        verbose=verbose, input_size=config.model_input_size(params.train))


@cli.command()
@click.pass_context
def preprocess(ctx: click.Context) -> None:
    """Crop every raw image to its garment and store it square, as RGB (paths.cropped)."""
    from .preprocess import preprocess_dataset

    params = _params(ctx)
    preprocess_dataset(Path(params.paths.raw), Path(params.paths.cropped), params.preprocess)


@cli.command()
@click.pass_context
def split(ctx: click.Context) -> None:
    """Write the stratified train/val/test manifest (paths.manifest)."""
    from .split import write_manifest

    params = _params(ctx)
    write_manifest(Path(params.paths.cropped), Path(params.paths.manifest), params.split)


@cli.group()
def weights() -> None:
    """ImageNet weights for the pretrained conditions."""


@weights.command("fetch")
@click.pass_context
def weights_fetch(ctx: click.Context) -> None:
    """Download (or find) every weights file the params' pretrained cells need, before training."""
    from .cells import pretrained_architectures
    from .models import fetch_weights

    params = _params(ctx)
    archs = pretrained_architectures(params)
    if not archs:
        click.echo("no pretrained cell in train.architectures × train.conditions; nothing to fetch")
        return
    weights_dir = params.train.weights_dir
    for path in fetch_weights(archs, Path(weights_dir) if weights_dir else None):
        click.echo(f"ok {path}")


def _executor_option(function):
    return click.option("--executor", type=click.Choice(config.EXECUTORS), default=None,
                        help="local: one run after another here; ray: each run a task on the Ray cluster "
                             "(RAY_ADDRESS). Default: executor.kind.")(function)


def _with_executor(params: config.Params, executor: str | None) -> config.Params:
    """Params with --executor, when given, in place of executor.kind."""
    if executor is None:
        return params
    return dataclasses.replace(params, executor=dataclasses.replace(params.executor, kind=executor))


@cli.command()
@click.option("--arch", default=None, help="One architecture of train.architectures (default: all).")
@click.option("--condition", default=None, help="One condition of train.conditions (default: all).")
@click.option("--run", "variant", default=None,
              help="One run of the cell (s<seed>[-r<repeat>][-f<fraction>], as its run folder is named).")
@_executor_option
@click.pass_context
def train(ctx: click.Context, arch: str | None, condition: str | None, variant: str | None,
          executor: str | None) -> None:
    """Train the cells (architecture × condition × seed × split × size); one MLflow run each.

    Under `torchrun --nproc_per_node N -m transfer_study.cli train ...` each cell trains with DDP.
    With the ray executor every run of the profile that is not done trains on the cluster at once."""
    from .cells import cells_for
    from .runs import mark_excluded

    params = _with_executor(_params(ctx), executor)
    cells = cells_for(params, arch, condition, variant)
    if not cells and arch and condition:
        # dvc.yaml's train matrix has a stage for every arch × condition; an excluded one still leaves its out.
        folder = mark_excluded(_root() / params.paths.outputs / "models", arch, condition)
        click.echo(f"{arch}-{condition} is listed in train.exclude; nothing to train ({folder} says so)")
        return  # before importing torch and MLflow: an excluded stage takes half a second
    if not cells:
        click.echo("every cell asked for is listed in train.exclude; nothing to train")
        return
    if params.executor.kind == "ray":
        from .fanout import fan_out

        fan_out(params, ctx.find_root().obj["params_path"], cells, _root(), config.tracking_uri(),
                config.ray_address(params.executor))
        return
    from .distributed import process_group
    from .train import train_cell

    with process_group(config.launch_env()) as world:
        for cell in cells:
            train_cell(params, cell, _root(), config.tracking_uri(), world)


@cli.command()
@click.pass_context
def evaluate(ctx: click.Context) -> None:
    """Metrics on train/val/test for every run, logged to MLflow and written for DVC."""
    from .evaluate import evaluate_runs

    params = _params(ctx)
    out = Path(params.paths.outputs)
    evaluate_runs(out / "models", out / "evaluation", params.evaluate, config.tracking_uri())


@cli.command()
@click.pass_context
def report(ctx: click.Context) -> None:
    """Table 1, Figure 1, paired tests and, on the study's data only, the side-by-side with the study (reports/)."""
    from .report import write_report

    params = _params(ctx)
    out = Path(params.paths.outputs)
    write_report(out / "evaluation", out / "models", out / "reports", Path("references/study_table1.csv"),
                 params.evaluate, is_study_data=config.recorded_dataset_md5(_root()) == config.DEFAULT_DATASET_MD5)


@cli.command()
@click.pass_context
def register(ctx: click.Context) -> None:
    """Register every run's model; serve the best on validation (an ensemble, flips, calibrated) as @champion."""
    from .registry import RegisterPaths, promote_champion

    params = _params(ctx)
    out = Path(params.paths.outputs)
    paths = RegisterPaths(runs_csv=out / "evaluation" / "runs.csv", models_dir=out / "models", root=_root(),
                          out_dir=out / "registry")
    summary = promote_champion(paths, params.tracking.registered_model, config.tracking_uri())
    members = ", ".join(m["run"] + (" (flipped)" if m["tta"] else "") for m in summary["members"])
    click.echo(f"champion: {summary['name']} version {summary['version']}, {summary['kind']} of {members}, "
               f"temperature {summary['temperature']:g}; val macro-F1 {summary['val_f1']:.4f}, "
               f"test accuracy {summary['test_accuracy']:.4f} ({out / 'registry' / 'champion.json'})")
    if summary["temperature_note"]:
        click.echo(f"note: {summary['temperature_note']}")


@cli.command()
@click.option("--skip-data", is_flag=True,
              help="The fetch, validate and preprocess stages will not run: the crops must exist.")
@click.option("--estimate-only", is_flag=True,
              help="Only time the cells (for a profile you will not run): no weights, data or disk checks.")
@_executor_option
@click.pass_context
def plan(ctx: click.Context, skip_data: bool, estimate_only: bool, executor: str | None) -> None:
    """Preflight: the cells, the device, a time estimate from real steps here; weights, data and
    disk checked, so what would fail later fails now. With the ray executor: the cluster's nodes
    and GPUs, the weights checked and the steps timed on one of its nodes, the fan-out's wall time."""
    _print_plan(ctx, skip_data, estimate_only, executor=executor)


def _print_plan(ctx: click.Context, skip_data: bool, estimate_only: bool, err: bool = False,
                executor: str | None = None) -> None:
    from .plan import format_plan, preflight

    params_path = ctx.find_root().obj["params_path"]
    params = _with_executor(_params(ctx), executor)
    if params.executor.kind == "ray":
        from .fanout import plan_on_cluster

        click.echo(plan_on_cluster(params, params_path, _root(), skip_data, not estimate_only,
                                   config.ray_address(params.executor), config.tracking_uri()), err=err)
        return
    click.echo(format_plan(preflight(params, params_path, _root(), skip_data, checks=not estimate_only)), err=err)


@cli.command()
@click.argument("requested", required=False, default="")
@click.option("--params-file", is_flag=True, help="Print the profile's params file instead of its name.")
@click.option("--estimate", is_flag=True, help="Without a CUDA GPU, also time the study profile (--params) here.")
@click.option("--registered", is_flag=True,
              help="Without REQUESTED, the profile whose champion was registered last (make ui, make serve).")
@click.pass_context
def profile(ctx: click.Context, requested: str, params_file: bool, estimate: bool, registered: bool) -> None:
    """Print the profile to run: REQUESTED (study|quick), else study on a CUDA GPU, quick without one."""
    from .plan import PROFILES, profile_to_open

    records = _champion_records() if registered and not requested else {}
    chosen, reason = profile_to_open(requested or None, False if requested or records else _cuda_available(), records)
    click.echo(reason, err=True)
    if estimate and chosen != "study" and not requested:
        _print_plan(ctx, skip_data=False, estimate_only=True, err=True, executor="local")  # stdout: the choice alone
    click.echo(PROFILES[chosen] if params_file else chosen)


@cli.command("next-steps")
@click.pass_context
def next_steps(ctx: click.Context) -> None:
    """Where a finished run's report is, and how to open its runs and serve its champion."""
    from .launch import closing_lines

    click.echo("\n".join(closing_lines(_params(ctx), ctx.find_root().obj["params_path"])))


@cli.command()
@click.option("--port", default=UI_PORT, show_default=True)
@click.pass_context
def ui(ctx: click.Context, port: int) -> None:
    """`mlflow ui` on the project's tracking store; prints the address of the runs table."""
    from .launch import exec_tool, tool_environment, ui_launch

    uri = config.tracking_uri()
    lines, command = ui_launch(_params(ctx), uri, port)
    click.echo("\n".join(lines))
    if command is None:
        click.echo("MLFLOW_TRACKING_URI names a server, which serves this UI: nothing to start")
        return
    exec_tool(command, tool_environment(config.environment(), config.python_bin_dir(), uri))


@cli.command()
@click.option("--port", default=SERVE_PORT, show_default=True)
@click.pass_context
def serve(ctx: click.Context, port: int) -> None:
    """`mlflow models serve` of tracking.registered_model's @champion, with this environment's tools."""
    from .launch import check_champion, exec_tool, serve_command, tool_environment

    uri, name = config.tracking_uri(), _params(ctx).tracking.registered_model
    check_champion(uri, name)
    params_path = ctx.find_root().obj["params_path"]
    click.echo(f"serving models:/{name}@champion ({params_path}) at http://{HOST}:{port} (Ctrl-C stops it)")
    exec_tool(serve_command(name, port=port), tool_environment(config.environment(), config.python_bin_dir(), uri))


@cli.command()
@click.option("--skip-data", is_flag=True,
              help="Start at the split, on the crops `dvc repro preprocess` built (each profile splits its own way).")
@click.option("--skip-plan", is_flag=True, help="Do not run the preflight (`transfer-study plan` ran already).")
@click.pass_context
def pipeline(ctx: click.Context, skip_data: bool, skip_plan: bool) -> None:
    """The preflight, then every stage in order, in this process (the quick profile and MLproject's main)."""
    params = _params(ctx)
    if not skip_plan:
        click.echo("== plan ==", err=True)
        ctx.invoke(plan, skip_data=skip_data)
    stages = [split, train, evaluate, report, register]
    if not skip_data:
        raw = Path(params.paths.raw)
        if not (raw.is_dir() and any(raw.iterdir())):
            ctx.invoke(data_fetch)
        stages = [data_validate, preprocess] + stages
    for command in stages:
        click.echo(f"== {command.name} ==", err=True)
        ctx.invoke(command)


@cli.command()
@click.option("--url", default="http://127.0.0.1:5000", show_default=True, help="The model server.")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def predict(url: str, images: tuple[Path, ...]) -> None:
    """Classify IMAGES with a running `mlflow models serve`; a file that is not a readable image is
    named and left out, the others are classified (exit status 1 if any was left out)."""
    from .client import predict_images

    predictions = predict_images(url, list(images))
    click.echo(predictions.frame.to_string(index=False))
    for problem in predictions.skipped:
        click.echo(f"error: {problem}", err=True)
    if predictions.skipped:
        raise UserError(f"{len(predictions.skipped)} of {len(images)} files not classified (named above)")


def _champion_records() -> dict[str, str]:
    """Each profile's registry/champion.json that exists, oldest first (register writes it last)."""
    from .plan import PROFILES

    found = {}
    for name, params_file in PROFILES.items():
        if (_root() / params_file).is_file():
            record = Path(config.load_params(_root() / params_file).paths.outputs) / "registry" / "champion.json"
            if (_root() / record).is_file():
                found[name] = record
    return {name: str(record) for name, record in sorted(found.items(), key=lambda kv: (_root() / kv[1]).stat().st_mtime)}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _opt_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def main() -> None:
    """Entry point: bad input ends with one clear line and exit status 1, never a traceback."""
    try:
        cli(standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
