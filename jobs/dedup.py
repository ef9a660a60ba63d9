"""Job entry point: the dedup stage (semantic duplicates, Ray). Usage: python jobs/dedup.py --config conf/cluster.yaml [--set KEY=VALUE ...]"""

from _entry import main

if __name__ == "__main__":
    main("dedup")
