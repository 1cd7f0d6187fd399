"""`python -m fcmae.shrink` (or `fcmae-shrink`): write a shrunk copy of a folder of images;
the command is fcmae.cli.shrink_images."""
from fcmae.cli.shrink_images import main

if __name__ == "__main__":
    main()
