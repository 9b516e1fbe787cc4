{{/* Names and labels shared by every template. */}}

{{- define "disaggserve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "disaggserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "disaggserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "disaggserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: disaggserve
{{- end -}}

{{/* The operator's pods; distinct from the "disaggserve" name the operator puts on the workloads it creates. */}}
{{- define "disaggserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "disaggserve.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "disaggserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "disaggserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false: name an existing ServiceAccount" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "disaggserve.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Namespaces the operator watches (scope namespaced), one per line. */}}
{{/* Combinations the schema cannot refuse; included once by deployment.yaml. */}}
{{- define "disaggserve.validateValues" -}}
{{- if and (eq .Values.watch.scope "cluster") .Values.watch.namespaces -}}
{{- fail "watch.namespaces lists namespaces but watch.scope is cluster (every namespace): drop watch.namespaces, or set watch.scope=namespaced" -}}
{{- end -}}
{{- if and .Values.podDisruptionBudget.enabled (ge (int .Values.podDisruptionBudget.minAvailable) (int .Values.replicaCount)) (gt (int .Values.replicaCount) 1) -}}
{{- fail (printf "podDisruptionBudget.minAvailable (%v) must be below replicaCount (%v), or no node could ever be drained" .Values.podDisruptionBudget.minAvailable .Values.replicaCount) -}}
{{- end -}}
{{- end -}}

{{- define "disaggserve.watchedNamespaces" -}}
{{- $nss := .Values.watch.namespaces | default (list .Release.Namespace) -}}
{{- range $nss | uniq }}
{{ . }}
{{- end -}}
{{- end -}}

{{/*
Rules for namespaced resources: exactly what the operator calls (tests/chart/test_rbac.py compares
them with the API calls the operator makes). `peering` is the kopf peering resource of this scope.
*/}}
{{- define "disaggserve.namespacedRules" -}}
- apiGroups: ["disaggserve.io"]
  resources: ["disaggserves"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["disaggserve.io"]
  resources: ["disaggserves/status"]
  verbs: ["get", "patch"]
- apiGroups: ["apps"]
  resources: ["statefulsets", "deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Each DisaggServe's NetworkPolicy: only its router, its peers, the operator and the scraper reach workers.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Each DisaggServe's worker token (`<name>-worker-token`): read by name (never listed), created once
# by server-side apply; the owner reference deletes it. The operator also sends it on drain calls.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "patch"]
{{- if .Values.rbac.inferencePools }}
# spec.gateway (opt-in): the InferencePool of the Gateway API Inference Extension (its CRDs installed separately).
- apiGroups: ["inference.networking.k8s.io"]
  resources: ["inferencepools"]
  verbs: ["get", "list", "create", "patch", "delete"]
{{- end }}
# Each router's own Role (get/list/watch pods) and RoleBinding. RBAC's escalation check lets the
# operator write only a Role whose permissions it holds itself in that namespace: no `escalate`/`bind`.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Pods: read for drain-safe scale-down and autoscaling (readiness, pod IPs); delete restarts a pod
# left drained by a scale-down that was called off. get/list/watch are also what the router's
# Role grants, which RBAC lets the operator write only while it holds them itself.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "delete"]
# kopf posts Events through the core API (not events.k8s.io).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
