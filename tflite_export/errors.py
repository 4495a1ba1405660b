"""Errors the exporter raises at its boundary."""


class ExportError(ValueError):
    """The Keras model, loss or optimizer cannot be exported; the message says what and why."""
