"""``python -m pyroseg`` (also what ``torchrun -m pyroseg`` runs)."""

from cli.main import main

if __name__ == "__main__":
    main()
