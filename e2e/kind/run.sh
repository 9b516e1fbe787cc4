#!/usr/bin/env bash
# End-to-end on a real Kubernetes (kind): build both images, install the Helm chart, apply the
# tiny CPU model, wait for Ready, then run the same client checks as the local cluster.
# Needs: docker (a running engine), kind, helm, kubectl. Cleans up its cluster on exit unless
# KEEP_CLUSTER=1. Used by e2e/kind/test_kind.py; runnable by hand from the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER=${CLUSTER:-disaggserve-e2e}
TAG=${TAG:-e2e}
NS=${NS:-disaggserve-e2e}
cleanup() { [ "${KEEP_CLUSTER:-0}" = 1 ] || kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; }
trap cleanup EXIT

kind create cluster --name "$CLUSTER" --wait 120s
docker build -t "disaggserve/worker:$TAG" -f worker_image/Dockerfile .
docker build -t "disaggserve/operator:$TAG" -f operator/Dockerfile .
kind load docker-image --name "$CLUSTER" "disaggserve/worker:$TAG" "disaggserve/operator:$TAG"

helm install disaggserve charts/disaggserve --namespace "$NS" --create-namespace --wait --timeout 5m \
    --set image.repository=disaggserve/operator --set image.tag="$TAG" --set image.pullPolicy=Never
sed -e "s/namespace: default/namespace: $NS/" examples/tiny-cpu.yaml \
  | python3 -c "import sys, yaml; d = yaml.safe_load(sys.stdin); d['spec']['image'] = {'repository': 'disaggserve/worker', 'tag': '$TAG', 'pullPolicy': 'Never'}; print(yaml.safe_dump(d))" \
  | kubectl apply -f -
kubectl -n "$NS" wait --for=condition=Ready disaggserve/tiny --timeout=10m
kubectl -n "$NS" get disaggserve tiny

kubectl -n "$NS" port-forward svc/tiny-router 18000:8000 >/dev/null 2>&1 &
PF=$!
trap 'kill $PF 2>/dev/null; cleanup' EXIT
sleep 3
python3 - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:18000/v1", api_key="unused")
done = client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=8)
assert done.choices[0].text and done.usage.completion_tokens == 8, done
chunks = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                        max_tokens=8, stream=True)
assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
print("kind e2e: completions and streamed chat OK")
PY
kubectl -n "$NS" delete disaggserve tiny --wait
test -z "$(kubectl -n "$NS" get statefulsets,deployments -l app.kubernetes.io/instance=tiny -o name)"
echo "kind e2e: delete cleaned up every child"
