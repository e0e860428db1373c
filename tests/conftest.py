import os

# The build machines cannot reach the Hugging Face hub; fail fast instead of retrying downloads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
