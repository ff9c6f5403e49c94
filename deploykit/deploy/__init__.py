"""How a model leaves: the backend contract, the plugin hooks and registry, artifacts, convert with its
parity proof, the runtime (``load``), and the plumbing that torch-graph backends share.

Imports ``deploykit.model`` and the foundation modules only; backends (``plugins/``) import this
layer, never the other way round: the registry finds them through entry points.
"""
