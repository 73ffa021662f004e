"""Events, timeouts, callbacks and cancellation through the blocking facade, from plain threads."""

import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import Any

import anyio
from anyio.from_thread import start_blocking_portal

from trio_rignet import EndpointClosed, ExpStatus, Message, RigHandler, RigService, blocking

_output = threading.Lock()


def say(*parts: Any) -> None:
    """print(), one whole line at a time: several threads print here."""
    with _output:
        print(*parts)


def on_stop(msg: Message, rig: blocking.Rig) -> None:
    say(f"{threading.current_thread().name.split('_')[0]} thread: {rig.name} stopped")


def main(uris: Mapping[str, str]) -> None:
    with blocking.Services.open(uris, backend="asyncio") as rigs:  # or "trio", the default
        # Events: subscribe before the signal, so that nothing can be missed; each step
        # of the iteration waits at most `timeout` seconds.
        with rigs.subscribe("status", timeout=0.2) as updates:
            say("start:", rigs.start("2024-01-01_1_mouse1"))
            try:
                for rig, msg in updates:  # the behaviour rig reports on its own
                    say(f"{rig} reports {ExpStatus(msg.data[0]).name}")
            except TimeoutError as exc:
                say("then:", exc)

        # A call bounded by fail_after: cancelled (on every rig) and TimeoutError.
        try:
            rigs.init(fail_after=0.1)
        except TimeoutError:
            say("init: no completion within 0.1 s; cancelled")

        # Callbacks in a thread you name: here an executor standing for a GUI thread.
        with ThreadPoolExecutor(1, thread_name_prefix="gui") as gui:
            rigs.assign_callback("stop", on_stop, return_service=True, executor=gui)
            rigs.stop()

        # Closing from another thread ends a call blocked in this one.
        def abort() -> None:  # e.g. the GUI's "abort" button
            video_init.wait()  # once the video rig has the signal
            rigs.close()

        video_init.clear()
        closer = threading.Thread(target=abort)
        closer.start()
        try:
            rigs.init()
        except EndpointClosed as exc:
            say(f"init: {type(exc).__name__}: {exc}")
        closer.join()


# ---- simulated rigs, for this example: on a real setup these are other PCs ----

behaviour = RigService("udp://127.0.0.1:0", name="behaviour")
video_init = threading.Event()


@behaviour.handle("start")
async def start_task(msg: Message) -> str:
    assert msg.addr is not None
    await behaviour.endpoint.status(ExpStatus.RUNNING, addr=msg.addr)  # to the main PC
    return "task started"


async def slow_init(msg: Message) -> None:
    video_init.set()
    await anyio.sleep(10)  # the camera takes long to start


@contextmanager
def simulated_rigs(rigs: Mapping[str, RigService]) -> Iterator[dict[str, str]]:
    """RigServices on this PC, in an event loop thread of their own; yields name -> URI."""
    with start_blocking_portal("trio") as portal, ExitStack() as stack:
        uris = {}
        for name, rig in rigs.items():
            stack.enter_context(portal.wrap_async_context_manager(rig))
            uris[name] = rig.local_uri
        yield uris


handlers: dict[str, RigHandler] = {"init": slow_init}
video = RigService("udp://127.0.0.1:0", handlers, name="video")
with simulated_rigs({"behaviour": behaviour, "video": video}) as uris:
    main(uris)
