#!/usr/bin/env bash
# Submit the Ray stages (embed, cluster, then dedup) to a running Ray cluster, one `ray job submit` each.
#   RAY_ADDRESS=http://<head>:8265 deploy/ray-job.sh [--config conf/cluster.yaml] [--set KEY=VALUE ...]
# Arguments go to every job unchanged; with none, --config conf/cluster.yaml. The cluster's nodes
# need the project's dependencies (docker/ray-gpu.Dockerfile); this checkout is uploaded as the
# working directory and lib/clustermix as a py_module, so the workers run this code. `ray job submit`
# waits for the job and exits non-zero if it failed, so cluster never runs after a failed embed.
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
for job in embed cluster dedup; do
  "$RAY" job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$runtime_env" \
    -- python "jobs/$job.py" "${args[@]}"
done
