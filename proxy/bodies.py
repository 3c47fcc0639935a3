"""Bodies both ways: the client's request body (buffered when small enough to replay, else
streamed, within max_body_size) and the relay of upstream's answer to the client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

from proxy.errors import PayloadTooLarge, UpstreamError
from proxy.headers import Headers, downstream_headers
from proxy.log import get_logger
from proxy.transport import CHUNK_SIZE, Body, UpstreamResponse

log = get_logger("proxy.bodies")

REPLAYABLE_BODY_LIMIT = 1024 * 1024
# Answers that never carry a body (RFC 9110 6.4.1): always relayed on the streaming path.
_NO_BODY_STATUS = frozenset({204, 304})


class RequestBody:
    """A request's body as the send step hands it on: bytes that can be sent again, or a
    stream sent once. `overflow` is set when the stream broke off for max_body_size, so that
    a transport's report of a failed upload is answered 413, as it was caused."""

    __slots__ = ("_limit", "_request", "bytes_in", "data", "overflow", "replayable")

    def __init__(self, request: web.BaseRequest | None, *, limit: int | None) -> None:
        self._request = request
        self._limit = limit
        self.bytes_in = 0
        self.data: Body = None
        self.replayable = True
        self.overflow: PayloadTooLarge | None = None

    async def read(self) -> RequestBody:
        """Buffer a small body, or set up the stream of a large or chunked one."""
        request = self._request
        if request is None:
            return self
        length = request.content_length
        limit = self._limit
        if length is not None and limit is not None and length > limit:
            # Refused before a slot, a token or a byte upstream is spent on it.
            raise too_large(limit)
        if length is not None and length <= REPLAYABLE_BODY_LIMIT:
            data = await request.content.readexactly(length) if length else b""
            self.bytes_in = len(data)
            self.data = data
        else:
            self.data = self._stream()
            self.replayable = False
        return self

    async def _stream(self) -> AsyncIterator[bytes]:
        limit, request = self._limit, self._request
        if request is None:
            return
        async for chunk in request.content.iter_chunked(CHUNK_SIZE):
            self.bytes_in += len(chunk)
            if limit is not None and self.bytes_in > limit:
                self.overflow = too_large(limit)
                raise self.overflow
            yield chunk


# The body of every request that has none: nothing to read, always replayable.
NO_BODY = RequestBody(None, limit=None)


async def request_body(request: web.BaseRequest, *, limit: int | None) -> RequestBody:
    """The body step: the request's body, or NO_BODY when it has none."""
    if not request.body_exists:
        return NO_BODY
    return await RequestBody(request, limit=limit).read()


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the request body exceeds {limit} bytes; raise max_body_size "
        "(TOKEN_PROXY_MAX_BODY_SIZE) if it should pass"
    )


@dataclass(slots=True)
class Relayed:
    """What the relay step sent back: the answer, its body's size, and how it ended."""

    response: web.StreamResponse
    bytes_out: int
    outcome: str


async def relay(
    request: web.BaseRequest,
    response: UpstreamResponse,
    *,
    request_id: str,
    extra: Headers | None = None,
    keep: Callable[[bytes], None] | None = None,
) -> Relayed:
    """The relay step: upstream's answer to the client, streamed, or in one write when it
    arrived whole. The cache adds its `extra` headers, and is given with `keep` every piece
    of the body once the client has it."""
    try:
        headers = downstream_headers(response.header_items, request_id=request_id)
        if extra is not None:
            headers += extra
        whole = None
        if request.method != "HEAD" and response.status not in _NO_BODY_STATUS:
            whole = response.received_body()
        out: web.StreamResponse
        sent = 0
        if whole is not None:
            # A small answer that came in whole leaves in one write, headers and body
            # together (a StreamResponse sends its headers on their own first).
            out = web.Response(
                status=response.status, reason=response.reason, headers=headers, body=whole
            )
            sent = len(whole)
        else:
            out = web.StreamResponse(
                status=response.status, reason=response.reason, headers=headers
            )
        outcome = "complete"
        try:
            await out.prepare(request)
            if whole is None and request.method != "HEAD":
                async for chunk in response.chunks():
                    sent += len(chunk)
                    await out.write(chunk)
                    if keep is not None:
                        keep(chunk)
            await out.write_eof()
            if whole is not None and keep is not None:
                keep(whole)
        except UpstreamError as exc:
            # Headers are sent: closing the connection is the only honest way to say the
            # body is incomplete; ending it normally would pass a truncated body as whole.
            outcome = "upstream_aborted"
            log.warning(
                "upstream broke off the response; closing the client connection",
                detail=exc.detail,
            )
            _close_client(request)
        except ConnectionError:
            outcome = "client_aborted"
            _close_client(request)
        return Relayed(response=out, bytes_out=sent, outcome=outcome)
    finally:
        response.close()


def _close_client(request: web.BaseRequest) -> None:
    """Close the client connection; aiohttp's own write_eof then fails quietly."""
    if request.transport is not None:
        request.transport.close()
