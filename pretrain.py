"""FCMAE pretraining with accelerate. Not implemented yet: it arrives with the pretraining issue."""
import sys

if __name__ == "__main__":
    sys.exit("pretrain.py is not implemented yet; for now see the README for the model API and "
             "`python -m fcmae.bench`")
