# Spark image (clustermix-spark:0.1.0): driver and executors for ingest, stats, sample and blend.
#   docker build -f docker/spark.Dockerfile -t clustermix-spark:0.1.0 .
# Spark and Delta must match pyproject.toml (pyspark==4.0.1, delta-spark==4.0.0, Scala 2.13, Java 17).
FROM apache/spark:4.0.1-scala2.13-java17-python3-ubuntu

USER root
# The base is Ubuntu 22.04, whose python3 is 3.10; the project's images use Python 3.11
# (Ubuntu's python3.11 package). Maven is only needed to fetch the Delta jars below.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv maven \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/clustermix
COPY pyproject.toml README.md ./
COPY lib lib
COPY jobs jobs
COPY conf conf
COPY deploy/fetch-jars.sh deploy/fetch-jars.sh

# The project with the exact versions pinned in pyproject.toml, its `spark` extra (pyspark,
# delta-spark) included, in a venv first on PATH, so that `python3` on the executors (PySpark's
# default) is this one.
RUN python3.11 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir ".[spark]"
ENV PATH=/opt/venv/bin:$PATH \
    PYSPARK_PYTHON=/opt/venv/bin/python \
    HF_HUB_OFFLINE=1

# Bake the jars into Spark's classpath (conf/cluster.yaml: spark.delta_jars: none): fetch-jars.sh
# resolves them from the installed packages, exactly as `make setup` does (Delta at the delta-spark
# version, hadoop-aws at pyspark's Hadoop with the AWS SDK bundle and wildfly-openssl its POM names,
# for s3:// lakes), and puts each into $SPARK_HOME/jars.
RUN PYTHON=/opt/venv/bin/python CLUSTERMIX_MAVEN_REPO=/tmp/m2 CLUSTERMIX_JARS_DIR="$SPARK_HOME/jars" \
      bash deploy/fetch-jars.sh \
 && rm -rf /tmp/m2 /root/.m2 \
 && apt-get purge -y --auto-remove maven

# Back to the base image's work dir: executors write fetched files (--py-files) into their cwd.
WORKDIR /opt/spark/work-dir
USER spark
