"""``python -m pyroseg`` (also what ``torchrun -m pyroseg`` runs)."""

from pyroseg.cli.main import main

if __name__ == "__main__":
    main()
