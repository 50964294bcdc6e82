"""The ``vidtag`` command line (Typer). Commands are thin: parse, call the library, report.

Heavy imports (torch, transformers) happen inside commands so ``vidtag --help`` stays instant.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="vidtag",
    help="Geolocate every frame of a video: ingest datasets, extract features, predict trajectories.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
ingest_app = typer.Typer(help="Turn a dataset (or a folder / video) into a vidtag manifest.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error for the user and exit non-zero (no traceback)."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


@app.command()
def version() -> None:
    """Print the vidtag version."""
    from vidtag import __version__

    typer.echo(__version__)


# --- ingest commands (vidtag.data) -------------------------------------------------------------

# --- feature extraction (vidtag.features) ------------------------------------------------------

# --- gallery (vidtag.gallery) ------------------------------------------------------------------

# --- predict / evaluate (vidtag.inference) -----------------------------------------------------


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
