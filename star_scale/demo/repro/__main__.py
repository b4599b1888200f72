import sys

from star_scale.demo.repro.cli import main

sys.exit(main())
