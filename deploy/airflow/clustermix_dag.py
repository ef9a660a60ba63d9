"""Airflow DAG: the clustermix nightly refresh at 02:00, then the run's report, then table upkeep
(`clustermix maintain`: compaction of small files and vacuum, under the lake's run lock).

Copy this file into the Airflow dags folder of an Airflow installed from deploy/airflow/requirements.txt
(its own environment, not the project's .venv); set CLUSTERMIX_HOME, where Airflow parses and runs the
DAG, to a checkout where `make setup` has run (default /opt/clustermix), and CLUSTERMIX_CONFIG to use
another config than conf/nightly.yaml. `clustermix refresh` is one
task because it decides inside (new files or not, keep the clustering or refit on drift) and is
idempotent: a retried or repeated task writes no data table twice. Set `spark.master` and
`ray.address` in conf/nightly.yaml to run it against clusters instead of locally.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.operators.bash import BashOperator

CLUSTERMIX_HOME = os.environ.get("CLUSTERMIX_HOME", "/opt/clustermix")
CONFIG = os.environ.get("CLUSTERMIX_CONFIG", "conf/nightly.yaml")

with DAG(
    dag_id="clustermix_nightly",
    schedule="0 2 * * *",
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=10)},
    tags=["clustermix"],
) as dag:
    refresh = BashOperator(
        task_id="refresh",
        bash_command=f".venv/bin/clustermix refresh --config {CONFIG}",
        cwd=CLUSTERMIX_HOME,
    )
    report = BashOperator(
        task_id="report",
        bash_command=f".venv/bin/clustermix report --config {CONFIG}",
        cwd=CLUSTERMIX_HOME,
    )
    maintain = BashOperator(
        task_id="maintain",
        bash_command=f".venv/bin/clustermix maintain --config {CONFIG}",
        cwd=CLUSTERMIX_HOME,
    )
    refresh >> report >> maintain
