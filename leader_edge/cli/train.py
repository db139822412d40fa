"""`leader-edge train` (not built yet: see the open issue that owns it)."""

import click


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def train() -> None:
    """Not built yet."""
    raise click.ClickException("`leader-edge train` is not built yet; its issue is open")
