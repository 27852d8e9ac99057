"""The `opensem` command line. Every stage command takes --workspace/-w and --set SECTION.KEY=VALUE."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from opensem import __version__
from opensem.errors import OpenSEMError
from opensem.terminal import Console

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
console = Console(stderr=True)
out = Console()
STATE = {"debug": False, "allow_outside": False}

WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", help="Workspace folder (default: current directory)")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config value, e.g. --set train.learning_rate=1e-4 (repeatable)"),
]


def _ws(workspace: Path, sets: Optional[list[str]], lock: Optional[str] = None):
    """The workspace, its configs checked; ``lock``: this command writes, so it holds the workspace's lock."""
    from opensem.config import check_overrides
    from opensem.workspace import Workspace

    check_overrides(sets, Path(workspace).expanduser().resolve())
    ws = Workspace(workspace, tuple(sets or ()), allow_outside=STATE["allow_outside"])
    ws.check()
    if lock:
        ws.lock(lock)
    return ws


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
    adapter: Annotated[Optional[str], typer.Option(help="Adapter name in models/adapters or a path")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens")] = 128,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """Answer a question with the base model of the train config (and an adapter, if given)."""
    from opensem.inference import load_chat_model
    from opensem.models import resolve_base_model
    from opensem.adapters import find_adapter, trained_on

    ws = _ws(workspace, sets)
    cfg = ws.train_config()
    adapter_dir = find_adapter(ws, cfg, adapter) if adapter else None
    base = (trained_on(adapter_dir) if adapter_dir else None) or resolve_base_model(cfg.base_model, ws.base_models_dir)
    model = load_chat_model(base.path, str(adapter_dir) if adapter_dir else None)
    system = ws.eval_config().answers.system_prompt
    conv = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    out.print(model.generate([conv], max_new_tokens=max_new_tokens)[0].text)


@app.command()
def forge(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and estimated cost; call nobody")] = False,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """Stage 1: data/raw -> data/processed/train.jsonl + test.jsonl, via the configured teacher."""
    from opensem.forge import run_forge

    run_forge(_ws(workspace, sets, lock=None if dry_run else "forge"), dry_run=dry_run, console=console)


@app.command()
def cpt(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the corpus plan and the rewrites' estimated cost; train nothing")] = False,
    corpus_only: Annotated[bool, typer.Option("--corpus-only", help="Build data/processed/cpt.jsonl (and its rewrites) and stop")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the last interrupted run from its checkpoint")] = False,
    run_name: Annotated[Optional[str], typer.Option(help="Adapter folder name under models/cpt")] = None,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """Continued pre-training on the raw documents (configs/cpt_config.yaml) -> models/cpt/{run_name}."""
    ws = _ws(workspace, sets, lock=None if dry_run else "cpt")
    if dry_run or corpus_only:
        from opensem.cpt.corpus import build_corpus

        corpus = build_corpus(ws, ws.cpt_config(), console, dry_run=dry_run)
        if corpus:
            console.print(f"corpus written to {ws.cpt_config().corpus}: {corpus.counts}")
        return
    from opensem.cpt import run_cpt

    run_cpt(ws, resume=resume, run_name=run_name, console=console)


@app.command()
def train(
    resume: Annotated[bool, typer.Option("--resume", help="Continue the last interrupted run from its checkpoint")] = False,
    run_name: Annotated[Optional[str], typer.Option(help="Adapter folder name under models/adapters")] = None,
    from_cpt: Annotated[Optional[str], typer.Option(
        "--from-cpt", help="Start from a continued pre-training run (its name in models/cpt, or 'latest'); after_cpt says how")] = None,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """Stage 3: LoRA fine-tuning from configs/train_config.yaml -> models/adapters/{run_name}."""
    from opensem.train import run_training

    ws = _ws(workspace, sets, lock="train")
    chain = None
    if from_cpt and not resume:
        from opensem.cpt.stage import chain_from, find_cpt

        chain = chain_from(find_cpt(ws, None if from_cpt == "latest" else from_cpt), ws.train_config().after_cpt)
    run_training(ws, resume=resume, run_name=run_name, console=console, chain=chain)


@app.command()
def pairs(
    adapter: Annotated[Optional[str], typer.Option(help="The instruction-tuned adapter (name or path; default: the latest)")] = None,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """Preference pairs: the tuned model's own wrong answers to training questions vs the grounded ones -> preferences.jsonl."""
    from opensem.prefs import build_pairs
    from opensem.adapters import find_adapter

    ws = _ws(workspace, sets, lock="pairs")
    build_pairs(ws, find_adapter(ws, ws.train_config(), adapter), console)


@app.command()
def prefer(
    adapter: Annotated[Optional[str], typer.Option(help="The instruction-tuned adapter to start from (default: the latest)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the last interrupted run from its checkpoint")] = False,
    run_name: Annotated[Optional[str], typer.Option(help="Adapter folder name under models/preference")] = None,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """Preference tuning (DPO or ORPO, configs/preference_config.yaml) on the pairs -> models/preference/{run_name}."""
    from opensem.prefs import run_preference
    from opensem.adapters import find_adapter

    ws = _ws(workspace, sets, lock="prefer")
    sft = None if resume else find_adapter(ws, ws.train_config(), adapter)
    run_preference(ws, sft, resume=resume, run_name=run_name, console=console)


@app.command("export")
def export_cmd(
    run_name: Annotated[Optional[str], typer.Argument(metavar="[RUN]", help="A run name (see `opensem runs`) or an adapter path; default: the latest")] = None,
    fmt: Annotated[Optional[list[str]], typer.Option("--format", help="merged | gguf | ollama | lora-gguf | a plugin's | package.module:Class (repeatable; default: export_config.yaml's formats)")] = None,
    gguf_type: Annotated[Optional[list[str]], typer.Option("--gguf-type", help="f16, bf16, q8_0, q4_k_m, ... (repeatable; default: export_config.yaml's gguf_types)")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the round-trip check against the evaluated model")] = False,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """A trained run -> merged safetensors, GGUF, an Ollama Modelfile, a LoRA GGUF (models/exports/RUN), each checked
    against the evaluated model."""
    from opensem.export.stage import EXPORT_MANIFEST, export_run, find_run
    from opensem.lineage import read_json

    ws = _ws(workspace, sets, lock="export")
    from opensem.export.formats import FORMATS

    fmts = None
    if fmt:  # a registered name, or package.module:Class for a format of your own
        _choices("--format", [f for f in fmt if ":" not in f], FORMATS.names())
        fmts = list(dict.fromkeys(fmt))
    from opensem.config import GGUF_TYPE_NAMES

    types = _choices("--gguf-type", gguf_type, GGUF_TYPE_NAMES)
    folder = export_run(ws, find_run(ws, run_name), fmts, types, False if no_verify else None, console)
    for key, f in read_json(folder / EXPORT_MANIFEST).get("files", {}).items():
        check = f.get("check") or {}
        agree = f"agreement {check['agreement']:.2f}/5, {check['exact']:.0%} identical" if check else "not checked"
        out.print(f"{key:12} {f['path']}  {f['bytes'] / 1e6:.1f} MB  {f['seconds']:.1f} s  {agree}")


def _choices(option: str, values: Optional[list[str]], allowed) -> Optional[list[str]]:
    if not values:
        return None
    bad = [v for v in values if v not in allowed]
    if bad:
        raise OpenSEMError(f"{option} {bad[0]!r}: use one of {', '.join(allowed)}")
    return list(dict.fromkeys(values))


@app.command()
def serve(
    run_name: Annotated[Optional[str], typer.Argument(metavar="[RUN]", help="A run name or adapter path; default: the latest")] = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1")] = 8000,
    engine: Annotated[str, typer.Option(help="llama.cpp (the exported GGUF) | vllm (merged base + --enable-lora, CUDA)")] = "llama.cpp",
    gguf_type: Annotated[Optional[str], typer.Option("--gguf-type", help="Which exported GGUF (default: the Modelfile's, else the first)")] = None,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """An OpenAI-compatible chat endpoint on 127.0.0.1 for an exported run (exported first if needed)."""
    from opensem.export.serve import serve_run
    from opensem.export.stage import find_run

    if engine not in ("llama.cpp", "vllm"):
        raise OpenSEMError(f"--engine {engine!r}: use llama.cpp or vllm")
    ws = _ws(workspace, sets)
    sys.exit(serve_run(ws, find_run(ws, run_name), port, engine, gguf_type, console))


@app.command()
def judge(
    mode: Annotated[Optional[str], typer.Option(help="baseline | fine-tuned")] = None,
    adapter: Annotated[Optional[str], typer.Option(help="Adapter name or path (default: the latest)")] = None,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate", help="Report each judge's agreement with human scores: the shipped set, or FILE")] = False,
    file: Annotated[Optional[Path], typer.Argument(
        help="With --calibrate: your own human-scored answers, a JSON list of {question, golden, candidate, human_score 1-5}",
        show_default=False)] = None,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """Stages 2 and 4: answer the golden set, score 1-5 through promptfoo, print Baseline vs Fine-Tuned."""
    from opensem.judge import run_calibration, run_judge

    ws = _ws(workspace, sets, lock="judge")
    if file is not None and not calibrate:
        raise OpenSEMError(f"{file}: a file argument is only for --calibrate (opensem judge --calibrate {file})")
    if calibrate:
        run_calibration(ws, file, console=out)
        return
    if mode not in ("baseline", "fine-tuned"):
        raise OpenSEMError("--mode must be 'baseline' or 'fine-tuned' (or use --calibrate)")
    run_judge(ws, mode=mode, adapter=adapter, console=out)


@app.command()
def run(
    force: Annotated[bool, typer.Option("--force", help="Redo every stage even if its inputs did not change")] = False,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """The stages of configs/pipeline_config.yaml (default forge -> baseline -> train -> fine-tuned; cpt may go before train), then the report; up-to-date stages are skipped."""
    from opensem.pipeline import run_pipeline

    run_pipeline(_ws(workspace, sets, lock="run"), force=force, console=out)


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
           stages=[x.strip() for x in stages.split(",") if x.strip()] if stages else None, max_hours=max_hours, max_cost=max_cost)


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
