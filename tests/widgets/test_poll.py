"""The comm poller against a kernel-shaped stand-in: real zmq sockets, real Jupyter messages.

The live kernel case is tests/browser/test_jupyterlab.py and tests/widgets/test_kernels.py.
"""

from __future__ import annotations

import asyncio
import threading
import types
from collections.abc import Iterator

import IPython
import pytest
import zmq
from jupyter_client.session import Session

import emdsl as em
from emdsl.widgets import _poll
from emdsl.widgets._poll import CommPoller


class FakeKernel:
    """The pieces of an ipykernel >= 7.1 the poller touches, wired to a real inproc socket pair."""

    def __init__(self, context: zmq.Context, name: str) -> None:
        self.session = Session(key=b"test-key")
        self.sender = context.socket(zmq.PAIR)  # the shell channel thread's end
        receiver = context.socket(zmq.PAIR)  # the main thread's end
        self.sender.bind(f"inproc://{name}")
        receiver.connect(f"inproc://{name}")
        self.comms: list[dict] = []  # comm_msg handled, in order
        self.received: list[str] = []  # messages handed back to the kernel, by msg_type
        stream = types.SimpleNamespace(_recv_callback=self._receive)
        pair = types.SimpleNamespace(to_socket=receiver, to_stream=stream)
        self.shell_channel_thread = types.SimpleNamespace(
            parent_thread=threading.current_thread(),
            manager=types.SimpleNamespace(_shell_channel_to_main=pair))
        self.comm_manager = types.SimpleNamespace(comm_msg=self._comm_msg)
        self.sockets = (self.sender, receiver)

    def send(self, msg_type: str, content: dict) -> None:
        self.session.send(self.sender, msg_type, content, ident=[b"frontend"])

    def _comm_msg(self, stream, idents, msg) -> None:
        self.comms.append(msg["content"])

    def _receive(self, frames) -> None:
        _, parts = self.session.feed_identities(frames, copy=False)
        self.received.append(self.session.deserialize(parts, content=False, copy=False)["header"]["msg_type"])


@pytest.fixture
def kernel(monkeypatch, request) -> Iterator[FakeKernel]:
    context = zmq.Context.instance()
    fake = FakeKernel(context, f"emdsl-test-{request.node.name}")
    hooks: list = []
    shell = types.SimpleNamespace(kernel=fake, config={"IPKernelApp": {}},
                                  events=types.SimpleNamespace(register=lambda name, f: hooks.append((name, f))))
    fake.end_of_cell_hooks = hooks
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    monkeypatch.setattr(_poll, "_guarded_shells", set())
    yield fake
    _poll._end_of_cell()
    for socket in fake.sockets:
        socket.close(linger=0)


def wait_for_delivery(kernel: FakeKernel) -> None:
    """inproc delivery is immediate; make it explicit (bounded wait for the first message)."""
    receiver = kernel.sockets[1]
    assert receiver.poll(5000), "no message arrived"


def test_outside_a_kernel_nothing_happens() -> None:
    poller = CommPoller()
    assert not poller.start() and not poller.active
    assert poller.poll() == 0
    poller.stop()


def test_unknown_kernel_layout_means_no_polling(monkeypatch) -> None:
    old_style = types.SimpleNamespace(kernel=types.SimpleNamespace(session=object()), config={})
    monkeypatch.setattr(IPython, "get_ipython", lambda: old_style)
    poller = CommPoller()
    assert not poller.start()
    assert poller.poll() == 0


def test_comm_messages_are_handled_and_others_held_in_order(kernel) -> None:
    kernel.send("comm_msg", {"comm_id": "a", "data": {"n": 1}})
    kernel.send("execute_request", {"code": "1"})
    kernel.send("comm_msg", {"comm_id": "a", "data": {"n": 2}})
    kernel.send("complete_request", {"code": "x", "cursor_pos": 1})
    wait_for_delivery(kernel)
    poller = CommPoller(interval=0)
    assert poller.start()
    assert poller.poll() == 2
    assert [c["data"]["n"] for c in kernel.comms] == [1, 2]
    assert kernel.received == []  # held while the fit runs
    poller.stop()
    assert kernel.received == ["execute_request", "complete_request"]


def test_polling_is_throttled(kernel) -> None:
    poller = CommPoller(interval=3600)
    poller.start()
    kernel.send("comm_msg", {"comm_id": "a", "data": {}})
    wait_for_delivery(kernel)
    assert poller.poll() == 1
    kernel.send("comm_msg", {"comm_id": "a", "data": {}})
    assert poller.poll() == 0  # within the interval: the socket is not even looked at
    poller.stop()


def test_other_threads_do_not_poll(kernel) -> None:
    started = []
    thread = threading.Thread(target=lambda: started.append(CommPoller().start()))
    thread.start()
    thread.join()
    assert started == [False]


def test_held_messages_come_back_at_the_end_of_the_cell_if_the_fit_raised(kernel) -> None:
    poller = CommPoller(interval=0)
    poller.start()
    kernel.send("execute_request", {"code": "next cell"})
    wait_for_delivery(kernel)
    poller.poll()
    assert kernel.received == []
    (name, hook), = kernel.end_of_cell_hooks
    assert name == "post_run_cell"
    hook(None)  # IPython calls it when the cell ends, whatever happened in it
    assert kernel.received == ["execute_request"]


def test_two_pollers_hand_back_once_both_stop(kernel) -> None:
    first, second = CommPoller(interval=0), CommPoller(interval=0)
    first.start()
    second.start()
    kernel.send("execute_request", {"code": "1"})
    wait_for_delivery(kernel)
    first.poll()
    first.stop()
    assert kernel.received == []
    second.stop()
    assert kernel.received == ["execute_request"]


def test_coroutine_callbacks_are_scheduled_in_order(kernel) -> None:
    order: list[str] = []

    async def receive(frames) -> None:
        _, parts = kernel.session.feed_identities(frames, copy=False)
        order.append(kernel.session.deserialize(parts, content=True, copy=False)["content"]["code"])

    kernel.shell_channel_thread.manager._shell_channel_to_main.to_stream._recv_callback = receive

    async def cell() -> None:
        poller = CommPoller(interval=0)
        poller.start()
        for code in ("a", "b", "c"):
            kernel.send("execute_request", {"code": code})
        wait_for_delivery(kernel)
        poller.poll()
        poller.stop()
        assert order == []  # queued as tasks, run after the current one yields
        await asyncio.sleep(0.01)

    asyncio.run(cell())
    assert order == ["a", "b", "c"]


def test_a_click_message_stops_the_fit(kernel, faithful) -> None:
    """The whole path: a comm_msg 'click' waiting on the socket stops the fit at the next poll."""
    monitor = em.widgets.ConvergenceMonitor(poll_interval=0)
    kernel.comm_manager.comm_msg = lambda stream, idents, msg: monitor.stop_button._handle_msg(msg)

    def frontend_clicks(event: em.IterationEvent) -> None:
        if event.iteration == 3:
            kernel.send("comm_msg", {"comm_id": monitor.stop_button.model_id,
                                     "data": {"method": "custom", "content": {"event": "click"}}})
            kernel.send("execute_request", {"code": "next cell"})
            wait_for_delivery(kernel)

    model = em.Model().latent("z", em.Categorical(2)).observe(["eruptions", "waiting"], em.MultivariateNormal)
    fit = model.fit(faithful, seed=0, max_iter=200, tol=0, callbacks=[frontend_clicks, monitor])
    assert fit.stopped and not fit.converged and fit.n_iter == 3
    assert kernel.received == ["execute_request"]  # handed back after the fit
