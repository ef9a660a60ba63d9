#!/usr/bin/env bash
# Fetch the Delta Lake jars that match the installed delta-spark from Maven Central into the local
# Maven repository (~/.m2/repository, or $CLUSTERMIX_MAVEN_REPO), where clustermix's offline Ivy
# settings (and spark-submit --packages) resolve them. Idempotent: a second run downloads nothing.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
DELTA_VERSION=$("$PY" -c 'from importlib.metadata import version; print(version("delta-spark"))')
SCALA=2.13
REPO=${CLUSTERMIX_MAVEN_REPO:-$HOME/.m2/repository}
command -v mvn >/dev/null || { echo "fetch-jars: Maven (mvn) is required: apt-get install maven" >&2; exit 1; }
for artifact in "io.delta:delta-spark_${SCALA}:${DELTA_VERSION}" "io.delta:delta-storage:${DELTA_VERSION}"; do
  g=${artifact%%:*}; rest=${artifact#*:}; a=${rest%%:*}; v=${rest#*:}
  jar="$REPO/${g//.//}/$a/$v/$a-$v.jar"
  if [ -f "$jar" ]; then echo "fetch-jars: $artifact present"; continue; fi
  echo "fetch-jars: downloading $artifact into $REPO"
  mvn -q -B dependency:get -Dartifact="$artifact" -Dmaven.repo.local="$REPO"
done
