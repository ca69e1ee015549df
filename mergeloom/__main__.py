import sys

from mergeloom.cli import main

sys.exit(main())
