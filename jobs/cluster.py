"""Job entry point: the cluster stage. Usage: python jobs/cluster.py --config conf/cluster.yaml [--set KEY=VALUE ...]"""

from _entry import main

if __name__ == "__main__":
    main("cluster")
