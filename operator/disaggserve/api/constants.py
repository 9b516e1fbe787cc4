"""Names of the custom resource, kept in one place for the CRD, the controller and the CLI."""

GROUP = "disaggserve.io"
VERSION = "v1alpha1"
KIND = "DisaggServe"
PLURAL = "disaggserves"
SINGULAR = "disaggserve"
SHORT_NAMES = ["dsv"]
API_VERSION = f"{GROUP}/{VERSION}"
FIELD_MANAGER = "disaggserve"

# ---- bounds, one constant each (the schema, the planner and the messages read these) ----------

# Requests per second the planner is asked to plan for. Below a thousandth of a request per
# second the search gains nothing (one instance per phase is the answer) and, near zero, the
# simulator's arrival gaps overflow; above the maximum no cluster this operator plans is sized.
MIN_REQUEST_RATE = 1e-3
MAX_REQUEST_RATE = 100_000.0
MAX_TOKENS_PER_REQUEST = 1_048_576  # prompt or completion length, and maxModelLen
MAX_REPLICAS = 1000  # instances of one phase (spec.parallelism, autoscaling bounds)

# metadata.name becomes part of Service names (DNS-1035 labels: a letter first) and of pod
# names with a controller-revision-hash label `<name>-u999-prefill-<10 chars>` that must fit 63.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_NAME_LENGTH = 40

# Kubernetes label syntax, for nodeSelector and tolerations.
K8S_LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
MAX_LABEL_VALUE_LENGTH = 63
QUALIFIED_NAME_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
