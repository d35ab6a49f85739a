"""Errors raised for bad input data, each naming the file, key or option at fault."""


class DataFormatError(ValueError):
    """Input data or a data option is invalid; the message names the file, key or option."""
