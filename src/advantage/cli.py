"""The `advantage` command line: thin typer commands over library calls."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Train LLM agents with reinforcement learning."
)


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Interface to bind; keep 127.0.0.1 unless behind a proxy.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7999,
    api_key: Annotated[
        str | None, typer.Option(envvar="ADVANTAGE_API_KEY", help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    base_model: Annotated[
        list[str], typer.Option(help="Base model(s) to load at start: a bundled name or an HF model dir.")
    ] = ["smollm2-135m-instruct"],  # noqa: B006 - typer needs a literal default
    root: Annotated[Path, typer.Option(help="Checkpoint root.")] = Path(".advantage"),
) -> None:
    """Serve base models and trained adapters through an OpenAI-compatible API."""
    from advantage.server.runner import serve_forever
    from advantage.service import Service

    service = Service(root)
    for name in base_model:
        service.engine(name)
    serve_forever(service, host, port, api_key)


def _demo_module():  # the demo is an example (public API only); it lives in the repository, not the package
    import sys

    repo = Path(__file__).resolve().parents[2]
    if not (repo / "examples" / "tool_use" / "train.py").exists():
        raise typer.BadParameter(
            "`advantage demo` runs examples/tool_use; run it from a clone of the repository."
        )
    sys.path.insert(0, str(repo))
    from examples.tool_use import train

    return train


def _help(field: str) -> str:
    f = _demo_module().DemoConfig.model_fields[field]
    return f"{f.description} (default: {f.default})"


@app.command()
def demo(
    steps: Annotated[int | None, typer.Option(help=_help("steps"), show_default=False)] = None,
    name: Annotated[str | None, typer.Option(help=_help("name"), show_default=False)] = None,
    root: Annotated[Path | None, typer.Option(help=_help("root"), show_default=False)] = None,
    learning_rate: Annotated[
        float | None, typer.Option(help=_help("learning_rate"), show_default=False)
    ] = None,
    temperature: Annotated[float | None, typer.Option(help=_help("temperature"), show_default=False)] = None,
    groups_per_step: Annotated[
        int | None, typer.Option(help=_help("groups_per_step"), show_default=False)
    ] = None,
    group_size: Annotated[int | None, typer.Option(help=_help("group_size"), show_default=False)] = None,
    val_size: Annotated[int | None, typer.Option(help=_help("val_size"), show_default=False)] = None,
    eval_every: Annotated[int | None, typer.Option(help=_help("eval_every"), show_default=False)] = None,
) -> None:
    """Train the bundled model on the tool-use demo task on CPU, with a held-out baseline and final eval.

    Defaults (and their documentation) live in examples/tool_use/train.py:DemoConfig."""
    train = _demo_module()
    given = {k: v for k, v in locals().items() if k != "train" and v is not None}
    train.main(train.DemoConfig(**given))


@app.command()
def fit(
    run_dir: Annotated[Path, typer.Argument(help="A run dir holding metrics.jsonl.")],
    metric: Annotated[str, typer.Option(help="Metric to fit.")] = "train/reward",
    axis: Annotated[str, typer.Option(help="Compute axis: step, seconds or tokens.")] = "step",
    skip_frac: Annotated[float, typer.Option(help="Fraction of the earliest points to drop.")] = 0.0,
) -> None:
    """Fit the ScaleRL curve to a run and predict its reward ceiling."""
    from advantage.scaling import fit_run

    result = fit_run(run_dir, metric=metric, axis=axis, skip_frac=skip_frac)
    typer.echo(result.summary(result.c_max))


@app.command()
def convert(
    base_model: Annotated[str, typer.Argument(help="Bundled model name.")] = "smollm2-135m-instruct",
) -> None:
    """Convert a bundled GGUF model to a cached safetensors HF dir (done automatically on first use)."""
    from advantage.engine.models import resolve_model_path

    typer.echo(resolve_model_path(base_model))


if __name__ == "__main__":
    app()
