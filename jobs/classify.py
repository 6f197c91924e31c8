"""`ray job submit --working-dir . -- python -m jobs.classify --config jobs/configs/<file>.yaml [flags]`"""

from jobs._entry import main

if __name__ == "__main__":
    raise SystemExit(main("classify"))
