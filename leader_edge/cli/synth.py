"""`leader-edge synth` (not built yet: see the open issue that owns it)."""

import click


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def synth() -> None:
    """Not built yet."""
    raise click.ClickException("`leader-edge synth` is not built yet; its issue is open")
