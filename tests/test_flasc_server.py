"""FLASC's server round: it steps from the model its clients rebuild from the sparse download."""

from collections import OrderedDict

import numpy as np

from fedge.methods.flasc import FLASC_SGD_LR, FlascStrategy, decode_download


def _strategy(initial: dict[str, np.ndarray], lr: float = 0.0) -> FlascStrategy:
    return FlascStrategy(initial=initial, density_down=0.25, server_opt="sgd", server_lr=lr, max_update_bytes=1 << 20)


def test_a_client_that_reaches_the_optimum_moves_the_global_there() -> None:
    """A client re-learns what the download left out; the server must not add that on top of the dense global."""
    rng = np.random.default_rng(0)
    init = {"a": rng.normal(size=(8, 16)).astype(np.float32), "b": np.zeros((16, 8), np.float32)}
    global_state = OrderedDict((k, v + rng.normal(size=v.shape).astype(np.float32)) for k, v in init.items())
    optimum = OrderedDict((k, v + rng.normal(size=v.shape).astype(np.float32)) for k, v in init.items())
    strategy = _strategy(init, lr=1.0)
    strategy.round_start = global_state
    envelope = strategy.start_round()
    start = decode_download(envelope, init, len(envelope))
    assert any(not np.array_equal(start[k], global_state[k]) for k in init), "the download should be lossy"
    update = OrderedDict((k, optimum[k] - start[k]) for k in init)
    new = strategy.apply(strategy.round_start, update)
    for k in init:
        np.testing.assert_allclose(new[k], optimum[k], atol=1e-5)


def test_sgd_server_step_defaults_to_flasc_lr() -> None:
    init = {"w": np.zeros(4, np.float32)}
    strategy = _strategy(init)
    new = strategy.apply(OrderedDict(init), OrderedDict(w=np.ones(4, np.float32)))
    np.testing.assert_allclose(new["w"], FLASC_SGD_LR)
