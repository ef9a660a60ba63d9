#!/usr/bin/env bash
# Submit the Spark stages to a Spark cluster as one spark-submit that runs them in order (one driver,
# one set of executors and jars for all of them; a stage never runs after a failed one).
#   SPARK_MASTER=k8s://https://<api-server>:6443 deploy/spark-submit.sh [--config conf/cluster.yaml] [--set KEY=VALUE ...]
# Arguments go to the job unchanged; with none, --config conf/cluster.yaml.
# STAGES picks the stages (default: ingest stats sample blend), or STAGES=refresh for the nightly
# refresh. On a fresh lake, stats needs the Ray stages' output first: STAGES=ingest, then
# deploy/ray-job.sh, then STAGES="stats sample blend".
# The driver runs here (client mode): this machine needs the project installed (make setup) with the
# same Python minor version as the executors' image (3.11), and executors must reach it over the network.
# SPARK_SUBMIT_EXTRA: more spark-submit options, split on spaces (namespace, executors, --packages...).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SPARK_MASTER:?set SPARK_MASTER, e.g. k8s://https://<api-server>:6443 or spark://<host>:7077}"
SPARK_SUBMIT=${SPARK_SUBMIT:-spark-submit}
STAGES=${STAGES:-ingest stats sample blend}
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--config conf/cluster.yaml)
# The Delta jar (io.delta:delta-spark_2.13 at the delta-spark of pyproject.toml), and hadoop-aws when
# the config's lake or input is on s3://: the config is validated here, before any submission.
PACKAGES=$(PYTHONPATH=lib${PYTHONPATH:+:$PYTHONPATH} python3 -m clustermix.cli spark-packages -q "${args[@]}") || exit $?

# The library as a zip for the executors' PYTHONPATH (it comes before the copy installed in the image).
mkdir -p build
rm -f build/clustermix.zip
(cd lib && python3 -m zipfile -c ../build/clustermix.zip clustermix)

opts=(--master "$SPARK_MASTER" --py-files build/clustermix.zip
  --conf spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension
  --conf spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog)
# Without baked jars, Spark resolves the jars (from ~/.m2 after deploy/fetch-jars.sh, else Maven Central).
[ "${SPARK_JARS_BAKED:-0}" = 1 ] || opts+=(--packages "$PACKAGES")
case "$SPARK_MASTER" in
  k8s://*) opts+=(--conf "spark.kubernetes.container.image=${SPARK_IMAGE:-clustermix-spark:0.1.0}") ;;
esac
# shellcheck disable=SC2206  # word splitting of SPARK_SUBMIT_EXTRA is intended
opts+=(${SPARK_SUBMIT_EXTRA:-})

read -r -a stages <<< "$STAGES"
[ ${#stages[@]} -gt 0 ] || { echo "spark-submit.sh: STAGES is empty" >&2; exit 2; }
for stage in "${stages[@]}"; do
  [ -f "jobs/$stage.py" ] || { echo "spark-submit.sh: no job jobs/$stage.py" >&2; exit 2; }
done
if [ ${#stages[@]} -eq 1 ]; then
  "$SPARK_SUBMIT" "${opts[@]}" "jobs/${stages[0]}.py" "${args[@]}"
else
  # refresh is a command of its own, not a stage to chain
  for stage in "${stages[@]}"; do
    [ "$stage" != refresh ] || { echo "spark-submit.sh: STAGES=refresh runs alone" >&2; exit 2; }
  done
  "$SPARK_SUBMIT" "${opts[@]}" jobs/pipeline.py --stages "$(IFS=,; echo "${stages[*]}")" "${args[@]}"
fi
