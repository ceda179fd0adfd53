"""The controller (operator). Others use ``main`` (run it), ``controller`` (its configuration), ``claims``
(which claims and pods are Partita's) and ``nodefit`` (whether a pod fits a node, for the sandbox's
scheduler stand-in); the rest is its own."""

__all__ = ["capacity", "claims", "controller", "main", "nodefit", "taintrules"]
