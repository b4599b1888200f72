"""``python -m tokenize_data ...`` == ``star-scale tokenize ...``."""
import sys

from tokenize_data.job import main

sys.exit(main(sys.argv[1:]))
