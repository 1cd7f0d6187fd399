"""`python -m fcmae.export` (or `fcmae-export`): export weights and checkpoints to other formats;
the command is fcmae.cli.export_weights."""
from fcmae.cli.export_weights import main

if __name__ == "__main__":
    main()
