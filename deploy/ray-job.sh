#!/usr/bin/env bash
# Submit the Ray stages (embed, cluster, then dedup; STAGES names others, e.g. STAGES="embed cluster
# dedup search" when search.target_* is set, or STAGES=evaluate after the blend with evaluate.enabled)
# to a running Ray cluster as one `ray job submit` that
# runs them in order (one upload, one driver; a stage never runs after a failed one).
#   RAY_ADDRESS=http://<head>:8265 [STAGES="..."] deploy/ray-job.sh [--config conf/cluster.yaml] [--set KEY=VALUE ...]
# Arguments go to the job unchanged; with none, --config conf/cluster.yaml. The cluster's nodes
# need the project's dependencies (docker/ray-gpu.Dockerfile); this checkout is uploaded as the
# working directory and lib/clustermix as a py_module, so the workers run this code. `ray job submit`
# waits for the job and exits non-zero if it failed.
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
read -r -a stages <<< "${STAGES:-embed cluster dedup}"
[ ${#stages[@]} -gt 0 ] || { echo "ray-job.sh: STAGES is empty" >&2; exit 2; }
for job in "${stages[@]}"; do
  case $job in embed|cluster|assign|dedup|search|evaluate) ;; *) echo "ray-job.sh: $job is not a Ray stage" >&2; exit 2;; esac
done
if [ ${#stages[@]} -eq 1 ]; then entry=("jobs/${stages[0]}.py"); else entry=(jobs/pipeline.py --stages "$(IFS=,; echo "${stages[*]}")"); fi
"$RAY" job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$runtime_env" \
  -- python "${entry[@]}" "${args[@]}"
