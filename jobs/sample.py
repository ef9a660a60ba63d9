"""Job entry point: the sample stage. Usage: python jobs/sample.py --config conf/cluster.yaml [--set KEY=VALUE ...]"""

from _entry import main

if __name__ == "__main__":
    main("sample")
