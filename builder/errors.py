"""The one exception type the CLI turns into a single readable line and a non-zero exit."""


class BuildError(Exception):
    """A problem the user can fix (bad spec, missing checkpoint, failed accuracy check...).

    The message is shown as is, without a traceback unless ``--verbose``.
    """


class SpecError(BuildError):
    """The build spec is invalid; the message names the offending key."""
