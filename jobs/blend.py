"""Job entry point: the blend stage. Usage: python jobs/blend.py --config conf/cluster.yaml [--set KEY=VALUE ...]"""

from _entry import main

if __name__ == "__main__":
    main("blend")
