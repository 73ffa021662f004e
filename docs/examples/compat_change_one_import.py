"""Code written for iblutil 1.20.0, running on trio-rignet: only the import line changed."""

import asyncio
import logging
import socket

from trio_rignet.compat.iblutil import app, base  # was: from iblutil.io.net import app, base

# iblutil's default logger prints every message at DEBUG; pass a quieter one.
log = logging.getLogger("rigs")
log.setLevel(logging.WARNING)


tasks = set()  # the replies being sent (asyncio keeps only weak references to tasks)


async def auxiliary_pc(uri, name):
    """A rig: each signal is echoed, then completed with the same event (iblutil style)."""
    com = await app.EchoProtocol.server(uri, name=name, log=log)

    def on_signal(data, addr, event):
        done = f"{name} did {event.name}"
        if event == base.ExpMessage.EXPSTART:
            reply = com.start(data[0], done, addr=addr)
        elif event in (base.ExpMessage.EXPEND, base.ExpMessage.EXPINTERRUPT):
            reply = com.stop(done, immediately=event == base.ExpMessage.EXPINTERRUPT, addr=addr)
        else:
            reply = getattr(com, event.name[3:].lower())(done, addr=addr)  # init, cleanup
        task = asyncio.ensure_future(reply)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    com.assign_callback(base.ExpMessage.any() & ~base.ExpMessage.ALYX, on_signal)
    return com


async def main():
    # Port 0 binds a free port (trio-rignet only: iblutil needs a fixed one).
    video = await auxiliary_pc("udp://127.0.0.1:0", "video")
    ephys = await auxiliary_pc("ws://127.0.0.1:0", "ephys")  # TCP

    # The main PC, as with iblutil: a client per rig, and Services over them.
    rigs = [await app.EchoProtocol.client(r.server_uri, r.name, log=log) for r in (video, ephys)]
    services = app.Services(rigs, timeout=10)
    try:
        print("init:", await services.init({"subject": "mouse1"}))
        print("start:", await services.start("2024-01-01_1_mouse1"))
        print("stop:", await services.stop())
        print("cleanup:", await services.cleanup())

        # A rig that never answers: TimeoutError as with iblutil, but the communicator stays open.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind(("127.0.0.1", 0))
            lost = await app.EchoProtocol.client(
                f"udp://127.0.0.1:{silent.getsockname()[1]}", "lost", log=log
            )
            try:
                await lost.init()
            except TimeoutError as ex:
                print("TimeoutError:", str(ex).partition(" (")[0])
            print("still open:", lost.is_connected)
            lost.close()
    finally:
        services.close()
        video.close()
        ephys.close()


asyncio.run(main())
