"""Airflow DAG: the clustermix nightly refresh at 02:00, one BashOperator per stage, in pipeline order.

Copy this file into the Airflow dags folder; set CLUSTERMIX_HOME, where Airflow parses and runs
the DAG, to a checkout where `make setup` has run (default /opt/clustermix). Each task runs one stage as its own process with
conf/nightly.yaml; a stage whose outputs are already current for its inputs is skipped.
"""

from __future__ import annotations

import os
from datetime import datetime
from itertools import pairwise

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.operators.bash import BashOperator

CLUSTERMIX_HOME = os.environ.get("CLUSTERMIX_HOME", "/opt/clustermix")
STAGES = ["ingest", "embed", "cluster", "stats", "sample", "blend"]

with DAG(
    dag_id="clustermix_nightly",
    schedule="0 2 * * *",
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["clustermix"],
) as dag:
    tasks = [
        BashOperator(
            task_id=stage,
            bash_command=f".venv/bin/clustermix {stage} --config conf/nightly.yaml",
            cwd=CLUSTERMIX_HOME,
        )
        for stage in STAGES
    ]
    for upstream, downstream in pairwise(tasks):
        upstream >> downstream
