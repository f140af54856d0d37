"""The errors a request can meet, each turned into that request's error response (never a crash)."""

BUSY_PREFIX = "server busy: "  # how a BLS caller, which gets every error as INTERNAL, tells ServerBusy apart


class RequestError(ValueError):
    """A problem with one request input that the client can fix (answered INVALID_ARGUMENT).

    The message names the input, the limit or expectation, and the offending value, e.g.
    ``image[1]: not a PNG or JPEG image (cannot identify image file ...)``.
    """


class ServerBusy(RuntimeError):
    """The request is valid but the server has no room for it now (answered UNAVAILABLE: retry later)."""

    def __init__(self, reason: str) -> None:
        super().__init__(BUSY_PREFIX + reason)
