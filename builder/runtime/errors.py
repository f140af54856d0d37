"""The error type for bad client input, turned into a per-request error response (never a crash)."""


class RequestError(ValueError):
    """A problem with one request input that the client can fix.

    The message names the input, the limit or expectation, and the offending value, e.g.
    ``image[1]: not a PNG or JPEG image (cannot identify image file ...)``.
    """
