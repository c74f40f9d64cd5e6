"""pgwire: a sans-io codec for the PostgreSQL frontend/backend protocol 3.x.

Feed bytes to a :class:`FrontendDecoder` (client → server) or :class:`BackendDecoder`
(server → client) and take typed messages out; call ``encode()`` on a message to get its
wire bytes. Bad input raises :class:`ProtocolError` and nothing else. No I/O, no policy.
"""

from types import ModuleType as _ModuleType

from .decoder import (
    AUTH_TOKEN_LIMIT,
    DEFAULT_MAX_MESSAGE_SIZE,
    MAX_STARTUP_PACKET_LENGTH,
    SMALL_MESSAGE_LIMIT,
    BackendDecoder,
    FrontendDecoder,
    StartupPacket,
    decode_backend,
    decode_frontend,
    decode_startup,
)
from .errors import ProtocolError
from .messages import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_CANCEL_KEY_LENGTH,
    MIN_CANCEL_KEY_LENGTH,
    PROTOCOL_3_0,
    PROTOCOL_3_2,
    SSL_REQUEST_CODE,
    AuthenticationCleartextPassword,
    AuthenticationGSS,
    AuthenticationGSSContinue,
    AuthenticationKerberosV5,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    AuthenticationSSPI,
    BackendKeyData,
    BackendMessage,
    Bind,
    BindComplete,
    CancelRequest,
    Close,
    CloseComplete,
    CommandComplete,
    CopyBothResponse,
    CopyData,
    CopyDone,
    CopyFail,
    CopyInResponse,
    CopyOutResponse,
    DataRow,
    Describe,
    EmptyQueryResponse,
    ErrorResponse,
    Execute,
    FieldDescription,
    Flush,
    FrontendMessage,
    FunctionCall,
    FunctionCallResponse,
    GSSENCRequest,
    GSSENCResponse,
    GSSResponse,
    Message,
    NegotiateProtocolVersion,
    NoData,
    NoticeResponse,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    Parse,
    ParseComplete,
    PasswordMessage,
    PortalSuspended,
    Query,
    ReadyForQuery,
    RowDescription,
    SASLInitialResponse,
    SASLResponse,
    SSLRequest,
    SSLResponse,
    StartupMessage,
    Sync,
    Terminate,
)

# Everything imported above except the submodules themselves.
__all__ = [
    name
    for name, value in globals().items()
    if not name.startswith("_") and not isinstance(value, _ModuleType)
]
