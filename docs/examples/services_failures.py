"""One signal, four rigs, three kinds of failure: ServicesError says which rig failed how."""

import trio

from trio_rignet import Message, RemoteError, RigService, Services, ServicesError


def fail(msg: Message) -> None:
    raise ValueError("no subject called mouse1")


async def main() -> None:
    timeline = RigService("udp://127.0.0.1:0", name="timeline")  # answers every signal
    ephys = RigService("udp://127.0.0.1:0", name="ephys", ack=False)  # echoes, never completes
    behaviour = RigService("udp://127.0.0.1:0", {"init": fail}, name="behaviour")
    # A video rig whose program hangs: its socket receives but nothing echoes.
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as video:
        await video.bind(("127.0.0.1", 0))
        host, port = video.getsockname()
        async with timeline, ephys, behaviour:
            uris = {
                "timeline": timeline.local_uri,
                "video": f"udp://{host}:{port}",
                "ephys": ephys.local_uri,
                "behaviour": behaviour.local_uri,
            }
            async with Services.open(uris, timeout=0.2, echo_timeout=0.2) as rigs:
                try:
                    await rigs.init({"subject": "mouse1"})
                except ServicesError as err:
                    for name in rigs:
                        exc = err.failures.get(name)
                        if exc is None:
                            print(f"{name}: ok, completion data {err.responses[name]}")
                        elif isinstance(exc, TimeoutError):  # EchoTimeout or CompletionTimeout
                            print(f"{name}: {type(exc).__name__}")
                        elif isinstance(exc, RemoteError):
                            print(f"{name}: RemoteError {exc.text!r}")
                    if isinstance(err.failures.get("video"), TimeoutError):
                        print("the video rig did not answer in time")


trio.run(main)
