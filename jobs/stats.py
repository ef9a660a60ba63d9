"""Job entry point: the stats stage. Usage: python jobs/stats.py --config conf/cluster.yaml [--set KEY=VALUE ...]"""

from _entry import main

if __name__ == "__main__":
    main("stats")
