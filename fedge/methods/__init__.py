"""The federation methods, one module or folder each, found by name.

A method is one `Method` (payload, client handlers, server strategy, its own
run-config section) registered with `register_method`; `resolve` turns a run
config into settings, method and options. Third-party methods register the
same way, from a module named in FEDGE_PLUGINS or the `fedge.methods`
entry-point group.
"""

from fedge.methods import compressed, flasc, pfedgate, plain  # noqa: F401  (register the built-in methods)
from fedge.methods.base import (
    METHODS,
    Job,
    Method,
    RunSpec,
    available_methods,
    evaluate_global,
    get_method,
    receive_arrays,
    register_method,
    resolve,
    sampling,
)

__all__ = ["METHODS", "Job", "Method", "RunSpec", "available_methods", "evaluate_global", "get_method",
           "receive_arrays", "register_method", "resolve", "sampling"]
