"""`python -m fcmae.bench` (or `fcmae-bench`): measure training steps and the input pipeline;
the command is fcmae.cli.benchmark."""
from fcmae.cli.benchmark import main

if __name__ == "__main__":
    main()
