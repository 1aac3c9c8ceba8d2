"""Subcommands of the ``gptfast`` command line; see :mod:`gptfast.cli`."""
