"""Job entry point: every stage in order, or those of ``--stages a,b,c``.
Usage: python jobs/pipeline.py [--stages stats,sample,blend] --config conf/cluster.yaml"""

from _entry import main

if __name__ == "__main__":
    main("run")
