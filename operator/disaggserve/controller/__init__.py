"""The kopf controller. Importing this package registers the handlers, so that
`kopf run -m disaggserve.controller` works as well as `disaggserve operator`."""

from disaggserve.controller import handlers  # noqa: F401
