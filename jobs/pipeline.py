"""Job entry point: every stage in order. Usage: python jobs/pipeline.py --config conf/cluster.yaml"""

from _entry import main

if __name__ == "__main__":
    main("run")
