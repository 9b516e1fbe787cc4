"""The autoscaler's pure parts: the scaling policy (`policy.py`) that turns the planner's
recommendation and live signals into replica counts. The kopf timer that drives it lives in
`controller/autoscaler.py`; this package imports neither kopf nor the Kubernetes client."""
