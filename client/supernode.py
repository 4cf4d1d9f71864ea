"""`fedge supernode`: Flower's SuperNode, its own entry point, arguments and process, with shorter pauses.

Flower 1.39's `flower-supernode` sleeps 3 s after each empty ask for a message,
so every wave of a round (training, then evaluation) reaches a node that just
answered the previous one seconds late; `fedge.flower_pauses` says which pauses
are shortened and how. Everything else is Flower's: the same SuperNode talks to
the same SuperLink over the same Fleet API.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


#: seconds a stopping SuperNode may take before it is ended regardless (see `run_supernode`)
EXIT_DEADLINE_S = 15.0


def run_supernode(flower_args: Sequence[str], min_pause: float = 0.1, reply_pause: float = 0.05) -> None:
    """`flower-supernode FLOWER_ARGS`, with the shorter pauses, and an exit that always ends.

    A SuperNode told to stop (SIGTERM, Ctrl-C) was seen to hang for good in a gRPC channel's finalizer during the
    interpreter's last garbage collection, a deadlock of grpcio's (its channel lock taken twice) that Flower's own
    force-exit thread cannot break, since no Python thread runs at that point. So stopping also arms faulthandler's
    C-level timer: a process still alive `EXIT_DEADLINE_S` later prints its threads' stacks and exits.
    """
    import faulthandler

    import flwr.supernode.start_client_internal as loop
    from flwr.supercore.exit.exit_handler import add_exit_handler
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from fedge.flower_pauses import shorten_supernode_pauses

    shorten_supernode_pauses(loop, min_pause, reply_pause)
    add_exit_handler(lambda: faulthandler.dump_traceback_later(EXIT_DEADLINE_S, exit=True), run_before_force_exit=True)
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
