"""`python -m gmamba_ext.analysis --help`."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
