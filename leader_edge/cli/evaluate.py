"""`leader-edge evaluate` (not built yet: see the open issue that owns it)."""

import click


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def evaluate() -> None:
    """Not built yet."""
    raise click.ClickException("`leader-edge evaluate` is not built yet; its issue is open")
