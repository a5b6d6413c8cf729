"""Placeholder: subcommands land here."""

def extract() -> None:
    """Not built yet."""
    raise SystemExit("not built yet")


