"""trio-rignet: signal experiment rigs over a LAN with echo confirmation.

A structured-concurrency (Trio / AnyIO) port of ``iblutil.io.net``, wire
compatible with it. Public names are re-exported here; every other module is
private, except :mod:`trio_rignet.blocking`, the facade for synchronous code.
"""

from __future__ import annotations

from . import blocking
from ._calls import Call, result_of, run_calls
from ._echo import EchoProtocol, EchoStats, EndpointOptions
from ._errors import (
    EchoTimeout,
    EndpointClosed,
    FramingError,
    MessageError,
    PeerNotAllowed,
    PeerUnavailable,
    RemoteError,
    RignetError,
)
from ._events import Callback
from ._extensions import ClockEstimate, PeerStatus
from ._framing import StreamDecoder
from ._liveness import Change
from ._messages import (
    LISTEN_PORT,
    PROTOCOL_VERSION,
    AlyxLike,
    ExpMessage,
    ExpStatus,
    Message,
    decode,
    encode,
    format_exp_ref,
    parse_message,
)
from ._rig import RigHandler, RigService
from ._services import CompletionTimeout, RigState, Services, ServicesError
from ._uri import hostname2ip, is_valid_ip, validate_uri

__version__ = "0.1.0"

__all__ = [
    "LISTEN_PORT",
    "PROTOCOL_VERSION",
    "AlyxLike",
    "Call",
    "Callback",
    "Change",
    "ClockEstimate",
    "CompletionTimeout",
    "EchoProtocol",
    "EchoStats",
    "EchoTimeout",
    "EndpointClosed",
    "EndpointOptions",
    "ExpMessage",
    "ExpStatus",
    "FramingError",
    "Message",
    "MessageError",
    "PeerNotAllowed",
    "PeerStatus",
    "PeerUnavailable",
    "RemoteError",
    "RigHandler",
    "RigService",
    "RigState",
    "RignetError",
    "Services",
    "ServicesError",
    "StreamDecoder",
    "__version__",
    "blocking",
    "decode",
    "encode",
    "format_exp_ref",
    "hostname2ip",
    "is_valid_ip",
    "parse_message",
    "result_of",
    "run_calls",
    "validate_uri",
]
