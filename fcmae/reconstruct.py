"""`python -m fcmae.reconstruct` (or `fcmae-reconstruct`): draw a checkpoint's reconstructions;
the command is fcmae.cli.reconstruct_images."""
from fcmae.cli.reconstruct_images import main

if __name__ == "__main__":
    main()
