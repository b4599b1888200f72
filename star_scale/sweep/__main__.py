"""`python -m star_scale.sweep`: the same as `star-scale sweep`."""
import sys

from star_scale.sweep.cli import main

sys.exit(main())
