#!/usr/bin/env bash
# Submit the Ray stages (embed, cluster, then dedup; STAGES names others, e.g. STAGES="embed cluster
# dedup search" when search.target_* is set) to a running Ray cluster, one `ray job submit` each, in order.
#   RAY_ADDRESS=http://<head>:8265 [STAGES="..."] deploy/ray-job.sh [--config conf/cluster.yaml] [--set KEY=VALUE ...]
# Arguments go to every job unchanged; with none, --config conf/cluster.yaml. The cluster's nodes
# need the project's dependencies (docker/ray-gpu.Dockerfile); this checkout is uploaded as the
# working directory and lib/clustermix as a py_module, so the workers run this code. `ray job submit`
# waits for the job and exits non-zero if it failed, so a stage never runs after a failed one.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard address, e.g. http://ray-head:8265}"
RAY=${RAY:-ray}
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--config conf/cluster.yaml)
runtime_env='{
  "env_vars": {"HF_HUB_OFFLINE": "1"},
  "py_modules": ["lib/clustermix"],
  "excludes": ["/.git", "/.venv", "/lake", "/lake-nightly", "/build", "/bench/out"]
}'
for job in ${STAGES:-embed cluster dedup}; do
  case $job in embed|cluster|assign|dedup|search) ;; *) echo "ray-job.sh: $job is not a Ray stage" >&2; exit 2;; esac
  "$RAY" job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$runtime_env" \
    -- python "jobs/$job.py" "${args[@]}"
done
