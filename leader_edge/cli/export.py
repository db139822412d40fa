"""`leader-edge export` (not built yet: see the open issue that owns it)."""

import click


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def export() -> None:
    """Not built yet."""
    raise click.ClickException("`leader-edge export` is not built yet; its issue is open")
