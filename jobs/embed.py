"""Job entry point: the embed stage. Usage: python jobs/embed.py --config conf/cluster.yaml [--set KEY=VALUE ...]"""

from _entry import main

if __name__ == "__main__":
    main("embed")
