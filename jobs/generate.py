"""`ray job submit --working-dir . -- python -m jobs.generate --config jobs/configs/<file>.yaml [flags]`"""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("generate"))
