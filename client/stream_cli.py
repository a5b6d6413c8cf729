"""Placeholder: subcommands land here."""


def stream() -> None:
    """Not built yet."""
    raise SystemExit("not built yet")
