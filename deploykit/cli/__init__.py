"""The ``deploykit`` command. Each subcommand lives in its own module with ``register`` and ``run``."""
