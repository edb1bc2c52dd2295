"""python -m loadtest sweep ...   the highest request rate that meets a p99 SLO (see loadtest/sweep.py)
python -m loadtest report PREFIX   summarize a headless Locust run written with --csv PREFIX"""

import sys

from histoserve.loadtest import report, sweep

COMMANDS = {"sweep": sweep.main, "report": report.main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
