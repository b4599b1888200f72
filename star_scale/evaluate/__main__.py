"""`python -m star_scale.evaluate ...` = `star-scale evaluate ...`."""
import sys

from star_scale.evaluate.cli import main

sys.exit(main())
