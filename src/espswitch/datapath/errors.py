"""Errors of the datapath."""


class PortError(Exception):
    """A port cannot be created as configured; the message is one sentence for a user."""
