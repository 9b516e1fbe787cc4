"""Names of the custom resource, kept in one place for the CRD, the controller and the CLI."""

GROUP = "disaggserve.io"
VERSION = "v1alpha1"
KIND = "DisaggServe"
PLURAL = "disaggserves"
SINGULAR = "disaggserve"
SHORT_NAMES = ["dsv"]
API_VERSION = f"{GROUP}/{VERSION}"
FIELD_MANAGER = "disaggserve"
