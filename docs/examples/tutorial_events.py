"""Messages a rig sends on its own: a callback, and a subscription opened before the signal."""

from typing import Any

import trio

from trio_rignet import EchoProtocol, ExpStatus, Message, RigService, Services

behaviour = RigService("udp://127.0.0.1:0", name="behaviour")
main_pc: dict[str, Any] = {}  # where the behaviour rig reports to
started = trio.Event()


@behaviour.handle("start")
async def start_task(msg: Message) -> str:
    # async: it sets a Trio event (a plain handler runs in a worker thread)
    main_pc["addr"] = msg.addr  # the address the start signal came from
    started.set()
    return "task started"


async def run_task() -> None:
    """The behaviour rig's own work: report progress, then end the experiment."""
    await started.wait()
    await trio.sleep(0.02)
    await behaviour.endpoint.status(ExpStatus.RUNNING, addr=main_pc["addr"])
    await trio.sleep(0.02)
    await behaviour.endpoint.stop({"trials": 42}, addr=main_pc["addr"])


def report(msg: Message, rig: EchoProtocol) -> None:
    """A plain callback: runs inline in the receive task, so keep it short."""
    print(f"{rig.name} reports {ExpStatus(msg.data[0]).name}")


async def main() -> None:
    async with behaviour, trio.open_nursery() as nursery:
        nursery.start_soon(run_task)
        async with Services.open({"behaviour": behaviour.local_uri}) as rigs:
            rigs.assign_callback("status", report, return_service=True)
            # Subscribe before sending the signal, so no reply can be missed.
            async with rigs["behaviour"].subscribe("stop") as ends:
                print("start:", await rigs.start("2024-01-01_1_mouse1"))
                with trio.fail_after(1):
                    async for msg in ends:
                        print("the rig ended the experiment:", msg.data)
                        break
            print("cleanup:", await rigs.cleanup())


trio.run(main)
