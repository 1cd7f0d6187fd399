"""`python -m fcmae.curves` (or `fcmae-curves`): draw the curves of pretraining runs; the command is
fcmae.cli.plot_curves."""
from fcmae.cli.plot_curves import main

if __name__ == "__main__":
    main()
