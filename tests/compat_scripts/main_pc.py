"""An iblrig-style main PC, written for iblutil 1.20.0 (not for trio-rignet).

Modelled on ``iblrig.net.Auxiliaries``: a network thread runs its own asyncio
loop (``threading.Thread(target=asyncio.run, ...)``), opens a client
communicator per remote rig, wraps them in ``Services`` and sends the signals
queued by the synchronous task code; ``push(..., wait=True)`` blocks until the
rigs' responses (or the exception) are logged. The tests load this file twice:
as written, on iblutil, and with its one import line changed to
``from trio_rignet.compat import iblutil as net``.
"""

import asyncio
import threading
import time

from iblutil.io import net


class Auxiliaries:
    """Connect to and communicate with one or more remote rigs synchronously."""

    refresh_rate = 0.005
    """How long to wait between checking the message queue (seconds)."""

    def __init__(self, clients, timeout=10):
        self._clients = clients
        self.timeout = timeout
        self.services = None
        self._queued = {}
        self._log = {}
        self.started = []
        self.response_received = threading.Condition()
        self.connected = threading.Event()
        self.stop_event = threading.Event()
        self.error = None
        self.thread = threading.Thread(
            target=asyncio.run, args=(self.listen(),), name="network_coms"
        )
        self.thread.start()

    @property
    def is_connected(self):
        return any(self.services or []) and self.services.is_connected

    async def create(self):
        remote_rigs = [
            await net.app.EchoProtocol.client(uri, name) for name, uri in self._clients.items()
        ]
        self.services = net.app.Services(remote_rigs, timeout=self.timeout)
        # Assign a callback to all clients
        self.services.assign_callback("EXPSTART", lambda _, addr: self.started.append(addr))

    async def listen(self):
        try:
            await self.create()
        except Exception as ex:
            self.error = ex
            raise
        finally:
            self.connected.set()
        while not self.stop_event.is_set():
            if any(queue := sorted(self._queued)):
                request_time = queue[0]
                event, args, kwargs = self._queued[request_time]
                try:
                    match event:
                        case net.base.ExpMessage.EXPINIT:
                            responses = await self.services.init(*args, **kwargs)
                        case net.base.ExpMessage.EXPSTART:
                            responses = await self.services.start(*args, **kwargs)
                        case net.base.ExpMessage.EXPEND | net.base.ExpMessage.EXPINTERRUPT:
                            immediately = event is net.base.ExpMessage.EXPINTERRUPT
                            responses = await self.services.stop(
                                *args, immediately=immediately, **kwargs
                            )
                        case net.base.ExpMessage.EXPCLEANUP:
                            responses = await self.services.cleanup(*args, **kwargs)
                        case net.base.ExpMessage.EXPSTATUS:
                            responses = await self.services.status(*args, **kwargs)
                        case net.base.ExpMessage.EXPINFO:
                            responses = await self.services.info(*args, **kwargs)
                        case net.base.ExpMessage.ALYX:
                            responses = await self.services.alyx(*args)
                        case _:
                            responses = NotImplementedError(event)
                except asyncio.TimeoutError as ex:
                    responses = ex
                with self.response_received:
                    self._log[request_time] = responses
                    del self._queued[request_time]
                    self.response_received.notify()
            if not self.stop_event.is_set():
                await asyncio.sleep(self.refresh_rate)
        self.services.close()

    def push(self, message, *args, wait=False, **kwargs):
        """Queue a message for the network thread; with ``wait``, return the responses."""
        request_time = time.time()
        message = net.base.ExpMessage.validate(message, allow_bitwise=False)
        thread_timeout = self.services.timeout * 2 + 1
        with self.response_received:
            self._queued[request_time] = [message, args, kwargs]
            if not wait:
                return request_time
            if not self.response_received.wait_for(
                lambda: request_time in self._log, timeout=thread_timeout
            ):
                raise RuntimeError("Thread failed to return")
            return self._log[request_time]

    def close(self):
        """Close communicators and wait for thread to terminate."""
        self._queued.clear()
        self.stop_event.set()
        self.thread.join(timeout=5)


class Alyx:
    """A logged-in stand-in for ``one.webclient.AlyxClient``."""

    base_url = "https://alyx.example.org"
    user = "experimenter"
    _token = "token-0123"
    is_logged_in = True


def run_experiment(rigs, exp_ref, timeout=10):
    """Run one experiment on ``rigs`` ({name: uri}); return what each signal returned."""
    aux = Auxiliaries(rigs, timeout=timeout)
    results = {}
    try:
        assert aux.connected.wait(10), "network thread did not start"
        if aux.error:
            raise aux.error
        assert aux.is_connected
        results["alyx"] = aux.push("ALYX", Alyx(), wait=True)
        results["init"] = aux.push("EXPINIT", {"exp_ref": exp_ref}, wait=True)
        results["status"] = aux.push("EXPSTATUS", net.base.ExpStatus.INITIALIZED, wait=True)
        results["start"] = aux.push("EXPSTART", exp_ref, {"protocol": "training"}, wait=True)
        results["info"] = aux.push("EXPINFO", "RUNNING", {"trials": 10}, wait=True)
        results["stop"] = aux.push("EXPEND", {"trials": 42}, wait=True)
        results["cleanup"] = aux.push("EXPCLEANUP", wait=True)
        results["started"] = sorted(tuple(a) for a in aux.started)
    finally:
        aux.close()
    assert not aux.thread.is_alive()
    return results
