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
    model_dir: Optional[str] = typer.Option(None, "--model-dir",
                                            help="where zoo / hub model names live"),
    frontend: str = typer.Option("auto", "--frontend", help="auto, torch (torch.export) or dsl"),
    dump_ir: Optional[str] = typer.Option(None, "--dump-ir",
                                          help="folder for the IR after each pass (NN-pass.ir)"),
    check: bool = typer.Option(False, "--check",
                               help="interpret before/after each pass; name the first that "
                                    "changes the numbers"),
    passes: Optional[str] = typer.Option(None, "--passes",
                                         help="comma-separated pass list instead of the "
                                              "target's pipeline"),
    pass_option: list[str] = typer.Option([], "--pass-option",
                                          help="KEY=VALUE read by passes (repeatable), e.g. "
                                               "fp16_limit=4096"),
    quant_block: Optional[int] = typer.Option(None, "--quant-block",
                                              help="onnx-int4 block size: 16/32/64/128/256"),
    report: bool = typer.Option(False, "--report", help="write report.json/report.md: "
                                "quantization accuracy vs the float weights"),
    decode_graphs: Optional[str] = typer.Option(
        None, "--decode-graphs", help="comma-separated batch sizes that get a static decode "
        "graph (replayed as a CUDA graph on GPU), e.g. 1,8"),
    kernels: str = typer.Option(
        "onnxruntime", "--kernels", help="'flagc': static decode graphs use flagc's own "
        "kernels, compiled on first use (onnx-fp16: CUDA products for up to 4 rows, with "
        "nvcc; onnx-fp32/int8/int4: CPU attention; onnx-int4: CPU block-quantized "
        "products, QGemv; int8 encoders: attention over packed tokens)"),
    greedy_screen: bool = typer.Option(
        True, "--greedy-screen/--no-greedy-screen", help="static decode graphs with a float32 "
        "LM head also get greedy variants that screen the head at 8 bits and prove each pick "
        "exact (CPU greedy decoding)"),
):
    """Build a model into an artifact folder (engine + manifest + tokenizer)."""
    from flagc import api
    from flagc.progress import set_quiet

    set_quiet(quiet)
    if dry_run:
        plan = api.plan(model, target, output, custom=custom, random_weights=random_weights,
                        seed=seed, task=task, model_dir=model_dir, frontend=frontend,
                        passes=passes.split(",") if passes else None)
        typer.echo(plan.render())
        if not force:
            plan.check()  # the same refusal (and exit status 1) the real build would give
        return
    result = api.build(model, target, output, custom=custom, max_seq=max_seq,
                       max_batch=max_batch, task=task, random_weights=random_weights,
                       seed=seed, check_resources=not force, model_dir=model_dir,
                       frontend=frontend, dump_ir=dump_ir, check=check,
                       passes=passes.split(",") if passes else None,
                       pass_options=_pass_options(pass_option), quant_block=quant_block,
                       report=report, decode_graphs=_int_list(decode_graphs, "--decode-graphs"),
                       kernels=kernels, greedy_screen=greedy_screen)
    if not quiet:
        for p in result["build"]["passes"]:
            if p["rewrites"]:
                done = ", ".join(f"{k} {v}" for k, v in p["rewrites"].items())
                typer.echo(f"  {p['name']:<20} {p['seconds'] * 1e3:7.1f} ms  {done}")
        g = result["graph"]
        typer.echo(f"built {result.path} ({result['target']['name']}, {g['nodes']} nodes, "
                   f"{g['parameters'] / 1e6:.1f}M parameters, {result['build']['seconds']:.1f} s)")


def _int_list(text: Optional[str], flag: str) -> Optional[list[int]]:
    from flagc.errors import ConfigError

    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers") from None


def _pass_options(items: list[str]) -> dict:
    """KEY=VALUE strings -> a dict; values parse as JSON when they can (numbers, booleans)."""
    import json

    from flagc.errors import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--pass-option {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


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
    num_beams: int = typer.Option(1, "--num-beams", help="beam search with this many beams"),
    stream: bool = typer.Option(False, "--stream", help="print text as it is generated"),
    as_json: bool = typer.Option(False, "--json", help="print token ids and text as JSON"),
    device: str = typer.Option("cpu", "--device"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    pair: Optional[str] = typer.Option(None, "--pair", help="second sentence (semantic matching)"),
):
    """Run an artifact: text for generation, vectors / labels for encoder tasks."""
    from flagc import api

    if (prompt is None) == (ids is None):
        raise FlagcError("give exactly one of --prompt TEXT or --ids 1,2,3")
    model = api.load(artifact, device=device, threads=threads)
    if model.manifest.get("zoo", {}).get("kind") == "encoder":
        from flagc.runtimes.encoder import run_task

        typer.echo(run_task(model, prompt if prompt is not None else "", pair, as_json))
        return
    source = prompt if prompt is not None else _parse_ids(ids)
    printer = None
    if stream and not as_json:
        def printer(piece):
            sys.stdout.write(piece)
            sys.stdout.flush()
    result = model.generate(source, chat=chat, stream=printer, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, seed=seed,
                            stop_strings=tuple(stop), num_beams=num_beams)
    if as_json:
        typer.echo(json.dumps({"token_ids": result.token_ids, "text": result.text,
                               "finish_reason": result.finish_reason,
                               "prompt_tokens": result.prompt_tokens}, ensure_ascii=False))
    elif stream:
        typer.echo("")
    else:
        typer.echo(result.text if result.text is not None else
                   " ".join(map(str, result.token_ids)))


@app.command()
@_friendly
def chat(
    artifact: str = typer.Argument(..., help="artifact folder or the engine file inside it"),
    system: Optional[str] = typer.Option(None, "--system", help="system message"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature"),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    device: str = typer.Option("cpu", "--device"),
    threads: Optional[int] = typer.Option(None, "--threads"),
):
    """Chat with an artifact: one user turn per stdin line; /reset clears, /exit or EOF ends.

    The KV cache is kept between turns, so each turn only runs its own new tokens.
    """
    from flagc import api
    from flagc.runtimes.chat import ChatSession

    model = api.load(artifact, device=device, threads=threads)
    session = ChatSession(model, system=system, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, seed=seed)
    interactive, failed = sys.stdin.isatty(), False

    def printer(piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    while True:
        if interactive:
            typer.echo("> ", nl=False)
        line = sys.stdin.readline()
        text = line.strip()
        if not line or text == "/exit":
            break
        if text == "/reset":
            session.reset()
            typer.echo("(conversation cleared)")
        elif text:
            try:
                session.send(line.rstrip("\n"), stream=printer)
            except FlagcError as exc:  # the turn is dropped; the conversation goes on
                typer.echo(f"\nerror: {exc} (/reset starts a new conversation)", err=True)
                failed = True
                continue
            typer.echo("")
    if failed:
        raise typer.Exit(1)  # a scripted session must see that a turn failed


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise FlagcError(f"--ids must be comma-separated integers, got {text!r}") from None


@app.command()
@_friendly
def inspect(artifact: str = typer.Argument(...),
            as_json: bool = typer.Option(False, "--json"),
            batch: Optional[int] = typer.Option(None, "--batch", help="rows for the KV cache "
                                                "memory figure (default: the max batch)"),
            context: Optional[int] = typer.Option(None, "--context", help="tokens per row for "
                                                  "the KV cache memory figure (default: max seq)")):
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
        from flagc.runtimes.kv_cache import KVLayout

        layout, dims = KVLayout.from_manifest(m), m["dims"]
        rows, tokens = batch or dims["max_batch"], context or dims["max_seq"]
        if rows < 1 or tokens < 1:
            raise FlagcError(f"--batch and --context must be >= 1, got {rows} and {tokens}")
        total = layout.cache_bytes(rows, tokens)
        typer.echo(f"kv cache   {kv['layers']} layers x {kv['layout']} ({kv['dtype']}); "
                   f"{layout.bytes_per_token / 1024:.1f} KiB per token; batch {rows} x "
                   f"{tokens} tokens: {total / 2**20:.1f} MiB (past + present buffers)")
    typer.echo("ops        " + ", ".join(f"{k}={v}" for k, v in m["graph"]["ops"].items()))
    trt = m.get("tensorrt")
    if trt:
        typer.echo(f"tensorrt   {trt['flavor']} {trt['version']}, strongly typed "
                   f"{trt['precision'].get('compute')}, {trt['bytes'] / 2**20:.1f} MiB plan; runs "
                   f"on compute capability {', '.join(trt['compute_capabilities']) or '?'}")


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
