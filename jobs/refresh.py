"""Job entry point: the nightly refresh. Usage: python jobs/refresh.py --config conf/nightly.yaml [--recluster]"""

from _entry import main

if __name__ == "__main__":
    main("refresh")
