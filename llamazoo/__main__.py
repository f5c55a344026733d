import sys

from llamazoo.cli import main

sys.exit(main())
