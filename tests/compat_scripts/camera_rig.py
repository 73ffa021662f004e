"""An iblrig-style camera rig, written for iblutil 1.20.0 (not for trio-rignet).

Modelled on ``iblrig.video.CameraSessionNetworked``: a server communicator
listens for the behaviour rig; the main loop keeps one task awaiting
``on_event(ExpMessage.any())`` (re-created after each message), dispatches each
message to an ``on_<event>`` method that does the work and sends the same event
back (the completion update ``Services`` waits for), and ends when the
communicator is closed. The tests load this file twice: as written, on
iblutil, and with its one import line changed to
``from trio_rignet.compat import iblutil as net``.
"""

import asyncio

from iblutil.io import net


class CameraSessionNetworked:
    """A camera session that listens for run commands from a remote computer."""

    def __init__(self, name="cameras"):
        self.name = name
        self.communicator = None
        self._status = None
        self._async_tasks = set()
        self.exp_ref = None
        self.token = None
        self.received = []

    @property
    def status(self):
        return self._status

    @property
    def is_connected(self):
        """True until the communicator is closed.

        (iblrig tests ``communicator.is_connected``, which iblutil's TCP server
        only reports once a client has connected.)
        """
        return bool(self.communicator and not self.communicator.on_connection_lost.done())

    @property
    def is_listening(self):
        return self.communicator is not None

    async def listen(self, service_uri):
        self.communicator = await net.app.EchoProtocol.server(service_uri, name=self.name)
        self._status = net.base.ExpStatus.CONNECTED

    async def run(self, service_uri=None):
        """Main loop networked with behaviour rig."""
        if not self.is_connected:
            await self.listen(service_uri)
        while self.is_connected:
            # Ensure we are awaiting a message from the remote rig.
            # This task must be re-added each time a message is received.
            if not any(t.get_name() == "remote" for t in self._async_tasks):
                task = asyncio.create_task(
                    self.communicator.on_event(net.base.ExpMessage.any()), name="remote"
                )
                self._async_tasks.add(task)
            done, _ = await asyncio.wait(
                self._async_tasks, timeout=None, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                self._async_tasks.remove(task)
                if task.cancelled():
                    break  # remote communicator closed
                await self._process_message(*task.result())
        self.close()

    def close(self):
        """End experiment and cleanup object."""
        for task in self._async_tasks:
            task.cancel()
        self._async_tasks.clear()
        if self.communicator:
            self.communicator.close()

    async def _process_message(self, data, addr, event):
        """Callback for all messages received during the main loop."""
        name = event.name.lower()
        if name.startswith("exp"):
            name = name[3:]
        self.received.append(name)
        fcn = getattr(self, "on_" + name, None)
        assert callable(fcn)
        await fcn(data, addr)

    def _info(self):
        return {"exp_ref": self.exp_ref, "status": self.status, "rig": self.name}

    async def on_init(self, data, addr):
        (info,) = data
        self.exp_ref = (info or {}).get("exp_ref")
        self._status = net.base.ExpStatus.INITIALIZED
        await self.communicator.init(self._info(), addr=addr)

    async def on_start(self, data, addr):
        exp_ref, _ = data
        assert exp_ref == self.exp_ref, "start for another experiment"
        self._status = net.base.ExpStatus.RUNNING
        await self.communicator.start(self.exp_ref, self._info(), addr=addr)

    async def on_end(self, data, addr):
        self._status = net.base.ExpStatus.STOPPED
        await self.communicator.stop(self._info(), addr=addr, immediately=False)

    async def on_interrupt(self, data, addr):
        self._status = net.base.ExpStatus.STOPPED
        await self.communicator.stop(self._info(), addr=addr, immediately=True)

    async def on_cleanup(self, data, addr):
        await self.communicator.cleanup(self._info(), addr=addr)
        self.communicator.close()  # one experiment per session

    async def on_status(self, _, addr):
        await self.communicator.status(self.status, addr=addr)

    async def on_info(self, _, addr):
        await self.communicator.info(self.status, self._info(), addr=addr)

    async def on_alyx(self, data, addr):
        base_url, token = data
        if token:
            self.token = (base_url, token)  # no completion for a token
