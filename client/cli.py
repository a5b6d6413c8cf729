"""Placeholder: subcommands land here."""

def detect() -> None:
    """Not built yet."""
    raise SystemExit("not built yet")


def stream() -> None:
    """Not built yet."""
    raise SystemExit("not built yet")


