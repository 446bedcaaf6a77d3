"""``python -m mrhscale`` (and ``torchrun -m mrhscale train ...``) runs the CLI."""

from mrhscale.cli import main

if __name__ == "__main__":
    main(prog_name="mrhscale")
