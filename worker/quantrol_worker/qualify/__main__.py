import sys

from quantrol_worker.qualify.run import main

if __name__ == "__main__":
    sys.exit(main())
