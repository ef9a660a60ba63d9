#!/usr/bin/env bash
# Fetch the jars Spark needs from Maven Central into the local Maven repository (~/.m2/repository,
# or $CLUSTERMIX_MAVEN_REPO), where clustermix's offline Ivy settings (and spark-submit --packages)
# resolve them. Idempotent: a second run downloads nothing. With CLUSTERMIX_JARS_DIR set, every jar
# it resolved is also put there (a hard link, else a copy): docker/spark.Dockerfile bakes them into
# $SPARK_HOME/jars that way, so the image carries exactly the versions this script resolves.
#  - Delta Lake, matching the installed delta-spark: io.delta:delta-spark_2.13 and io.delta:delta-storage;
#  - s3a for lakes on s3://: org.apache.hadoop:hadoop-aws at the Hadoop version pyspark bundles (its
#    hadoop-client-api jar), plus what hadoop-aws's POM declares: the AWS SDK v2 bundle
#    (software.amazon.awssdk:bundle, about 560 MB) and wildfly-openssl.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
DELTA_VERSION=$("$PY" -c 'from importlib.metadata import version; print(version("delta-spark"))')
HADOOP_VERSION=$("$PY" -c 'import glob, os, pyspark
jars = glob.glob(os.path.join(os.path.dirname(pyspark.__file__), "jars", "hadoop-client-api-*.jar"))
print(os.path.basename(jars[0])[len("hadoop-client-api-"):-len(".jar")])')
SCALA=2.13
REPO=${CLUSTERMIX_MAVEN_REPO:-$HOME/.m2/repository}
command -v mvn >/dev/null || { echo "fetch-jars: Maven (mvn) is required: apt-get install maven" >&2; exit 1; }

artifact_path() { local g=${1%%:*} rest=${1#*:}; local a=${rest%%:*} v=${rest#*:}; echo "$REPO/${g//.//}/$a/$v/$a-$v.$2"; }
FETCHED=0
JARS=()
fetch() {  # fetch ARTIFACT [extra mvn flags]: the jar (and, fetched transitively, its POM)
  local artifact=$1; shift
  JARS+=("$(artifact_path "$artifact" jar)")
  if [ -f "$(artifact_path "$artifact" jar)" ]; then echo "fetch-jars: $artifact present"; return; fi
  echo "fetch-jars: downloading $artifact into $REPO"
  mvn -q -B dependency:get -Dartifact="$artifact" -Dmaven.repo.local="$REPO" "$@"
  FETCHED=1
}
fetch_pom() {  # fetch_pom ARTIFACT: only its POM, where Spark's Ivy reads its dependencies
  [ -f "$(artifact_path "$1" pom)" ] && return
  echo "fetch-jars: downloading the POM of $1 into $REPO"
  mvn -q -B dependency:get -Dartifact="$1:pom" -Dtransitive=false -Dmaven.repo.local="$REPO"
  FETCHED=1
}
pom_property() {  # pom_property POM NAME: a <NAME>value</NAME> property of a POM
  sed -n "s:.*<$2>\(.*\)</$2>.*:\1:p" "$1" | head -1
}

fetch "io.delta:delta-spark_${SCALA}:${DELTA_VERSION}"
fetch "io.delta:delta-storage:${DELTA_VERSION}"

# hadoop-aws without Maven's transitive walk: its POM also names test-only artifacts (and a snapshot
# repository) that plain dependency:get would try to fetch. Its runtime dependencies are versioned
# in the parent hadoop-project POM; fetch exactly those.
fetch "org.apache.hadoop:hadoop-aws:${HADOOP_VERSION}" -Dtransitive=false
# -Dtransitive=false fetches the jar alone; without its POM, Ivy would take hadoop-aws to need
# nothing and s3a would fail on the first write (ClassNotFoundException for the AWS SDK)
fetch_pom "org.apache.hadoop:hadoop-aws:${HADOOP_VERSION}"
PARENT="$REPO/org/apache/hadoop/hadoop-project/${HADOOP_VERSION}/hadoop-project-${HADOOP_VERSION}.pom"
fetch_pom "org.apache.hadoop:hadoop-project:${HADOOP_VERSION}"  # Ivy reads the dependencies' versions here
AWS_SDK_VERSION=$(pom_property "$PARENT" aws-java-sdk-v2.version)
WILDFLY_VERSION=$(pom_property "$PARENT" openssl-wildfly.version)
[ -n "$AWS_SDK_VERSION" ] && [ -n "$WILDFLY_VERSION" ] || { echo "fetch-jars: cannot read hadoop-aws's dependency versions from $PARENT" >&2; exit 1; }
fetch "software.amazon.awssdk:bundle:${AWS_SDK_VERSION}" -Dtransitive=false
fetch "org.wildfly.openssl:wildfly-openssl:${WILDFLY_VERSION}" -Dtransitive=false

# Ivy caches what it resolved (an artifact's dependencies included) and does not look again: after
# anything new arrived here, drop clustermix's Ivy cache so the next Spark session resolves afresh.
IVY_HOME=${CLUSTERMIX_IVY_HOME:-$HOME/.cache/clustermix/ivy}
if [ "$FETCHED" = 1 ] && [ -d "$IVY_HOME/cache" ]; then
  echo "fetch-jars: clearing Ivy's cache of earlier resolutions ($IVY_HOME)"
  rm -rf "$IVY_HOME/cache" "$IVY_HOME/jars"
fi

if [ -n "${CLUSTERMIX_JARS_DIR:-}" ]; then
  mkdir -p "$CLUSTERMIX_JARS_DIR"
  for jar in "${JARS[@]}"; do
    ln -f "$jar" "$CLUSTERMIX_JARS_DIR/" 2>/dev/null || cp -f "$jar" "$CLUSTERMIX_JARS_DIR/"
    echo "fetch-jars: $(basename "$jar") -> $CLUSTERMIX_JARS_DIR"
  done
fi
