"""Run the qtool CLI from a source checkout: `python cli.py train --recipe ternary_all ...`."""

from qtoolkit.cli import app

if __name__ == "__main__":
    app()
