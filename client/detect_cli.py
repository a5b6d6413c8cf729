"""Placeholder: subcommands land here."""


def detect() -> None:
    """Not built yet."""
    raise SystemExit("not built yet")
