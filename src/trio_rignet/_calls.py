"""Signal many peers and collect their completion updates, in one task.

The state machine of one call (per endpoint): the signal is sent, its echo
is awaited (retransmitted in reliable mode), then the completion update is
awaited. Many calls run together in the caller's task: every send and every
subscription wakes the caller through a notifier that queues its call, and
one cancel scope, re-armed at the earliest deadline, bounds the wait. No task
and no cancel scope per peer: a Services signal to 128 rigs costs one task
switch per batch of arrivals, not two per rig.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from ._core import EchoCore, Outcome, Send
from ._errors import (
    CompletionTimeout,
    EchoTimeout,
    EndpointClosed,
    PeerUnavailable,
    RemoteError,
    RignetError,
)
from ._events import Events, Subscription
from ._messages import ExpMessage, Message
from ._transport import Transport, clock

__all__ = ["Call", "result_of", "run_calls"]

_ECHO = 0  # waiting for the echo of the signal
_COMPLETION = 1  # waiting for the completion update
_DONE = 2


class _Box:
    """What wakes the caller: calls with news, and an event."""

    __slots__ = ("event", "ready")

    def __init__(self) -> None:
        self.ready: deque[Call] = deque()
        self.event = anyio.Event()


class Call:
    """One signal to one peer and its completion: build it with
    :meth:`EchoProtocol.new_call <trio_rignet.EchoProtocol.new_call>`, run it
    with :func:`run_calls`.

    After :func:`run_calls`, ``result`` is the completion
    :class:`~trio_rignet.Message` or the exception that ended the call
    (:func:`result_of` returns the one or raises the other). The call is also
    its own notifier (:meth:`set`), which its send and subscription wake.
    """

    __slots__ = (
        "_box",
        "_core",
        "_events",
        "_queued",
        "_retransmit",
        "_transport",
        "code",
        "completion_timeout",
        "deadline",
        "echo_timeout",
        "index",
        "name",
        "payload",
        "result",
        "send",
        "stage",
        "sub",
        "target",
    )

    def __init__(
        self,
        name: str,
        parts: tuple[EchoCore, Events, Transport, Callable[[bytes, tuple[str, int]], Any]],
        target: tuple[str, int],
        payload: bytes,
        code: int,
        echo_timeout: float,
        completion_timeout: float | None,
    ) -> None:
        self.name = name
        self._core, self._events, self._transport, self._retransmit = parts
        self.target = target
        self.payload = payload
        self.code = code
        self.echo_timeout = echo_timeout
        self.completion_timeout = completion_timeout
        self.stage = _ECHO
        self.deadline = math.inf
        self.send: Send | None = None
        self.sub: Subscription | None = None
        self.result: Message | BaseException | None = None
        self._box: _Box | None = None
        self._queued = False
        self.index = 0

    def set(self) -> None:
        """Notifier: the send ended or a reply arrived; let the caller look."""
        box = self._box
        if box is not None and not self._queued:
            self._queued = True
            box.ready.append(self)
            box.event.set()

    # ------------------------------------------------------------- transitions

    def _start(self, box: _Box, now: float) -> None:
        self._box = box
        try:
            self.sub = self._events.subscribe((self.code, 0), self.target, notify=self)
            send = self._core.open_send(self.target, self.payload, now, self.echo_timeout)
            self.send = send
            send.waiter = self
            self._transport.transmit(send.wire, self.target, send)
        except (RignetError, OSError) as exc:
            if self.send is not None:
                self._core.end(self.send, Outcome.UNAVAILABLE)
            self._end(exc)
            return
        self.deadline = send.wake_at
        if send.outcome is not Outcome.PENDING:  # refused at once (ICMP unreachable)
            self.set()

    def _end(self, result: Message | BaseException) -> None:
        self.stage = _DONE
        self.result = result
        self.deadline = math.inf
        self._box = None  # no more news: closing the subscription below must not queue it
        if self.sub is not None:
            self.sub.close()

    def _update(self, now: float) -> None:
        """News arrived: move on if the echo came, or take the completion."""
        self._queued = False
        if self.stage == _ECHO:
            send = self.send
            assert send is not None
            outcome = send.outcome
            if outcome is Outcome.PENDING:
                return
            if outcome is not Outcome.CONFIRMED:
                self._end(self._send_error(send))
                return
            self.stage = _COMPLETION
            timeout = self.completion_timeout
            self.deadline = math.inf if timeout is None else now + timeout
        if self.stage == _COMPLETION:
            self._take_completion()

    def _take_completion(self) -> None:
        sub = self.sub
        send = self.send
        assert sub is not None
        assert send is not None
        while True:
            try:
                msg = sub.receive_nowait()
            except (anyio.WouldBlock, EndpointClosed):
                if sub.closed:
                    self._end(EndpointClosed(f"{self.name}: endpoint closed"))
                return
            tag = msg.tag
            if tag is not None and tag[2] is not None and tag[2] != send.seq:
                continue  # the answer to another call
            if msg.event:
                self._end(msg)
                return
            text, failed = msg.data
            if failed == self.code:
                self._end(RemoteError(msg.addr, text, ExpMessage(self.code)))
                return

    def _timer(self, now: float) -> None:
        """The deadline passed: retransmit, or end with a timeout."""
        if self.stage == _ECHO:
            send = self.send
            assert send is not None
            resend = self._core.on_timer(send, now)
            if resend is not None:
                self._retransmit(resend, self.target)
            if send.outcome is Outcome.PENDING:
                self.deadline = send.wake_at
            else:
                self._update(now)
        elif self.stage == _COMPLETION:
            assert self.completion_timeout is not None
            self._end(CompletionTimeout(self.name, ExpMessage(self.code), self.completion_timeout))

    def _send_error(self, send: Send) -> BaseException:
        if send.outcome is Outcome.TIMED_OUT:
            self._transport.abandon(send)
            return EchoTimeout(self.name, self.target, self.echo_timeout)
        if send.outcome is Outcome.UNAVAILABLE:
            return PeerUnavailable(
                self.target, send.reason or "the peer is unreachable or disconnected"
            )
        return EndpointClosed(f"{self.name}: endpoint closed")

    def _abandon(self) -> None:
        """The caller was cancelled: end the send, unregister the wait."""
        self._box = None
        send = self.send
        if send is not None and self._core.end(send, Outcome.CANCELLED):
            self._transport.abandon(send)
        if self.sub is not None:
            self.sub.close()
        self.stage = _DONE


async def run_calls(calls: Sequence[Call]) -> None:
    """Run every call to its end, together, in this task; results in ``call.result``.

    Every wait is registered and every signal written before the first
    checkpoint, so no reply can be missed and every peer is signalled at once.

    Cancellation: every unfinished call is abandoned (its send ended, its wait
    unregistered); a peer may have received the signal.
    """
    box = _Box()
    now_ = clock()
    now = now_()
    heap: list[tuple[float, int]] = []
    for i, call in enumerate(calls):
        call.index = i
        call._start(box, now)
        if call.stage != _DONE:
            heapq.heappush(heap, (call.deadline, i))
    left = sum(call.stage != _DONE for call in calls)
    try:
        while left:
            # One scope, re-armed at the earliest deadline; a new one only when a
            # deadline passes (rare), not per wake-up.
            with anyio.CancelScope() as scope:
                while left:
                    while heap and calls[heap[0][1]].deadline != heap[0][0]:
                        heapq.heappop(heap)  # stale: that call moved on
                    scope.deadline = heap[0][0] if heap else math.inf
                    if not box.ready:
                        if box.event.is_set():
                            box.event = anyio.Event()
                        await box.event.wait()
                    now = now_()
                    while box.ready:
                        call = box.ready.popleft()
                        if call.stage == _DONE:
                            continue
                        before = call.deadline
                        call._update(now)
                        if call.stage == _DONE:
                            left -= 1
                        elif call.deadline != before:
                            heapq.heappush(heap, (call.deadline, call.index))
            if scope.cancelled_caught:
                now = now_()
                while heap and heap[0][0] <= now:
                    when, i = heapq.heappop(heap)
                    call = calls[i]
                    if call.deadline != when or call.stage == _DONE:
                        continue
                    call._timer(now)
                    if call.stage == _DONE:
                        left -= 1
                    else:
                        heapq.heappush(heap, (call.deadline, i))
    finally:
        for call in calls:
            if call.stage != _DONE:
                call._abandon()


def result_of(call: Call) -> Message:
    """The completion of a finished call, or raise what ended it."""
    result = call.result
    if isinstance(result, BaseException):
        raise result
    assert result is not None
    return result
