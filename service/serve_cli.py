"""Placeholder: subcommands land here."""

def serve() -> None:
    """Not built yet."""
    raise SystemExit("not built yet")


