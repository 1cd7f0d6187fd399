"""`python -m fcmae.embed` (or `fcmae-embed`): embeddings of every image of a dataset; the command
is fcmae.cli.embed_images."""
from fcmae.cli.embed_images import main

if __name__ == "__main__":
    main()
