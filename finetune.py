"""Supervised fine-tuning of pretrained encoders. Not implemented yet: it arrives with its issue."""
import sys

if __name__ == "__main__":
    sys.exit("finetune.py is not implemented yet; for now see the README for the model API")
