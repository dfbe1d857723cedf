"""The `flagc` command line (typer): thin commands that validate flags and call flagc.api."""

from __future__ import annotations

import functools
import json
import sys
from typing import List, Optional

import typer

from flagc.errors import FlagcError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="flagc: build transformer models into ONNX / TensorRT artifacts and run them.")


def _friendly(fn):
    """Print FlagcErrors as one clear line and exit 1 instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FlagcError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
    return wrapper


@app.command()
@_friendly
def build(
    model: str = typer.Option(..., "--model", "-m",
                              help="HF folder or .gguf file (with --random-weights: a zoo name)"),
    target: str = typer.Option("onnx-fp32", "--target", "-t", help="e.g. onnx-fp32"),
    output: str = typer.Option(..., "--output", "-o", help="artifact folder to write"),
    custom: Optional[str] = typer.Option(None, "--custom", help="custom model file (graph DSL)"),
    max_seq: Optional[int] = typer.Option(None, "--max-seq", help="longest context accepted"),
    max_batch: int = typer.Option(8, "--max-batch", help="largest batch"),
    task: str = typer.Option("text-generation", "--task"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    random_weights: bool = typer.Option(False, "--random-weights",
                                        help="seeded random weights, no checkpoint needed"),
    seed: int = typer.Option(0, "--seed", help="seed of --random-weights"),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="print the plan and its memory/disk estimate; build nothing"),
    force: bool = typer.Option(False, "--force",
                               help="build even when the estimate says it will not fit"),
):
    """Build a model into an artifact folder (engine + manifest + tokenizer)."""
    from flagc import api
    from flagc.progress import set_quiet

    set_quiet(quiet)
    if dry_run:
        plan = api.plan(model, target, output, custom=custom, random_weights=random_weights,
                        seed=seed)
        typer.echo(plan.render())
        if not force:
            plan.check()  # the same refusal (and exit status 1) the real build would give
        return
    result = api.build(model, target, output, custom=custom, max_seq=max_seq,
                       max_batch=max_batch, task=task, random_weights=random_weights,
                       seed=seed, check_resources=not force)
    if not quiet:
        g = result["graph"]
        typer.echo(f"built {result.path} ({result['target']['name']}, {g['nodes']} nodes, "
                   f"{g['parameters'] / 1e6:.1f}M parameters, {result['build']['seconds']:.1f} s)")


@app.command()
@_friendly
def run(
    artifact: str = typer.Argument(..., help="artifact folder or the engine file inside it"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p"),
    ids: Optional[str] = typer.Option(None, "--ids", help="comma-separated prompt token ids"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the chat template"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature"),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: List[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    stream: bool = typer.Option(False, "--stream", help="print text as it is generated"),
    as_json: bool = typer.Option(False, "--json", help="print token ids and text as JSON"),
    device: str = typer.Option("cpu", "--device"),
    threads: Optional[int] = typer.Option(None, "--threads"),
):
    """Run an artifact: generate text from a prompt."""
    from flagc import api

    if (prompt is None) == (ids is None):
        raise FlagcError("give exactly one of --prompt TEXT or --ids 1,2,3")
    model = api.load(artifact, device=device, threads=threads)
    source = prompt if prompt is not None else _parse_ids(ids)
    printer = None
    if stream and not as_json:
        def printer(piece):
            sys.stdout.write(piece)
            sys.stdout.flush()
    result = model.generate(source, chat=chat, stream=printer, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, seed=seed,
                            stop_strings=tuple(stop))
    if as_json:
        typer.echo(json.dumps({"token_ids": result.token_ids, "text": result.text,
                               "finish_reason": result.finish_reason,
                               "prompt_tokens": result.prompt_tokens}, ensure_ascii=False))
    elif stream:
        typer.echo("")
    else:
        typer.echo(result.text if result.text is not None else
                   " ".join(map(str, result.token_ids)))


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise FlagcError(f"--ids must be comma-separated integers, got {text!r}") from None


@app.command()
@_friendly
def inspect(artifact: str = typer.Argument(...),
            as_json: bool = typer.Option(False, "--json")):
    """Show an artifact's IO signature, op histogram, parameters, KV layout and target."""
    from flagc.artifact import read_manifest

    folder, m = read_manifest(artifact)
    if as_json:
        typer.echo(json.dumps(m, indent=2))
        return
    typer.echo(f"artifact   {folder}")
    typer.echo(f"model      {m.get('model')} ({m.get('family')}, task {m.get('task')})")
    typer.echo(f"target     {m['target']['name']} ({m['target']['backend']}), engine "
               f"{m['engine']}")
    typer.echo(f"parameters {m['graph']['parameters']:,}  nodes {m['graph']['nodes']}")
    typer.echo("inputs")
    for s in m["io"]["inputs"]:
        typer.echo(f"  {s['name']}: {s['dtype']}[{', '.join(s['shape'])}]")
    typer.echo("outputs")
    for s in m["io"]["outputs"]:
        typer.echo(f"  {s['name']}: {s['dtype']}[{', '.join(s['shape'])}]")
    kv = m.get("kv_cache")
    if kv:
        per_token = 2 * kv["layers"] * kv["kv_heads"] * kv["head_dim"] * 4
        dims = m["dims"]
        full = per_token * dims["max_seq"] * dims["max_batch"]
        typer.echo(f"kv cache   {kv['layers']} layers x {kv['layout']} ({kv['dtype']}); "
                   f"{per_token / 1024:.1f} KiB per token, {full / 2**20:.1f} MiB at batch "
                   f"{dims['max_batch']} x {dims['max_seq']} tokens")
    typer.echo("ops        " + ", ".join(f"{k}={v}" for k, v in m["graph"]["ops"].items()))


@app.command()
def models():
    """List the built-in model families, targets and custom-graph model types."""
    from flagc.dsl.custom import BUILTIN_GRAPHS
    from flagc.lower.targets import TARGETS

    typer.echo("graph DSL model types: " + ", ".join(sorted(BUILTIN_GRAPHS)))
    typer.echo("targets: " + ", ".join(f"{n}{'' if t.implemented else ' (planned)'}"
                                       for n, t in TARGETS.items()))
    from flagc.models.registry import family_names, hub_model_names, task_names

    typer.echo("from_pretrain families: " + ", ".join(family_names()))
    typer.echo("from_pretrain hub names: " + ", ".join(hub_model_names()))
    typer.echo("tasks: " + ", ".join(task_names()))


from flagc.bench.command import register as _register_bench  # noqa: E402

_register_bench(app)

if __name__ == "__main__":
    app()
