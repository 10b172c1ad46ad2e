import sys

from mandant.cli import main

sys.exit(main())
