"""Job entry point: the evaluate stage (Ray). Usage: python jobs/evaluate.py --config conf/cluster.yaml --set evaluate.enabled=true"""

from _entry import main

if __name__ == "__main__":
    main("evaluate")
