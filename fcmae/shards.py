"""`python -m fcmae.shards` (or `fcmae-shards`): write a folder of images as webdataset shards;
the command is fcmae.cli.write_shards."""
from fcmae.cli.write_shards import main

if __name__ == "__main__":
    main()
