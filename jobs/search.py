"""Job entry point: the CLIMB search stage. Usage: python jobs/search.py --config conf/cluster.yaml"""

from _entry import main

if __name__ == "__main__":
    main("search")
