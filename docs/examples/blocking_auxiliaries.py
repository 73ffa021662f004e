"""iblrig's main-PC Auxiliaries on the blocking facade: the same push(), no thread of its own."""

import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import Any

from anyio.from_thread import start_blocking_portal

from trio_rignet import ExpMessage, Message, RigHandler, RigService, ServicesError, blocking

_output = threading.Lock()


def say(*parts: Any) -> None:
    """print(), one whole line at a time: several threads print here."""
    with _output:
        print(*parts)


class Auxiliaries:
    """Connect to the remote rigs; signal them from any thread of synchronous code."""

    def __init__(self, clients: Mapping[str, str]) -> None:
        self.services = blocking.Services.open(clients, timeout=10)
        self.services.assign_callback("EXPSTART", self._started, return_service=True)
        self._background = ThreadPoolExecutor(1, thread_name_prefix="push")

    @staticmethod
    def _started(msg: Message, rig: blocking.Rig) -> None:
        say(f"{rig.name} started")  # runs in the facade's callback thread

    def push(self, message: Any, *args: Any, wait: bool = False) -> Any:
        """Send a message to every rig: its responses (wait=True), or a Future of them."""
        if not wait:
            return self._background.submit(self.push, message, *args, wait=True)
        event = ExpMessage.validate(message, allow_bitwise=False)
        match event:
            case ExpMessage.EXPINFO:
                return self.services.info(*args)
            case ExpMessage.EXPINIT:
                return self.services.init(*args)
            case ExpMessage.EXPSTART:
                return self.services.start(*args)
            case ExpMessage.EXPSTATUS:
                return self.services.status(*args)
            case ExpMessage.EXPEND | ExpMessage.EXPINTERRUPT:
                return self.services.stop(*args, immediately=event is ExpMessage.EXPINTERRUPT)
            case ExpMessage.EXPCLEANUP:
                return self.services.cleanup(*args)
            case ExpMessage.ALYX:
                return self.services.alyx(*args)
        raise NotImplementedError(event)

    def close(self) -> None:
        """Wait for pushes in progress, close the rigs' endpoints, stop the threads."""
        self._background.shutdown()
        self.services.close()


def task(aux: Auxiliaries) -> None:
    """The behaviour task, in its own thread: each push blocks until every rig completed."""
    say("start:", aux.push("EXPSTART", "2024-01-01_1_mouse1", wait=True))
    say("stop:", aux.push("EXPEND", wait=True))


def main(uris: Mapping[str, str]) -> None:
    aux = Auxiliaries(uris)
    try:
        say("info:", aux.push("EXPINFO", "CONNECTED", {"subject": "mouse1"}, wait=True))
        say("init:", aux.push("EXPINIT", {"subject": "mouse1"}, wait=True))
        task_thread = threading.Thread(target=task, args=(aux,), name="task")
        task_thread.start()
        status: Future[Any] = aux.push("EXPSTATUS", "RUNNING")  # meanwhile, without waiting
        task_thread.join()
        say("status:", status.result())
        try:
            aux.push("EXPCLEANUP", wait=True)
        except ServicesError as err:  # raised in this thread, never lost
            for name, exc in err.failures.items():
                say(f"cleanup failed on {name}: {type(exc).__name__}")
            say("cleanup done on:", err.responses)
    finally:
        aux.close()


# ---- simulated rigs, for this example: on a real setup these are other PCs ----


async def did(msg: Message) -> str:
    return f"{msg.event.name} done"


async def no_disk(msg: Message) -> None:
    raise OSError("disk full")


@contextmanager
def simulated_rigs(rigs: Mapping[str, Mapping[str, RigHandler]]) -> Iterator[dict[str, str]]:
    """RigServices on this PC, in an event loop thread of their own; yields name -> URI."""
    with start_blocking_portal("trio") as portal, ExitStack() as stack:
        uris = {}
        for name, handlers in rigs.items():
            rig = RigService("udp://127.0.0.1:0", dict(handlers), name=name)
            stack.enter_context(portal.wrap_async_context_manager(rig))
            uris[name] = rig.local_uri
        yield uris


SIGNALS = ("info", "init", "start", "stop", "cleanup")
with simulated_rigs(
    {
        "cameras": dict.fromkeys(SIGNALS, did),
        "timeline": {**dict.fromkeys(SIGNALS, did), "cleanup": no_disk},
    }
) as uris:
    main(uris)
print("threads left:", [t.name for t in threading.enumerate() if t is not threading.main_thread()])
