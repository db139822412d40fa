"""`leader-edge predict` (not built yet: see the open issue that owns it)."""

import click


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def predict() -> None:
    """Not built yet."""
    raise click.ClickException("`leader-edge predict` is not built yet; its issue is open")
