import sys

from rsna22_utils.cli import main

sys.exit(main())
