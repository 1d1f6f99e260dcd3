"""python -m graphopt.cli"""
import sys

from . import main

sys.exit(main())
