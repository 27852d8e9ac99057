"""The `opensem` command line. Every stage command takes --workspace/-w and --set SECTION.KEY=VALUE."""

from __future__ import annotations

import errno
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from opensem import __version__
from opensem.commands import STATE, SetOpt, WorkspaceOpt, console, open_workspace, out
from opensem.errors import OpenSEMError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

app = typer.Typer(
    name="opensem",
    help="OpenSEM: raw documents -> grounded training data -> LoRA adapter -> judged Baseline vs Fine-Tuned report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_ws = open_workspace


def _print_version(value: bool) -> None:
    if value:
        out.print(f"opensem {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors")] = False,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print the version and exit")] = False,
    allow_outside_workspace: Annotated[
        bool, typer.Option("--allow-outside-workspace", help="Let output_dir / reports_dir point outside the workspace")
    ] = False,
):
    STATE["debug"] = debug or os.environ.get("OPENSEM_DEBUG") == "1"
    STATE["allow_outside"] = allow_outside_workspace


OWN_COMMANDS = ("init", "doctor", "ask", "run", "stage", "runs", "launch")  # the rest are the stages' own


def add_stage_commands() -> None:
    """Each registered stage's own commands (its ``commands``), the built-ins' and a plugin's alike: `opensem forge`,
    `opensem train`, ... A name already taken keeps its first owner. Loading a stage makes its config section known, so
    its command takes ``--set`` of that section."""
    from opensem.errors import ConfigError
    from opensem.stages import STAGES, load_stage

    taken = set(OWN_COMMANDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a broken plugin says so when a run uses it, not on every command
        names = STAGES.names()
    for name in names:
        try:
            stage = load_stage(name)
        except ConfigError:
            continue
        for command, fn in (getattr(stage, "commands", None) or {}).items():
            if command not in taken:
                app.command(command)(fn)
                taken.add(command)


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Where to create the workspace")] = Path("."),
    example: Annotated[Optional[str], typer.Option(help="Also copy an example domain (e.g. product-manual)")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite files that already exist")] = False,
):
    """Create the workspace layout (configs, data/raw, evals, models) in DIRECTORY."""
    from opensem.workspace import init_workspace

    created = init_workspace(directory, example, force)
    console.print(f"workspace ready at [bold]{directory.resolve()}[/] ({len(created)} file(s) written)")
    if example:
        console.print(f"example '{example}' copied: run `opensem run -w {directory}`")
    else:
        console.print(f"next: put documents in {directory}/data/raw and a golden set in {directory}/evals/golden_set.json")


@app.command()
def doctor(workspace: WorkspaceOpt = Path(".")):
    """What this machine has and what OpenSEM can do on it."""
    from opensem.doctor import run_doctor

    run_doctor(Path(workspace), out)


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question")],
    adapter: Annotated[Optional[str], typer.Option(help="A run name in models/adapters or a path (default: the latest finished run)")] = None,
    base: Annotated[bool, typer.Option("--base", help="The base model of the train config, no adapter")] = False,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Longest answer in tokens (default: the judged one, eval_config.yaml answers.max_new_tokens)")] = None,
    retrieval: Annotated[Optional[bool], typer.Option("--retrieval/--no-retrieval", help="Put the top passages of data/raw in the prompt, as the judge's \"+ retrieval\" row does, and list them (default: as the judge's recommended row)")] = None,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """Answer a question as the judge answered it: greedy (answers.temperature), the judged system prompt and answer
    length. Default: the latest finished run, as the judge's recommended row (with or without passages of your
    documents); --base for the model under it, --retrieval / --no-retrieval to choose."""
    from opensem.adapters import find_adapter, trained_on
    from opensem.inference import load_chat_model
    from opensem.models import resolve_base_model
    from opensem.verdict import answer_with_retrieval

    ws = _ws(workspace, sets)
    cfg = ws.train_config()
    if base and adapter:
        raise OpenSEMError("--base and --adapter: name one of them")
    adapter_dir = None if base else find_adapter(ws, cfg, adapter) if adapter else _latest_run(ws)
    use_retrieval = answer_with_retrieval(ws, adapter_dir, retrieval, console.print)
    model_base = (trained_on(adapter_dir) if adapter_dir else None) or resolve_base_model(cfg.base_model, ws.base_models_dir)
    model = load_chat_model(model_base.path, str(adapter_dir) if adapter_dir else None)
    answers = ws.eval_config().answers
    passages, text = [], question
    if use_retrieval:
        from opensem.retrieval import Retriever

        text, passages = Retriever.for_workspace(ws, model_base.path, console)(question, answers.system_prompt)
    conv = ([{"role": "system", "content": answers.system_prompt}] if answers.system_prompt else []) + [{"role": "user", "content": text}]
    out.print(model.generate([conv], max_new_tokens=max_new_tokens or answers.max_new_tokens, temperature=answers.temperature)[0].text,
              markup=False, highlight=False, soft_wrap=True)
    if passages:
        out.print("\nsources:\n" + "\n".join(f"[{i + 1}] {p.heading} ({p.id})" for i, p in enumerate(passages)),
                  markup=False, highlight=False, soft_wrap=True)


def _latest_run(ws) -> Optional[Path]:
    """The run `opensem export` and `opensem serve` pick without a name, or None (then the base model answers)."""
    from opensem.export.stage import find_run

    try:
        return find_run(ws, None)
    except OpenSEMError:
        return None


add_stage_commands()  # here, so that `opensem --help` lists them between ask and run


@app.command()
def run(
    force: Annotated[bool, typer.Option("--force", help="Redo every stage even if its inputs did not change")] = False,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """The stages of configs/pipeline_config.yaml (default forge -> baseline -> train -> fine-tuned; cpt may go before train), then the report; up-to-date stages are skipped."""
    from opensem.pipeline import run_pipeline

    run_pipeline(_ws(workspace, sets, lock="run"), force=force, console=out)


@app.command("stage")
def stage_cmd(
    name: Annotated[str, typer.Argument(help="A stage of `opensem run` by name (forge, train, ..., a plugin's) or package.module:attribute")],
    force: Annotated[bool, typer.Option("--force", help="Run it even if its inputs did not change")] = False,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """One stage, as `opensem run` runs it: skipped when up to date, resumed when interrupted; what it needs comes from
    the stages finished here before, and its result is kept for the stages after it."""
    from opensem.pipeline import run_one

    run_one(_ws(workspace, sets, lock="stage"), name, force=force, console=out)


launch_app = typer.Typer(help="The pipeline on a rented GPU through SkyPilot: launch, then status / logs / fetch / down.",
                          invoke_without_command=True, no_args_is_help=False)
app.add_typer(launch_app, name="launch")
ClusterOpt = Annotated[Optional[str], typer.Option("--cluster", help="Which launch (default: the latest)")]


@launch_app.callback()
def launch_cmd(
    ctx: typer.Context,
    cloud: Annotated[Optional[str], typer.Option(help="runpod | aws | gcp | azure | lambda | kubernetes | ... (SkyPilot's names), or local (this machine)")] = None,
    gpu: Annotated[Optional[str], typer.Option(help="SkyPilot accelerators, e.g. RTX4090:1 or A100-80GB:1 ('none': CPU)")] = None,
    nodes: Annotated[Optional[int], typer.Option(help="Nodes; > 1 runs data-parallel training (hf engine, torchrun)")] = None,
    stages: Annotated[Optional[str], typer.Option(help="Comma-separated stages (default: pipeline_config.yaml's)")] = None,
    max_hours: Annotated[Optional[float], typer.Option(help="The job ends itself after this long")] = None,
    max_cost: Annotated[Optional[float], typer.Option(help="USD: refuse to launch when price x max-hours is above it")] = None,
    spot: Annotated[Optional[bool], typer.Option("--spot/--no-spot", help="Spot instances as a managed job that recovers from "
                                                 "preemption (checkpoints on launch.bucket); default: use_spot")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and the task YAML; no credentials, no network")] = False,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """Launch the workspace's pipeline on a cloud GPU (configs/launch_config.yaml; these options override it)."""
    if ctx.invoked_subcommand:
        return
    from opensem.launch import launch

    if nodes is not None and nodes < 1:
        raise OpenSEMError(f"--nodes {nodes}: use 1 or more")
    if max_hours is not None and max_hours <= 0:
        raise OpenSEMError(f"--max-hours {max_hours}: use a positive number of hours")
    ws = _ws(workspace, sets, lock=None if dry_run else "launch")
    launch(ws, console if not dry_run else out, dry_run=dry_run, cloud=cloud, gpu=gpu, nodes=nodes,
           stages=[x.strip() for x in stages.split(",") if x.strip()] if stages else None, max_hours=max_hours, max_cost=max_cost,
           spot=spot)


@launch_app.command("status")
def launch_status(cluster: ClusterOpt = None, workspace: WorkspaceOpt = Path(".")):
    """The cluster and its job queue."""
    from opensem.launch import status

    out.print(status(_ws(workspace, None), cluster), markup=False, highlight=False)


@launch_app.command("logs")
def launch_logs(cluster: ClusterOpt = None, follow: Annotated[bool, typer.Option("--follow", help="Keep streaming")] = False,
                workspace: WorkspaceOpt = Path(".")):
    """The job's output."""
    from opensem.launch import logs

    logs(_ws(workspace, None), cluster, follow)


@launch_app.command("fetch")
def launch_fetch(cluster: ClusterOpt = None, workspace: WorkspaceOpt = Path(".")):
    """Bring the outputs (adapters, reports, run manifests, lineage) home into this workspace."""
    from opensem.launch import fetch

    fetch(_ws(workspace, None, lock="launch fetch"), cluster, console)


@launch_app.command("down")
def launch_down(cluster: ClusterOpt = None, workspace: WorkspaceOpt = Path(".")):
    """Tear the cluster down."""
    from opensem.launch import down

    down(_ws(workspace, None, lock="launch down"), cluster, console)


@app.command()
def runs(
    compare: Annotated[Optional[tuple[str, str]], typer.Option(
        "--compare", metavar="RUN_A RUN_B", help="Two run ids: B's fine-tuned model against A's, paired on the golden set")] = None,
    workspace: WorkspaceOpt = Path("."),
):
    """List past runs and their headline numbers; or compare two runs' fine-tuned models (--compare RUN_A RUN_B)."""
    from opensem.pipeline import compare_runs, list_runs

    if compare:
        compare_runs(_ws(workspace, None), compare[0], compare[1], console=out)
        return
    list_runs(_ws(workspace, None), console=out)


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: user errors are one line and a non-zero exit; --debug shows the traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("OPENSEM_DEBUG") == "1"
    try:
        app(args=args, standalone_mode=False)
    except OpenSEMError as e:
        if debug:
            raise
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except OSError as e:
        if debug or e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        console.print(f"[bold red]error:[/] no space left on the device{escape(str(where))}: free some space and run the command "
                      f"again (what was finished is kept: every output is replaced only when complete)", highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:  # usage errors of typer's click (vendored in typer >= 0.20): they show themselves
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Exit" and isinstance(getattr(e, "exit_code", None), int):
            sys.exit(e.exit_code)
        raise


def stage_main(command: str) -> None:
    """For src/forge.py, src/train.py, src/judge.py: `python src/forge.py [options]`."""
    main([command, *sys.argv[1:]])
