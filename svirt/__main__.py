"""python -m svirt"""

import sys

from svirt.cli import main

sys.exit(main())
