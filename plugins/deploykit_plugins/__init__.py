"""deploykit's built-in backends, one module per backend.

Each module is registered through the ``deploykit.backends`` entry-point group in pyproject.toml, exactly
as a third-party plugin package would register its own; the core never imports these modules directly.
Backends import the core (``deploykit.deploy.backend``, ``deploykit.deploy.runtime``...), never each other.
"""
