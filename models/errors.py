"""Errors the front ends turn into one clear sentence and exit code 2."""


class ModelError(Exception):
    """A model that cannot be found, fetched, converted or loaded."""
