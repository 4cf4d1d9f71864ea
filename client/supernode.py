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


def run_supernode(flower_args: Sequence[str], min_pause: float = 0.1, reply_pause: float = 0.05) -> None:
    """`flower-supernode FLOWER_ARGS`, with the shorter pauses."""
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from fedge.flower_pauses import shorten_supernode_pauses

    shorten_supernode_pauses(loop, min_pause, reply_pause)
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
