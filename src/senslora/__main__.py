"""`python -m senslora`: the command line (also under torchrun: `torchrun -m senslora ...`)."""

from senslora.cli import app

if __name__ == "__main__":
    app()
