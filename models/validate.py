"""The one validation helper the config dataclasses share."""


def check(ok: bool, message: str) -> None:
    """Raise ValueError(message) unless `ok`; messages start with the offending field's name."""
    if not ok:
        raise ValueError(message)
