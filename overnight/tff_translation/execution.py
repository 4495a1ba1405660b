"""Where the translation runs TFF computations: an execution context of its own, whose
`worker_binary` is stopped before the translation returns.

Reading an adaptive or fixed-norm factory runs a few of its computations (a norm estimator's
initial state and report). TFF runs every computation in a `worker_binary` child process, which
its default context starts on first use and stops only when the context's manager is garbage
collected: interpreter exit does not guarantee that, and the SIGINT it sends is ignored by a
script run as a background job (its worker inherits the ignored signal). A user's script that
passed such a factory to `create_task` was left with a worker running after it exited, holding
the terminal's output open. So the translation installs a context of its own for its
computations and stops that context's worker with SIGKILL when it is done; the user's default
context, and any worker it runs for their own simulations, are left alone.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from typing import Any

import tensorflow_federated as tff


@contextlib.contextmanager
def translation_context() -> Iterator[None]:
    """TFF computations invoked inside the block run in a fresh local context, which is torn
    down on leaving: its worker (if a computation started one) killed and reaped, the channel
    to it closed, its event-loop thread stopped."""
    context = tff.backends.native.create_sync_local_cpp_execution_context()
    try:
        with tff.framework.get_context_stack().install(context):
            yield
    finally:
        _tear_down(context)


def _tear_down(context: Any) -> None:
    # TFF 0.87 (its final release) keeps the worker's Popen and the stub in the ServiceManager
    # the context's executor factory closes over, and the context's thread in an
    # AsyncThreadRunner that only its garbage collection stops, which its own thread prevents.
    # There is no public way to stop either.
    stack_fn = context.executor_factory._executor_stack_fn
    cell = stack_fn.__closure__[stack_fn.__code__.co_freevars.index("service_manager")]
    manager = cell.cell_contents
    process, stub = manager._process, manager._stub
    # Forgotten first, so the manager's own clean-up has nothing left to signal.
    manager._process, manager._stub = None, None
    if isinstance(process, subprocess.Popen):
        process.kill()
        process.wait()
    if stub is not None:
        stub._channel.close()
    runner = context._async_runner
    runner._finalizer(runner._event_loop, runner._thread)
