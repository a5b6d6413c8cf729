"""Placeholder: subcommands land here."""

def evaluate() -> None:
    """Not built yet."""
    raise SystemExit("not built yet")


def export() -> None:
    """Not built yet."""
    raise SystemExit("not built yet")


def synth() -> None:
    """Not built yet."""
    raise SystemExit("not built yet")


def train() -> None:
    """Not built yet."""
    raise SystemExit("not built yet")


