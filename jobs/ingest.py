"""Job entry point: the ingest stage. Usage: python jobs/ingest.py --config conf/cluster.yaml [--set KEY=VALUE ...]"""

from _entry import main

if __name__ == "__main__":
    main("ingest")
