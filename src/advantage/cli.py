"""The `advantage` command line: thin typer commands over library calls."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from types import GenericAlias, UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel

from advantage.config import SFTConfig
from advantage.environment import set_engine_defaults
from advantage.server.config import ServeConfig

M = TypeVar("M", bound=BaseModel)

set_engine_defaults()  # every command may start an engine: before any of them loads torch

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Train LLM agents with reinforcement learning."
)


def _options_from(*configs: type[BaseModel]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command one --option per field of a pydantic config, with the field's description as its help:
    the config is the single place where a knob and its documentation live. The command's own named
    parameters come first; the config's fields arrive in its `**given`. With several configs, a field that
    two of them share is one option, documented by the first. A field whose `json_schema_extra` names an
    `envvar` is read from it when the option is not given."""

    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        own = inspect.signature(fn, eval_str=True).parameters.values()
        params = [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD]
        fields = {}
        for config in reversed(configs):
            fields.update(config.model_fields)
        for name, field in fields.items():
            ann: Any = field.annotation
            defaults = [
                (c.__name__, c.model_fields[name].get_default(call_default_factory=True))
                for c in configs
                if name in c.model_fields
            ]
            if len({repr(d) for _, d in defaults}) > 1:  # shared, with different defaults: say each
                default = "; ".join(f"{v} in {c}" for c, v in defaults)
            else:
                default = str(defaults[0][1])
            help_ = f"{field.description} (default: {default})"
            decls: tuple[str, ...] = ()
            if get_origin(ann) is Literal:
                help_ += f" One of: {', '.join(map(str, get_args(ann)))}."
                ann = str
            elif get_origin(ann) in (Union, UnionType):
                ann = next(a for a in get_args(ann) if a is not type(None))
            elif isinstance(ann, type) and issubclass(ann, BaseModel):  # a nested config: its fields as JSON
                help_ = f"{field.description} As JSON of its fields, e.g. '{{\"learning_rate\": 5e-5}}'."
                ann = str
            elif get_origin(ann) is tuple:  # typer takes plain element types (the config checks ranges)
                items = tuple(get_args(a)[0] if get_origin(a) is Annotated else a for a in get_args(ann))
                ann = GenericAlias(tuple, items)  # tuple[items]
            if ann is bool:
                dashed = name.replace("_", "-")
                decls = (f"--{dashed}/--no-{dashed}",)
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            envvar = extra.get("envvar")  # e.g. a key read from the environment when not given
            option = typer.Option(
                *decls, help=help_, show_default=False, envvar=envvar if isinstance(envvar, str) else None
            )
            params.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[ann | None, option],
                )
            )
        fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        return fn

    return wrap


@app.command()
@_options_from(ServeConfig)
def serve(**given: Any) -> None:
    """Serve base models and trained adapters through an OpenAI-compatible API.

    Every option is a field of advantage.server.config:ServeConfig."""
    from advantage.server.runner import serve_forever, service_of

    cfg = _config(ServeConfig, given)
    try:
        service = service_of(cfg)
    except (ImportError, ValueError) as e:  # a placement or engine that cannot run here, a bad base model
        raise typer.BadParameter(str(e)) from None
    serve_forever(service, cfg.host, cfg.port, cfg.api_key)


def _config(config: type[M], given: dict[str, Any]) -> M:
    """`config` from the options given (None: not given); a value it refuses is a usage error that names
    the option."""
    from pydantic import ValidationError

    try:
        return config(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        hints = sorted({"--" + str(err["loc"][0]).replace("_", "-") for err in e.errors() if err["loc"]})
        said = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        raise typer.BadParameter(said, param_hint=", ".join(hints) or None) from None


def _demo_configs() -> tuple[type[BaseModel], type[BaseModel]]:
    from advantage.tasks.tool_use.config import DemoConfig
    from advantage.tasks.tool_use.online import OnlineDemoConfig

    return DemoConfig, OnlineDemoConfig


@app.command()
@_options_from(*_demo_configs())
def demo(
    *,
    online: Annotated[
        bool,
        typer.Option(
            "--online",
            help="The online demo: simulated users send the task to the served model and rate its answers; "
            "the model learns from that traffic alone (fields of OnlineDemoConfig).",
        ),
    ] = False,
    **given: Any,
) -> None:
    """Train the bundled model on the tool-use demo task on CPU, with a held-out baseline and final eval.

    Every option is a field of advantage.tasks.tool_use.config:DemoConfig, or with --online of
    advantage.tasks.tool_use.online:OnlineDemoConfig."""
    config = _demo_configs()[1 if online else 0]
    given = {k: v for k, v in given.items() if v is not None}
    other = sorted(set(given) - set(config.model_fields))
    if other:
        mode = "the online demo (--online)" if online else "the offline demo (without --online)"
        flags = ", ".join("--" + k.replace("_", "-") for k in other)
        raise typer.BadParameter(f"{flags}: not an option of {mode}.")
    cfg = _config(config, given)
    if online:
        from advantage.tasks.tool_use import online as module
    else:
        from advantage.tasks.tool_use import train as module  # type: ignore[no-redef]
    module.main(cfg)  # type: ignore[arg-type]


@app.command()
@_options_from(SFTConfig)
def sft(
    data: Annotated[Path, typer.Argument(help="Training data: JSONL in OpenAI's chat fine-tuning format.")],
    *,
    model: Annotated[str, typer.Option(help="Model name (a new one, or one to go on training).")],
    project: Annotated[str, typer.Option(help="Project name.")] = "default",
    base_model: Annotated[
        str, typer.Option(help="Base model: a bundled name or an HF model dir.")
    ] = "smollm2-135m-instruct",
    val: Annotated[
        Path | None, typer.Option(help="Validation data, same format (instead of --val-fraction).")
    ] = None,
    root: Annotated[Path, typer.Option(help="Checkpoint root.")] = Path(".advantage"),
    **given: Any,
) -> None:
    """Fine-tune a LoRA on a JSONL file of chats (OpenAI's fine-tuning format: messages, tools, per-message
    weight), one checkpoint per step, loss and validation loss in metrics.jsonl.

    Every other option is a field of advantage.SFTConfig."""
    import asyncio

    from advantage.sft import train_sft_file

    cfg = _config(SFTConfig, given)
    try:
        result = asyncio.run(
            train_sft_file(
                data, model=model, project=project, base_model=base_model, root=root, config=cfg, val=val
            )
        )
    except ValueError as e:  # bad data: the message names the file and line
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
    m = result.metrics
    val_part = f", val loss {m['sft/val_loss_last']:.4f}" if "sft/val_loss_last" in m else ""
    typer.echo(
        f"{model}@{result.step}: {int(m['sft/steps'])} steps, loss {m['sft/loss_first']:.4f} -> "
        f"{m['sft/loss_last']:.4f}{val_part}; run dir {root / project / 'models' / model}"
    )


def _online_config() -> type[BaseModel]:
    from advantage.config import OnlineConfig

    return OnlineConfig


@app.command()
@_options_from(_online_config())
def online(
    model: Annotated[str, typer.Argument(help="The trainable model's name on the server.")],
    *,
    server: Annotated[str, typer.Option(help="The `advantage serve` URL, e.g. http://host:7999.")],
    api_key: Annotated[
        str | None, typer.Option(envvar="ADVANTAGE_API_KEY", help="The server's API key.")
    ] = None,
    project: Annotated[str, typer.Option(help="Project name.")] = "default",
    base_model: Annotated[
        str, typer.Option(help="Base model: a bundled name or an HF model dir the server may load.")
    ] = "smollm2-135m-instruct",
    evaluate: Annotated[
        str | None,
        typer.Option(
            "--eval",
            help="Promotion gate: module:function, an `async def f(name: str) -> float` importable from the "
            "working directory that scores a served name (name@step); without it (or --golden-set) every "
            "step is promoted.",
        ),
    ] = None,
    **given: Any,
) -> None:
    """Keep training a served model on its recorded, rated traffic (feedback sent to /v1/feedback), until
    Ctrl-C or a limit. Every other option is a field of advantage.OnlineConfig; --train takes TrainConfig's
    fields as JSON, e.g. '{"learning_rate": 5e-5, "kl_beta": 0.05}'."""
    import asyncio
    import json

    from advantage.config import OnlineConfig
    from advantage.online.trainer import check_gate, load_evaluate, run_online

    fields = dict(given)
    if fields.get("train") is not None:
        try:
            fields["train"] = json.loads(fields["train"])
        except ValueError as e:
            raise typer.BadParameter(f"not JSON: {e}", param_hint="--train") from None
    cfg = _config(OnlineConfig, fields)
    try:
        evaluate_fn = load_evaluate(evaluate) if evaluate is not None else None
        check_gate(cfg, evaluate_fn)
    except (ValueError, ImportError) as e:
        raise typer.BadParameter(str(e)) from None
    result = asyncio.run(
        run_online(
            server,
            model,
            api_key=api_key,
            project=project,
            base_model=base_model,
            config=cfg,
            evaluate=evaluate_fn,
        )
    )
    if result.golden_choices:
        typer.echo(
            f"golden set: {result.golden_choices} choices, {result.golden_tokens} tokens; the score is their "
            "mean logprob per token"
        )
    for s in result.steps:
        verdict = "promoted" if s.promoted else "rejected"
        score = "" if s.score is None else f", score {s.score:.4f} (default {s.default_score:.4f})"
        typer.echo(f"{model}@{s.step}: {verdict}, {s.groups} groups ({s.replay_groups} replayed){score}")
    typer.echo(
        f"stopped ({result.stopped}): {len(result.steps)} steps, {len(result.rejected)} rejected, "
        f"{result.stale} stale choices; {model} serves step {result.default}"
    )
    if cfg.judge_model is not None:
        j = result.judge
        typer.echo(
            f"judge {cfg.judge_model}: {j.scored} requests scored, {j.failed} failed verdicts, unreachable "
            f"{j.unreachable} times; {result.zero_variance} tied groups skipped"
        )


# The reward's range, where the task knows it: `fit` and `report` bound the ScaleRL ceiling A by it.
MinReward = Annotated[
    float | None, typer.Option(help="The least reward the task can give (floors the ceiling A).")
]
MaxReward = Annotated[
    float | None, typer.Option(help="The most reward the task can give (caps the ceiling A).")
]


@app.command()
def fit(
    run_dir: Annotated[Path, typer.Argument(help="A run dir holding metrics.jsonl.")],
    metric: Annotated[str, typer.Option(help="Metric to fit.")] = "train/reward",
    axis: Annotated[str, typer.Option(help="Compute axis: step, seconds or tokens.")] = "step",
    skip_frac: Annotated[float, typer.Option(help="Fraction of the earliest points to drop.")] = 0.0,
    min_reward: MinReward = None,
    max_reward: MaxReward = None,
) -> None:
    """Fit the ScaleRL curve to a run and predict its reward ceiling, or say that the reward is not rising."""
    from advantage.scaling import fit_run

    try:
        result = fit_run(
            run_dir, metric=metric, axis=axis, skip_frac=skip_frac, a_min=min_reward, a_max=max_reward
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    typer.echo(result.summary(result.c_max))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run dir holding metrics.jsonl and trajectories/.")],
    out: Annotated[
        Path | None, typer.Option(help="Where to write the HTML.", show_default="RUN_DIR/report.html")
    ] = None,
    open_: Annotated[bool, typer.Option("--open", help="Open the report in a web browser.")] = False,
    max_steps: Annotated[int, typer.Option(help="Most steps of trajectories kept per split.")] = 50,
    min_reward: MinReward = None,
    max_reward: MaxReward = None,
) -> None:
    """Write one self-contained HTML report of a run: curves, the ceiling fit, and a trajectory viewer."""
    from advantage.report import write_report

    try:
        path = write_report(run_dir, out, max_steps=max_steps, reward_range=(min_reward, max_reward))
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="RUN_DIR") from None
    typer.echo(path)
    if open_:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


@app.command()
def export(
    checkpoint: Annotated[
        str,
        typer.Argument(
            metavar="NAME@STEP",
            help="The checkpoint: NAME@STEP, NAME (its latest step) or PROJECT/NAME@STEP.",
        ),
    ],
    out: Annotated[Path, typer.Option(help="Directory to write; it must not exist yet, or be empty.")],
    project: Annotated[str, typer.Option(help="Project of NAME.")] = "default",
    root: Annotated[Path, typer.Option(help="Checkpoint root.")] = Path(".advantage"),
    merged: Annotated[
        bool, typer.Option("--merged", help="A full Hugging Face model with the LoRA merged into the base.")
    ] = False,
) -> None:
    """Export a checkpoint: its PEFT adapter, or with --merged a full Hugging Face model directory."""
    from advantage.export import export_checkpoint

    try:
        path = export_checkpoint(checkpoint, out, root=root, project=project, merged=merged)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    typer.echo(path)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmark any model on a task's test set.")
app.add_typer(bench_app, name="bench")


@bench_app.command("email")
def bench_email(
    model: Annotated[
        list[str], typer.Option(help="NAME (bundled/HF dir), NAME@STEP (trained), URL#MODEL or URL; repeat.")
    ],
    limit: Annotated[int, typer.Option(help="Test questions to run (0: all).")] = 20,
    model_name: Annotated[str | None, typer.Option(help="Model name for a URL given without #MODEL.")] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="OPENAI_API_KEY", help="API key for URL models.", show_default=False)
    ] = None,
    root: Annotated[Path, typer.Option(help="Checkpoint root of trained NAME@STEP models.")] = Path(
        ".advantage"
    ),
    base_model: Annotated[
        str, typer.Option(help="Base model of trained NAME@STEP models.")
    ] = "smollm2-135m-instruct",
    max_turns: Annotated[int, typer.Option(help="Model turns per question (at most 10).")] = 10,
    max_tokens: Annotated[int, typer.Option(help="Tokens per model turn.")] = 256,
    concurrency: Annotated[int, typer.Option(help="Questions in flight at once.")] = 8,
    out: Annotated[Path, typer.Option(help="Directory for per-question JSONL and the chart.")] = Path(
        "bench-results"
    ),
    prices: Annotated[
        Path | None, typer.Option(help='JSON {"model": \\[usd_per_1M_in, usd_per_1M_out]}.')
    ] = None,
    judge_url: Annotated[str | None, typer.Option(help="OpenAI-compatible URL of an answer judge.")] = None,
    judge_model: Annotated[str | None, typer.Option(help="Model name of the answer judge.")] = None,
) -> None:
    """Run the email agent (ART-E) test set with one or more models; print the comparison table.

    Config and documentation: src/advantage/tasks/email_agent/bench.py:BenchConfig."""
    from advantage.tasks.email_agent import bench

    given = {k: v for k, v in locals().items() if k not in ("bench", "model", "limit")}
    bench.main(bench.BenchConfig(models=model, limit=limit or None, **given))


@app.command()
def convert(
    base_model: Annotated[str, typer.Argument(help="Bundled model name.")] = "smollm2-135m-instruct",
) -> None:
    """Convert a bundled GGUF model to a cached safetensors HF dir (done automatically on first use)."""
    from advantage.engine.models import resolve_model_path

    typer.echo(resolve_model_path(base_model))


if __name__ == "__main__":
    app()
